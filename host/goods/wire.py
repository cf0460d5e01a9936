"""The messages between the parties of seed 000 and how each is signed.

Every message is a JSON object sent as its canonical text (sorted keys, no spaces, ASCII), so
the bytes signed are the bytes sent. The sender signs a domain label naming the message kind,
then those bytes, with its Ed25519 key; the signature travels in ``X-Svcard-Signature`` (hex)
and ``X-Svcard-Signer`` names the sender. A receiver takes a message only from a signer it
knows, under the domain label of the route it came in on: a signature made for one kind of
message never verifies as another. Fields are checked by :func:`parse` (exactly the fields of
the message, each by its checker; a body at most :data:`MAX_MESSAGE` bytes).

A device is known by its key: its id is the first 32 hex digits of SHA-256 over its public
key (:func:`device_id`), so a registration cannot claim another device's id.

The card's security information (its PIN) is sealed for the financial institution only
(:func:`seal_pin`): X25519 with an ephemeral key, HKDF-SHA256, AES-GCM with the order id and
the card's serial as associated data. The servers in between relay it and cannot read it, nor
move it to another order or card.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ...protocols import signatures
from ..kit.http import Refused, check_json_shape

# the mechanics, shared by every system (protocols/signatures.py)
SIGNATURE = signatures.SIGNATURE
SIGNER = signatures.SIGNER
SigningError = signatures.SigningError
canonical = signatures.canonical
public_of = signatures.public_of
read_private_key = signatures.read_private_key
sign = signatures.sign
signed = signatures.signed
verify = signatures.verify
write_private_key = signatures.write_private_key

MAX_MESSAGE = 8192   # bytes of any one message
MAX_SKEW = 300       # seconds between a message's ``created`` and the receiver's clock

# the domain labels, one per message kind (docs/goods.md lists them)
DIGITAL_ORDER = b"svcard-goods-digital-order/1\n"    # merchant -> payment
ROUTED_ORDER = b"svcard-goods-routed-order/1\n"      # payment -> authentication
FIRST_MESSAGE = b"svcard-goods-first-message/1\n"    # authentication -> device
REGISTRATION = b"svcard-goods-registration/1\n"      # device -> authentication
POLL = b"svcard-goods-poll/1\n"                      # device -> authentication
AUTHORISATION = b"svcard-goods-authorisation/1\n"    # device -> authentication
RELAYED_AUTH = b"svcard-goods-relayed-auth/1\n"      # authentication -> payment
PAYMENT = b"svcard-goods-payment/1\n"                # payment -> financial institution
CONFIRMATION = b"svcard-goods-confirmation/1\n"      # financial institution -> payment
PAYMENT_STATUS = b"svcard-goods-payment-status/1\n"  # payment -> institution (recovery)
PAID = b"svcard-goods-paid/1\n"                      # payment -> merchant and fulfilment
GOOD_WRITE = b"svcard-goods-write/1\n"               # fulfilment -> (payment, auth) -> device
ANSWER = b"svcard-goods-answer/1\n"                  # authentication -> device
WRITTEN = b"svcard-goods-written/1\n"                # device -> authentication
RELAYED_WRITTEN = b"svcard-goods-relayed-written/1\n"  # authentication -> fulfilment
PICKUP = b"svcard-goods-pickup/1\n"                  # device -> authentication
RELAYED_PICKUP = b"svcard-goods-relayed-pickup/1\n"  # authentication -> fulfilment
REFUND = b"svcard-goods-refund/1\n"                  # fulfilment -> payment -> institution
REFUNDED = b"svcard-goods-refunded/1\n"              # institution -> payment -> fulfilment
# the purse pays (a composite purchase on the card, docs/goods.md "The purse pays")
PURSE_DEBIT = b"svcard-goods-purse-debit/1\n"        # device -> authentication
RELAYED_PURSE_DEBIT = b"svcard-goods-relayed-purse-debit/1\n"   # authentication -> payment
PURSE_GOOD = b"svcard-goods-purse-good/1\n"          # payment -> fulfilment
PURSE_PROOF = b"svcard-goods-purse-proof/1\n"        # device -> authentication
RELAYED_PURSE_PROOF = b"svcard-goods-relayed-purse-proof/1\n"   # authentication -> payment
PURSE_PAID = b"svcard-goods-purse-paid/1\n"          # payment -> fulfilment


class MessageError(Refused):
    """A message that is not well formed: 400, naming the field."""

    def __init__(self, reason: str) -> None:
        super().__init__(400, 400, reason)


# --- keys and signatures (the mechanics are protocols/signatures.py) ------------------------
def new_key() -> bytes:
    """A fresh Ed25519 private key, raw 32 bytes."""
    return signatures.new_pair()[0]


def device_id(public: bytes) -> str:
    return hashlib.sha256(b"svcard-goods-device\n" + public).hexdigest()[:32]


# --- the PIN, sealed for the financial institution ------------------------------------------
def _seal_private(private: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(
        hashlib.sha256(b"svcard-goods-seal\n" + private).digest())


def seal_public_of(private: bytes) -> bytes:
    """The institution's sealing key (X25519, derived from its signing key), for devices."""
    return _seal_private(private).public_key().public_bytes_raw()


def _aead_key(shared: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, None, b"svcard-goods-pin/1").derive(shared)


def seal_pin(seal_public: bytes, pin: str, order: str, card: str) -> str:
    """The PIN sealed for the institution (hex: ephemeral key 32, nonce 12, ciphertext)."""
    eph = X25519PrivateKey.generate()
    shared = eph.exchange(X25519PublicKey.from_public_bytes(seal_public))
    nonce = os.urandom(12)
    sealed = AESGCM(_aead_key(shared)).encrypt(nonce, pin.encode(), f"{order}|{card}".encode())
    return (eph.public_key().public_bytes_raw() + nonce + sealed).hex()


def open_pin(private: bytes, sealed_hex: str, order: str, card: str) -> str | None:
    """The PIN, or None if the seal does not open (another order or card, or altered)."""
    try:
        raw = bytes.fromhex(sealed_hex)
        eph, nonce, body = raw[:32], raw[32:44], raw[44:]
        shared = _seal_private(private).exchange(X25519PublicKey.from_public_bytes(eph))
        pin = AESGCM(_aead_key(shared)).decrypt(nonce, body, f"{order}|{card}".encode())
        return pin.decode("ascii")
    except (ValueError, InvalidTag, UnicodeDecodeError):
        return None


# --- fields --------------------------------------------------------------------------------
Checker = Callable[[Any], bool]


def pattern(p: str) -> Checker:
    compiled = re.compile(p)
    return lambda v: isinstance(v, str) and compiled.fullmatch(v) is not None


def integer(low: int, high: int) -> Checker:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def text(most: int) -> Checker:
    return lambda v: isinstance(v, str) and 1 <= len(v) <= most and v.isprintable()


IDENT = pattern(r"[A-Za-z0-9_.-]{1,32}")
ORDER = pattern(r"[0-9a-f]{32}")
DEVICE = ORDER
KEY = pattern(r"[0-9a-f]{64}")
SERIAL = pattern(r"[0-9A-F]{20}")
ISSUER = pattern(r"[0-9A-F]{16}")
RECORD = pattern(r"[0-9A-F]{80}")
CHALLENGE = pattern(r"[0-9A-F]{8}|[0-9A-F]{16}")
CHALLENGE_OR_NONE = pattern(r"|[0-9A-F]{8}|[0-9A-F]{16}")
APDU = pattern(r"[0-9A-F]{10,600}")
SEALED = pattern(r"[0-9a-f]{120,200}")
SIGNATURE_HEX = pattern(r"[0-9a-f]{128}")
# the goods a card holds, each its issuer id and good id (16 bytes, 32 hex digits): a card
# holds up to MAX_HELD (the four goods files the device reads, 254 records each); sent as one
# string of the keys one after another (a JSON list of that many would pass MAX_JSON_ITEMS);
# a list of at most 64 keys (the first form) is still taken
MAX_HELD = 4 * 254
GOOD_KEYS: Checker = lambda v: (   # noqa: E731
    (isinstance(v, str) and len(v) <= 32 * MAX_HELD and len(v) % 32 == 0
     and re.fullmatch(r"[0-9A-F]*", v) is not None)
    or (isinstance(v, list) and len(v) <= 64 and all(pattern(r"[0-9A-F]{32}")(x) for x in v)))
PICKUP_MESSAGE = 32 * MAX_HELD + 1024   # bytes of a pick-up (its held goods), this route only


def held_keys(value: str | list[str]) -> set[str]:
    """The keys of a checked ``held`` field, either form."""
    if isinstance(value, list):
        return set(value)
    return {value[i:i + 32] for i in range(0, len(value), 32)}
INNER: Checker = lambda v: isinstance(v, str) and 2 <= len(v) <= 4096    # noqa: E731
TERMINAL_OR_NONE = pattern(r"|[0-9A-F]{12}")   # a PSAM's terminal id ("": no purse payments)
INIT_ANSWER = pattern(r"[0-9A-F]{30}")           # the card's INITIALIZE FOR CAPP answer
UID = pattern(r"|[0-9A-F]{18}")
RANDOM = pattern(r"[0-9A-F]{8}")
MAC = RANDOM                                     # a 4-byte MAC2 or TAC
COUNTER = integer(0, 0xFFFF)
AMOUNT = integer(1, 2**40)
CURRENCY = integer(1, 999)
SECONDS = integer(1, 2**40)
SW = integer(0, 0xFFFF)
BOOL: Checker = lambda v: isinstance(v, bool)                            # noqa: E731


def parse(body: bytes, fields: Mapping[str, Checker], what: str,
          limit: int = MAX_MESSAGE) -> dict[str, Any]:
    """The message's fields: a JSON object with exactly ``fields``, each passing its checker;
    at most ``limit`` bytes (:data:`MAX_MESSAGE` but for a pick-up)."""
    if len(body) > limit:
        raise Refused(413, 413, f"{what}: more than {limit} bytes")
    check_json_shape(body)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise MessageError(f"{what}: not JSON") from None
    if not isinstance(data, dict):
        raise MessageError(f"{what}: not a JSON object")
    for name in data:
        if name not in fields:
            raise MessageError(f"{what}: unknown field {str(name)[:32]!r}")
    for name, ok in fields.items():
        if name not in data:
            raise MessageError(f"{what}: no field {name!r}")
        if not ok(data[name]):
            raise MessageError(f"{what}: field {name!r} is not valid")
    return data


def canonical_load(body: bytes, limit: int = MAX_MESSAGE) -> dict[str, Any]:
    """A peer's signed answer as a dict (ValueError if it is not a JSON object of at most
    ``limit`` bytes, bounded in depth)."""
    if len(body) > limit:
        raise ValueError("too long")
    try:
        check_json_shape(body)
        data = json.loads(body)
    except (Refused, RecursionError):
        raise ValueError("not bounded JSON") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data
