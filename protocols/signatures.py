"""Ed25519 signatures over labelled messages, and the key files that hold the private keys.

The systems of svcard (the service provider, the goods servers, the trading sessions) sign
their messages the same way: the signed bytes are a domain label naming the message kind, then
the exact bytes sent, so a signature made for one kind of message never verifies as another.
A message that is a JSON object is sent as its canonical text (sorted keys, no spaces, ASCII),
so the bytes signed are the bytes sent. Each system keeps its own labels and headers; this
module holds only the mechanics, once.

A private key lives in a file of its own, as 64 hex digits, mode 0600, never overwritten.
Errors name the file, never the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

SIGNATURE = "X-Svcard-Signature"   # the header carrying the hex signature
SIGNER = "X-Svcard-Signer"         # the header naming whose key the receiver must use


class SigningError(ValueError):
    """A key that cannot be used (the message never holds the key)."""


def canonical(payload: Mapping[str, Any]) -> bytes:
    """The one byte form of a JSON message: sorted keys, no spaces, ASCII only."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()


def new_pair() -> tuple[bytes, bytes]:
    """A fresh (private, public) Ed25519 pair, raw 32 bytes each."""
    private = Ed25519PrivateKey.generate()
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()


@lru_cache(maxsize=64)
def _private_key(private: bytes) -> Ed25519PrivateKey:
    """The key object of a raw private key, kept: a server signs with the same few keys all day,
    and loading one costs as much as a signature."""
    return Ed25519PrivateKey.from_private_bytes(private)


@lru_cache(maxsize=1024)
def _public_key(public: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(public)


def public_of(private: bytes) -> bytes:
    return _private_key(private).public_key().public_bytes_raw()


def sign(private: bytes, domain: bytes, body: bytes) -> str:
    """The hex signature of ``domain + body``."""
    return _private_key(private).sign(domain + body).hex()


def verify(public: bytes, domain: bytes, body: bytes, signature_hex: object) -> bool:
    """Whether ``signature_hex`` is ``public``'s signature of ``domain + body``."""
    if not isinstance(signature_hex, str) or len(signature_hex) != 128:
        return False
    try:
        _public_key(public).verify(bytes.fromhex(signature_hex), domain + body)
    except (ValueError, InvalidSignature):
        return False
    return True


def signed(private: bytes, signer: str, domain: bytes,
           payload: Mapping[str, Any]) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a JSON message signed by ``signer`` under ``domain``."""
    body = canonical(payload)
    return body, {SIGNATURE: sign(private, domain, body), SIGNER: signer,
                  "Content-Type": "application/json"}


def public_from_hex(text: str, what: str = "public key") -> bytes:
    """A public key from its 64 hex digits; anything else is a :class:`SigningError`."""
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
    except OSError as exc:
        raise SigningError(f"{path}: cannot write the key file: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(private.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_private_key(path: Path, what: str = "an Ed25519 private key") -> bytes:
    """The raw private key in ``path``; a missing or malformed file names the file only."""
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise SigningError(f"{path}: cannot read the key file: {exc.strerror}") from None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise SigningError(f"{path}: not {what} (64 hex digits)")
    return raw
