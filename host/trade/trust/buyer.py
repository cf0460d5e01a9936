"""FIG. 4 at the customer agent: fetch the product bought by one purchase, check the merchant's
signed offer with the merchant's key (the temporary certificate its own account manager
signed, checked when the session opened), accept it with the session key, and open the
product with K2 released by the trusted party, sealed to a fresh K1. The dispute package
(signed description, ciphertext, K2, acceptance) is kept whatever the outcome."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .. import closing as K
from .. import signing as S
from ..customer import Session, TradeError, reason_of
from ..payword import MAX_STEP, link_at, order_payload
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
    merchant_cert: str = ""       # the merchant's FI's certificate of merchant_key (a judge's)


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


def _kept(path: Path | None, offer: V.Offer) -> tuple[bytes, bytes] | None:
    """(K1's private half, the acceptance) kept at ``path`` by an earlier run, if any."""
    if path is None or not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data["description"] != hashlib.sha256(offer.description).hexdigest():
            raise TradeError(f"{path}: an acceptance of another offer: move it away")
        return bytes.fromhex(data["k1"]), str(data["acceptance"]).encode()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TradeError(f"{path}: not a kept acceptance ({type(exc).__name__})") from None


def _accept(path: Path | None, s: Session, offer: V.Offer, now: int | None,
            link: bytes = b"") -> tuple[bytes, bytes]:
    """A new acceptance with a fresh K1, kept at ``path`` (mode 0600, replaced atomically)
    BEFORE it is sent: a lost answer is then asked for again with the same acceptance, the
    only one the trusted party answers for this order."""
    k1_private, k1_public = V.new_exchange_key()
    acceptance = V.accept(s.session_key, offer, k1_public,
                          int(time.time()) if now is None else now, link)
    if path is not None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"description": hashlib.sha256(offer.description).hexdigest(),
                       "k1": k1_private.hex(), "acceptance": acceptance.decode()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return k1_private, acceptance


def buy_product(http: httpx.Client, s: Session, item: str, units: int = 1) -> dict[str, Any]:
    """Order a digital product fairly (FIG. 4): the merchant gets the signed order but not the
    link; the link goes inside the signed acceptance to the trusted party, which hands it to
    the merchant in the step that releases K2 (:func:`fetch`). No other purchase is taken in
    the session until then."""
    if s.pending:
        raise TradeError(f"the product of link {s.pending['index']} awaits its acceptance: "
                         "fetch it first")
    index = s.spent + units
    if not 1 <= units <= MAX_STEP or index > s.length:
        raise TradeError(f"cannot pay {units} links: {s.length - s.spent} left")
    order = order_payload(s.session, index, item, units)
    signature = S.sign(s.session_key, S.ORDER, S.canonical(order))
    s.pending = K.entry(index, item, units, signature)
    answer = http.post(f"{s.merchant_url}/v1/sessions/{s.session}/purchases", json={
        "session": s.session, "index": index, "link": "", "order": order,
        "signature": signature})
    if 400 <= answer.status_code < 500:     # a definite no: nothing ordered
        s.pending = {}
    if answer.status_code != 200:
        raise TradeError(f"the merchant refused the purchase (HTTP {answer.status_code}): "
                         f"{reason_of(answer)}")
    got: dict[str, Any] = answer.json()
    return got


def _released(http: httpx.Client, s: Session, base: str, order: str, acceptance: bytes
              ) -> httpx.Response | None:
    """The acceptance to the merchant (which relays it); when the merchant gives no answer
    the trusted party itself is asked (its URL is in the account manager's signed
    ``opened``), and answers the same acceptance with the same release."""
    lost: httpx.HTTPError | None = None
    try:
        got: httpx.Response | None = http.post(
            f"{base}/accept", content=acceptance, headers={"Content-Type": "application/json"})
        if got is not None and (got.status_code == 200 or 400 <= got.status_code < 500):
            return got
    except httpx.HTTPError as exc:
        got, lost = None, exc
    party = str(s.opened.get("acquirer_url") or "")
    if not party:
        if lost is not None:
            raise lost
        return got
    direct = http.post(f"{party}/v1/deliveries/release", content=S.canonical(
        {"session": s.session, "order": order, "acceptance": acceptance.decode()}),
        headers={"Content-Type": "application/json"})
    if direct.status_code != 200 and lost is not None:
        raise lost          # the merchant out of reach, and the party did not release
    return direct


def fetch(http: httpx.Client, s: Session, index: int | None = None,
          now: int | None = None, keep: Path | None = None) -> Delivered:
    """The product of the purchase paid by link ``index`` (default: the pending product, else
    the last purchase). ``keep`` (the session file): the acceptance and its K1 are kept beside
    it, in ``KEEP.fig4-INDEX``, so that a later run asks again with the same acceptance. A
    product bought with :func:`buy_product` is paid by the link inside the acceptance: once K2
    opens, the purchase joins the session's list."""
    fair = bool(s.pending) and index in (None, s.pending["index"])
    if not s.orders and not fair:
        raise TradeError("no purchase in this session yet")
    entry = s.pending if fair else \
        _order(s, s.orders[-1]["index"] if index is None else index)
    link = link_at(s.seed, s.length, entry["index"]) if fair else b""
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
    path = None if keep is None else keep.with_name(f"{keep.name}.fig4-{entry['index']}")
    kept = _kept(path, offer)
    k1_private, acceptance = kept or _accept(path, s, offer, now, link)
    order = json.loads(offer.description)["order"]
    got = _released(http, s, base, order, acceptance)
    if kept and got is not None and got.status_code == 401 and "too old" in reason_of(got):
        # it never reached the trusted party in time (else its answer comes at any age)
        k1_private, acceptance = _accept(path, s, offer, now, link)
        got = _released(http, s, base, order, acceptance)
    if got is None:
        raise TradeError("the merchant gave no answer and no trusted party is known")
    if got.status_code != 200:
        raise TradeError(f"no key for the product (HTTP {got.status_code}): "
                         f"{reason_of(got)}")
    try:
        k2 = V.open_key(k1_private, bytes.fromhex(got.json()["sealed"]), acceptance, offer)
    except (ValueError, KeyError, TypeError, V.DeliveryError) as exc:
        raise TradeError(f"the released key does not hold: {exc}") from None
    if fair:      # paid: the link went to the merchant in the step that released K2
        s.orders.append(entry)
        s.spent, s.pending = entry["index"], {}
    package = V.dispute_package(offer, acceptance, k2)
    try:
        plaintext: bytes | None = V.decrypt(offer, k2)
        reason = "the product described"
    except V.DeliveryError as exc:
        plaintext, reason = None, exc.reason
    try:    # the merchant's own FI vouching for its key: a judge checks it with that FI's
        vouch = str(json.loads(s.opened["acquirer_ack"])["merchant_cert"])
    except (KeyError, ValueError, TypeError):
        vouch = ""
    return Delivered(entry["index"], entry["item"], plaintext, package, reason, public,
                     S.public_of(s.session_key), vouch)
