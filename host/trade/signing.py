"""Every trading-session message is signed by its sender's Ed25519 key (``cryptography``).

A message is a JSON object sent as its canonical text (sorted keys, no spaces, ASCII), so
the bytes signed are the bytes sent. The signature covers a domain label naming the message
kind, then those bytes: a signature made for one kind of message (an initiation, an
acknowledgement, a purchase order) never verifies as another. It travels in the
``X-Svcard-Signature`` header as hex; ``X-Svcard-Signer`` names the party whose key the
receiver must use (the receiver looks the key up itself: the header only says which).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

SIGNATURE = "X-Svcard-Signature"
SIGNER = "X-Svcard-Signer"

# the domain labels, one per message kind (docs/trade.md lists them)
INITIATION = b"svcard-trade-initiation/1\n"     # customer agent -> customer account manager
AMENDED = b"svcard-trade-amended/1\n"           # account manager -> mediating trusted agent
INFORMATION = b"svcard-trade-information/1\n"   # mediating agent -> merchant agent
MERCHANT_ACK = b"svcard-trade-merchant-ack/1\n"  # merchant agent -> mediating agent
AGENT_ACK = b"svcard-trade-agent-ack/1\n"       # mediating agent -> account manager
LOOKUP = b"svcard-trade-lookup/1\n"             # account manager -> mediating agent
TABLE = b"svcard-trade-table/1\n"               # a bank's exchange table, to the devices
OPENED = b"svcard-trade-opened/1\n"             # account manager -> customer agent
COMMITMENT = b"svcard-trade-commitment/1\n"     # customer (session key) -> merchant
ORDER = b"svcard-trade-order/1\n"               # customer (session key): sign(order)^c
TERMINATE = b"svcard-trade-terminate/1\n"       # customer (session key) -> merchant
RECORD = b"svcard-trade-record/1\n"             # a side's transaction record (FIG. 3)
FORWARD = b"svcard-trade-forward/1\n"           # account manager -> mediating agent
END = b"svcard-trade-end/1\n"                   # mediating agent -> merchant: end it
CLEARING = b"svcard-trade-clearing/1\n"         # mediating agent -> both account managers
RECEIPT = b"svcard-trade-receipt/1\n"           # an account manager took the clearing


class SigningError(ValueError):
    """A key that cannot be used (the message never holds the key)."""


def canonical(payload: dict[str, Any]) -> bytes:
    """The one byte form of a message: sorted keys, no spaces, ASCII only."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()


def new_key() -> tuple[bytes, bytes]:
    """A fresh (private, public) Ed25519 pair, raw 32 bytes each."""
    private = Ed25519PrivateKey.generate()
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()


def public_of(private: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def sign(private: bytes, domain: bytes, body: bytes) -> str:
    """The hex signature of ``domain + body``."""
    return Ed25519PrivateKey.from_private_bytes(private).sign(domain + body).hex()


def verify(public: bytes, domain: bytes, body: bytes, signature_hex: object) -> bool:
    """Whether ``signature_hex`` is ``public``'s signature of ``domain + body``."""
    if not isinstance(signature_hex, str) or len(signature_hex) != 128:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(bytes.fromhex(signature_hex),
                                                           domain + body)
    except (ValueError, InvalidSignature):
        return False
    return True


def signed(private: bytes, signer: str, domain: bytes,
           payload: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a message signed by ``signer``."""
    body = canonical(payload)
    return body, {SIGNATURE: sign(private, domain, body), SIGNER: signer,
                  "Content-Type": "application/json"}


def public_from_hex(text: str, what: str = "public key") -> bytes:
    try:
        raw = bytes.fromhex(text.strip())
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise SigningError(f"{what}: not 32 bytes of hex (64 hex digits)") from None
    return raw


def write_private_key(path: Path, private: bytes) -> None:
    """``private`` (hex) into a NEW file, mode 0600; an existing file is refused."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SigningError(f"{path}: exists; a key file is never overwritten") from None
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
        raise SigningError(f"{path}: not an Ed25519 private key (64 hex digits)")
    return raw
