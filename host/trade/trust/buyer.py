"""FIG. 4 at the customer agent: fetch the product bought by one purchase, check the merchant's
signed offer with the merchant's key (the temporary certificate its own account manager
signed, checked when the session opened), accept it with the session key, and open the
product with K2 released by the trusted party, sealed to a fresh K1. The dispute package
(signed description, ciphertext, K2, acceptance) is kept whatever the outcome."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from .. import signing as S
from ..customer import Session, TradeError, reason_of
from ..payword import order_payload
from . import delivery as V


@dataclass
class Delivered:
    """The product (None when it does not match its description: ``reason`` says why) and
    the dispute package a third party can judge with public keys only."""

    index: int
    item: str
    plaintext: bytes | None = field(repr=False)
    package: bytes = field(repr=False)
    reason: str
    merchant_key: bytes
    session_key: bytes            # the session's public key


def merchant_key(s: Session) -> bytes:
    """The merchant's key from the certificate the session was opened with."""
    text = s.opened.get("merchant_cert") or ""
    if not text:
        raise TradeError("this session has no merchant certificate: no FIG. 4 delivery")
    return bytes.fromhex(json.loads(text)["cert"]["key"])


def _order(s: Session, index: int) -> dict[str, Any]:
    for entry in s.orders:
        if entry["index"] == index:
            return entry
    raise TradeError(f"no purchase paid by link {index} in this session")


def fetch(http: httpx.Client, s: Session, index: int | None = None,
          now: int | None = None) -> Delivered:
    """The product of the purchase paid by link ``index`` (default: the last purchase)."""
    if not s.orders:
        raise TradeError("no purchase in this session yet")
    entry = _order(s, s.orders[-1]["index"] if index is None else index)
    public = merchant_key(s)
    order_body = S.canonical(order_payload(s.session, entry["index"], entry["item"],
                                           entry["units"]))
    signed = V.signed_order(order_body, entry["signature"])
    base = f"{s.merchant_url}/v1/sessions/{s.session}/purchases/{entry['index']}"
    answer = http.get(f"{base}/offer", params={"pseudonym": s.pseudonym})
    if answer.status_code != 200:
        raise TradeError(f"the merchant gave no offer (HTTP {answer.status_code}): "
                         f"{reason_of(answer)}")
    try:
        data = answer.json()
        offer = V.Offer(data["description"].encode(), data["signature"],
                        base64.b64decode(data["ciphertext"], validate=True))
        d = V.check_offer(offer, public, s.session, signed)
    except (ValueError, KeyError, TypeError, V.DeliveryError) as exc:
        raise TradeError(f"the merchant's offer does not hold: {exc}") from None
    if d["product"] != entry["item"] or d["merchant"] != s.merchant or \
            (d["price"], d["currency"]) != (entry["units"] * s.unit, s.currency_merchant):
        raise TradeError("the offer describes another product or price than was ordered")
    k1_private, k1_public = V.new_exchange_key()
    acceptance = V.accept(s.session_key, offer, k1_public,
                          int(time.time()) if now is None else now)
    got = http.post(f"{base}/accept", content=acceptance,
                    headers={"Content-Type": "application/json"})
    if got.status_code != 200:
        raise TradeError(f"no key for the product (HTTP {got.status_code}): "
                         f"{reason_of(got)}")
    try:
        k2 = V.open_key(k1_private, bytes.fromhex(got.json()["sealed"]), acceptance, offer)
    except (ValueError, KeyError, TypeError, V.DeliveryError) as exc:
        raise TradeError(f"the released key does not hold: {exc}") from None
    package = V.dispute_package(offer, acceptance, k2)
    try:
        plaintext: bytes | None = V.decrypt(offer, k2)
        reason = "the product described"
    except V.DeliveryError as exc:
        plaintext, reason = None, exc.reason
    return Delivered(entry["index"], entry["item"], plaintext, package, reason, public,
                     S.public_of(s.session_key))
