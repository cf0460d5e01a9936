"""The FIG. 9 encryption layer: per-transaction derived keys, TSK/ETSK, sealed messages.

* The merchant and the payment server share a 32-byte key. For each transaction both derive
  ``DK = HKDF-SHA256(shared, salt=txn id, info="svcard derived key v1" || merchant id)``.
* The merchant makes a random 32-byte transaction session key (TSK) and seals it, with the
  order's amount, currency and confirmation variant, under DK: the ETSK. The client gets both;
  it can read the TSK but cannot change the order without breaking the ETSK.
* Messages between client and payment server are sealed with the TSK; "debit result M" (and
  FIG. 8's expected card MAC2) with DK, so only the merchant can open them.

Sealing is AES-256-GCM with a random 96-bit nonce, the nonce first; the associated data binds a
sealed blob to its purpose, merchant and transaction, so nothing can be moved between them.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16


class SealError(ValueError):
    """A sealed blob that does not open: wrong key, wrong purpose, or tampered with."""


def derive_key(shared_key: bytes, merchant_id: bytes, txn_id: bytes) -> bytes:
    if len(shared_key) != KEY_SIZE:
        raise ValueError("a merchant's shared key has 32 bytes")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=txn_id,
                info=b"svcard derived key v1" + merchant_id)
    return hkdf.derive(shared_key)


def new_key() -> bytes:
    return os.urandom(KEY_SIZE)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes, what: str) -> bytes:
    if len(blob) < NONCE_SIZE + TAG_SIZE:
        raise SealError(f"{what} is too short to be sealed")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], aad)
    except InvalidTag:
        raise SealError(f"{what} does not open: tampered with, or not for this "
                        "transaction") from None
