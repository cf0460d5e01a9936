"""How a customer proves a retail order is theirs: an Ed25519 signature over the request body.

Why Ed25519 and not a shared secret: the SP stores only each customer's PUBLIC key, so its
database (or a backup of it) holds nothing that lets anyone order in a customer's name, and
verifying needs no slow password hash on every order. ``svcard sp customer add`` makes the key
pair and writes the private key to a file only the customer gets (mode 0600), or takes the
public key of a pair the customer made.

The signed bytes are a fixed domain label, then the exact request body (JSON with the customer
id, the SP's name ``sp``, a fresh ``order_key`` chosen by the customer and the ``created``
time). ``sp`` is the name the SP is configured with (its ``name`` setting): a customer with one
key at two SPs signs an order for one of them, and the other refuses it (the order key is unique
only within one SP, so without the name a copy could be paid again at the other within
:data:`MAX_SKEW`). The labels are version 2: a request signed under a version 1 label (no SP
named) verifies under none. The signature goes
in the ``X-Svcard-Signature`` header, as hex. The body's ``order_key`` is unique per customer in
the SP's database and ``created`` must be within :data:`MAX_SKEW` seconds of the SP's clock,
so a replayed request is refused and cannot be held back and sent much later.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

from ...protocols import signatures

# the mechanics, shared by every system (protocols/signatures.py)
SigningError = signatures.SigningError
write_private_key = signatures.write_private_key


DOMAIN = b"svcard-sp-order/2\n"
LOOKUP_DOMAIN = b"svcard-sp-lookup/2\n"   # a lookup's signature is never an order's
DEFAULT_SP = "svcard-sp"    # an SP's name when its configuration gives none
HEADER = signatures.SIGNATURE
MAX_SKEW = 300      # seconds between the customer's "created" and the SP's clock


def new_key() -> tuple[bytes, bytes]:
    """A fresh (private, public) Ed25519 pair, raw 32 bytes each."""
    return signatures.new_pair()


def public_from_hex(text: str) -> bytes:
    return signatures.public_from_hex(text, "a customer's public key")


def read_private_key(path: Path) -> bytes:
    return signatures.read_private_key(path, "an svcard customer key")


def sign(private: bytes, body: bytes, domain: bytes = DOMAIN) -> str:
    """The signature of ``body`` (hex), for the :data:`HEADER` header."""
    return signatures.sign(private, domain, body)


def verify(public: bytes, body: bytes, signature_hex: str | None,
           domain: bytes = DOMAIN) -> bool:
    """Whether ``signature_hex`` is ``public``'s signature of ``body``."""
    return signatures.verify(public, domain, body, signature_hex)


def order_body(customer: str, merchant: str, sku: str, *, sp: str = DEFAULT_SP,
               order_key: str | None = None, created: int | None = None) -> bytes:
    """A retail order's request body for the SP named ``sp``: fresh order key, the time now
    (both may be given)."""
    body: dict[str, Any] = {
        "customer": customer, "merchant": merchant, "sku": sku, "sp": sp,
        "order_key": order_key or secrets.token_hex(16),
        "created": int(time.time()) if created is None else created}
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def signed_order(private: bytes, customer: str, merchant: str, sku: str,
                 **kwargs: Any) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a signed retail order."""
    body = order_body(customer, merchant, sku, **kwargs)
    return body, {HEADER: sign(private, body), "Content-Type": "application/json"}


def signed_lookup(private: bytes, customer: str, order_key: str,
                  created: int | None = None, *,
                  sp: str = DEFAULT_SP) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a signed request for the state and goods of one's own order."""
    body = json.dumps({"customer": customer, "order_key": order_key, "sp": sp,
                       "created": int(time.time()) if created is None else created},
                      separators=(",", ":"), sort_keys=True).encode()
    return body, {HEADER: sign(private, body, LOOKUP_DOMAIN),
                  "Content-Type": "application/json"}


# --- FIG. 3B and the merchant's copy (server/pon.py) -------------------------------------
PON_DOMAIN = b"svcard-sp-pon/2\n"                  # a customer's purchase order for a PON
MERCHANT_ORDER_DOMAIN = b"svcard-merchant-order/2\n"   # a customer's order placed at a merchant
# signed by the MERCHANT's key (its public key set at the SP by ``svcard sp merchant-key``)
MERCHANT_HEADER = "X-Svcard-Merchant-Signature"
MERCHANT_PON_DOMAIN = b"svcard-merchant-pon/1\n"   # its answer about one of its PONs
COPY_DOMAIN = b"svcard-sp-copy/1\n"                 # its copy of a customer's order


def _body(fields: dict[str, Any], created: int | None, order_key: str | None) -> bytes:
    fields.update(order_key=order_key or secrets.token_hex(16),
                  created=int(time.time()) if created is None else created)
    return json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()


def signed_pon_order(private: bytes, customer: str, merchant: str, pon: str, *,
                     max_amount: int | None = None, order_key: str | None = None,
                     created: int | None = None,
                     sp: str = DEFAULT_SP) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a customer's purchase order for the merchant's PON (FIG. 3B 341),
    to the SP named ``sp``: ``max_amount`` (minor units, or none) is the most the customer
    agrees to be billed."""
    body = _body({"customer": customer, "merchant": merchant, "pon": pon, "sp": sp,
                  "max_amount": max_amount}, created, order_key)
    return body, {HEADER: sign(private, body, PON_DOMAIN), "Content-Type": "application/json"}


def signed_merchant_order(private: bytes, customer: str, merchant: str, sku: str, *,
                          max_amount: int | None = None, order_key: str | None = None,
                          created: int | None = None,
                          sp: str = DEFAULT_SP) -> tuple[bytes, str]:
    """(body, signature hex) of an order the customer places AT the merchant, for the SP
    named ``sp`` to pay: the merchant sends both to the SP in its copy."""
    body = _body({"customer": customer, "merchant": merchant, "sku": sku, "sp": sp,
                  "max_amount": max_amount}, created, order_key)
    return body, sign(private, body, MERCHANT_ORDER_DOMAIN)
