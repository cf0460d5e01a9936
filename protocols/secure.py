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

A payment server derives the same DK at every step of a transaction (draw, debit response or
proof) and uses one TSK for each request and answer, so the derived keys and the AES-GCM
cipher objects are kept in bounded LRU caches (:data:`CACHE_SIZE` DKs, a quarter as many
ciphers). They hold nothing a server does not hold already (whoever has the shared key can
derive every DK), and nothing in them is ever printed: ``cache_info()`` shows counts only.
"""

from __future__ import annotations

import functools
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


CACHE_SIZE = 4096


def derive_key(shared_key: bytes, merchant_id: bytes, txn_id: bytes) -> bytes:
    if len(shared_key) != KEY_SIZE:
        raise ValueError("a merchant's shared key has 32 bytes")
    if type(shared_key) is bytes and type(merchant_id) is bytes and type(txn_id) is bytes:
        return _derive_cached(shared_key, merchant_id, txn_id)
    return _derive(shared_key, merchant_id, txn_id)


def _derive(shared_key: bytes, merchant_id: bytes, txn_id: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=txn_id,
                info=b"svcard derived key v1" + merchant_id)
    return hkdf.derive(shared_key)


_derive_cached = functools.lru_cache(maxsize=CACHE_SIZE)(_derive)
_cipher_cached = functools.lru_cache(maxsize=CACHE_SIZE // 4)(AESGCM)


def _cipher(key: bytes) -> AESGCM:
    return _cipher_cached(key) if type(key) is bytes else AESGCM(key)


def new_key() -> bytes:
    return os.urandom(KEY_SIZE)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_SIZE)
    return nonce + _cipher(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes, what: str) -> bytes:
    if len(blob) < NONCE_SIZE + TAG_SIZE:
        raise SealError(f"{what} is too short to be sealed")
    try:
        return _cipher(key).decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], aad)
    except InvalidTag:
        raise SealError(f"{what} does not open: tampered with, or not for this "
                        "transaction") from None
