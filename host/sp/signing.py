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
import os
import secrets
import time
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

DOMAIN = b"svcard-sp-order/2\n"
LOOKUP_DOMAIN = b"svcard-sp-lookup/2\n"   # a lookup's signature is never an order's
DEFAULT_SP = "svcard-sp"    # an SP's name when its configuration gives none
HEADER = "X-Svcard-Signature"
MAX_SKEW = 300      # seconds between the customer's "created" and the SP's clock


class SigningError(ValueError):
    """A key that cannot be used (the message never holds the key)."""


def new_key() -> tuple[bytes, bytes]:
    """A fresh (private, public) Ed25519 pair, raw 32 bytes each."""
    private = Ed25519PrivateKey.generate()
    raw = private.private_bytes_raw()
    return raw, private.public_key().public_bytes_raw()


def public_from_hex(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text.strip())
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise SigningError("a public key is 32 bytes of hex (64 hex digits)") from None
    return raw


def write_private_key(path: Path, private: bytes) -> None:
    """Write ``private`` (hex) to a new file ``path``, mode 0600; an existing file is refused."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SigningError(f"{path}: exists; the key file is never overwritten") from None
    except OSError as exc:
        raise SigningError(f"{path}: cannot write the key file: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(private.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_private_key(path: Path) -> bytes:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise SigningError(f"{path}: cannot read the key file: {exc.strerror}") from None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise SigningError(f"{path}: not an svcard customer key (64 hex digits)")
    return raw


def sign(private: bytes, body: bytes, domain: bytes = DOMAIN) -> str:
    """The signature of ``body`` (hex), for the :data:`HEADER` header."""
    return Ed25519PrivateKey.from_private_bytes(private).sign(domain + body).hex()


def verify(public: bytes, body: bytes, signature_hex: str | None,
           domain: bytes = DOMAIN) -> bool:
    """Whether ``signature_hex`` is ``public``'s signature of ``body``."""
    if signature_hex is None or len(signature_hex) != 128:
        return False
    try:
        signature = bytes.fromhex(signature_hex)
        Ed25519PublicKey.from_public_bytes(public).verify(signature, domain + body)
    except (ValueError, InvalidSignature):
        return False
    return True


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
