"""PBOC ED/EP purse cryptography: key diversification, session keys, MAC and TAC.

Algorithm id 00 is 2-key triple DES. Every function here takes and returns bytes; keys are
never formatted into messages. The DES primitives come from ``cryptography`` (its
``decrepit`` module: DES is legacy, and the purse standard fixes it).
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, modes

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES

ALGORITHM_3DES = 0x00
ALGORITHMS = ("3des",)   # the algorithm names an issuer file may map algorithm ids to
ZERO_IV = bytes(8)
_ECB = modes.ECB()
_CBC_ZERO = modes.CBC(ZERO_IV)  # mode objects are immutable: one of each serves every call
_FF8 = b"\xff" * 8


class KeyError_(ValueError):
    """A key of the wrong size (the message never contains key bytes)."""


@functools.lru_cache(maxsize=256)
def _tdes_cached(key: bytes) -> TripleDES:
    return _tdes(key)


def _tdes(key: bytes) -> TripleDES:
    if len(key) == 16:
        return TripleDES(key + key[:8])
    if len(key) == 8:
        return TripleDES(key * 3)
    if len(key) == 24:
        return TripleDES(key)
    raise KeyError_(f"a DES key has 8, 16 or 24 bytes, got {len(key)}")


_ECB_CONTEXTS = threading.local()   # per thread: key -> an ECB encryptor kept open
ECB_CONTEXTS_PER_THREAD = 256


def encrypt_ecb(key: bytes, data: bytes) -> bytes:
    """DES (8-byte key) or triple DES (16/24) in ECB mode over whole blocks."""
    if len(data) % 8:
        raise ValueError("ECB data must be whole 8-byte blocks")
    # Long-lived card and master keys: their ECB encryptor is kept open, one per thread (a
    # context is never shared between threads). ECB carries nothing from one block to the
    # next and whole blocks leave update() at once, so an open context encrypts each call's
    # data as a new one would; making one (the key schedule) costs 5x the encryption.
    try:
        contexts: dict[bytes, Any] = _ECB_CONTEXTS.open
    except AttributeError:
        contexts = _ECB_CONTEXTS.open = {}
    enc = contexts.get(key)
    if enc is None:
        if len(contexts) >= ECB_CONTEXTS_PER_THREAD:
            contexts.clear()
        enc = contexts[key] = Cipher(_tdes_cached(key), _ECB).encryptor()
    return bytes(enc.update(data))


def xor(a: bytes, b: bytes) -> bytes:
    if len(a) != len(b):
        raise ValueError("xor of byte strings of different lengths")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def pad80(data: bytes) -> bytes:
    """ISO 9797-1 method 2: always append 80, then 00 up to a whole block."""
    padded = data + b"\x80"
    return padded + bytes(-len(padded) % 8)


def cbc_mac(key: bytes, data: bytes, *, size: int = 4) -> bytes:
    """CBC-MAC with a zero ICV over ``pad80(data)``; the first ``size`` bytes of the last block.

    An 8-byte key gives the single-DES MAC of the purse; a 16-byte key the triple-DES one.
    """
    enc = Cipher(_tdes(key), _CBC_ZERO).encryptor()
    out = enc.update(pad80(data))
    return out[-8 : -8 + size] if size < 8 else out[-8:]


def cbc_macs_same_key(key: bytes, messages: list[bytes], *, size: int = 4) -> list[bytes]:
    """``cbc_mac(key, m)`` for many messages of one length under one key, computed column by
    column: block j of every message goes through the cipher in one ECB call (clearing checks
    thousands of TACs of the same card this way)."""
    if not messages:
        return []
    padded = [pad80(m) for m in messages]
    length = len(padded[0])
    if any(len(p) != length for p in padded):
        raise ValueError("cbc_macs_same_key needs messages of one length")
    count = len(padded)
    enc = Cipher(_tdes(key), _ECB).encryptor()
    state = 0
    for j in range(0, length, 8):
        column = int.from_bytes(b"".join(p[j:j + 8] for p in padded), "big")
        state = int.from_bytes(enc.update((state ^ column).to_bytes(8 * count, "big")), "big")
    out = state.to_bytes(8 * count, "big")
    return [out[8 * i:8 * i + size] for i in range(count)]


def retail_mac(key: bytes, data: bytes, *, size: int = 4, iv: bytes = ZERO_IV) -> bytes:
    """ISO 9797-1 MAC algorithm 3 (the "retail MAC") with padding method 2 and an ICV (zero
    unless ``iv`` is given): a single-DES CBC chain under the key's left half, then the last
    block decrypted under the right half and encrypted again under the left; the first
    ``size`` bytes."""
    if len(key) != 16:
        raise KeyError_("a retail MAC key has 16 bytes")
    left, right = key[:8], key[8:]
    mode = _CBC_ZERO if iv == ZERO_IV else modes.CBC(iv)
    chain = Cipher(_tdes(left), mode).encryptor().update(pad80(data))[-8:]
    middle = Cipher(_tdes(right), _ECB).decryptor().update(chain)
    return Cipher(_tdes(left), _ECB).encryptor().update(middle)[:size]


def diversify(master: bytes, factor: bytes) -> bytes:
    """Card key from an issuer master key: 3DES_MK(D) || 3DES_MK(D xor FF..FF), D = 8 bytes."""
    if len(factor) != 8:
        raise ValueError(f"a diversification factor has 8 bytes, got {len(factor)}")
    return encrypt_ecb(master, factor + xor(factor, _FF8))


def diversification_factor(app_serial: bytes) -> bytes:
    """The rightmost 8 bytes of the application serial number."""
    if len(app_serial) < 8:
        raise ValueError("an application serial has at least 8 bytes")
    return app_serial[-8:]


def card_key(master: bytes, app_serial: bytes, issuer_id: bytes | None = None) -> bytes:
    """A card's key: one level (by serial), or two (by issuer id, then by serial)."""
    key = master
    if issuer_id is not None:
        key = diversify(key, issuer_id[-8:])
    return diversify(key, diversification_factor(app_serial))


def load_session_key(dlk: bytes, random: bytes, online_counter: int) -> bytes:
    """Load (and unload) session key: 3DES_DLK(random 4 || online counter 2 || 80 00)."""
    return encrypt_ecb(dlk, random + online_counter.to_bytes(2, "big") + b"\x80\x00")


def purchase_session_key(dpk: bytes, random: bytes, offline_counter: int,
                         terminal_txn_number: int) -> bytes:
    """Purchase session key: 3DES_DPK(random 4 || offline counter 2 || TTN's last 2 bytes)."""
    block = (random + offline_counter.to_bytes(2, "big")
             + (terminal_txn_number & 0xFFFF).to_bytes(2, "big"))
    return encrypt_ecb(dpk, block)


def mac(session_key: bytes, data: bytes) -> bytes:
    """The purse MAC: single-DES CBC under an 8-byte session key, 4 bytes."""
    if len(session_key) != 8:
        raise KeyError_("a purse session key has 8 bytes")
    return cbc_mac(session_key, data)


def tac_key(dtk: bytes) -> bytes:
    if len(dtk) != 16:
        raise KeyError_("a TAC key has 16 bytes")
    return xor(dtk[:8], dtk[8:])


def tac(dtk: bytes, data: bytes) -> bytes:
    """Transaction authentication code: the purse MAC keyed with DTK left xor right."""
    return cbc_mac(tac_key(dtk), data)


# MAC inputs, in one place, so card, PSAM and HSM agree byte for byte.

def u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def load_mac1_input(balance: int, amount: int, txn_type: int, terminal_id: bytes) -> bytes:
    return u32(balance) + u32(amount) + bytes((txn_type,)) + terminal_id


def load_mac2_input(amount: int, txn_type: int, terminal_id: bytes, date: bytes,
                    time: bytes) -> bytes:
    return u32(amount) + bytes((txn_type,)) + terminal_id + date + time


def load_tac_input(balance_after: int, online_counter: int, amount: int, txn_type: int,
                   terminal_id: bytes, date: bytes, time: bytes) -> bytes:
    return (u32(balance_after) + online_counter.to_bytes(2, "big") + u32(amount)
            + bytes((txn_type,)) + terminal_id + date + time)


def purchase_mac1_input(amount: int, txn_type: int, terminal_id: bytes, date: bytes,
                        time: bytes) -> bytes:
    return u32(amount) + bytes((txn_type,)) + terminal_id + date + time


def purchase_mac2_input(amount: int) -> bytes:
    return u32(amount)


def purchase_tac_input(amount: int, txn_type: int, terminal_id: bytes, terminal_txn_number: int,
                       date: bytes, time: bytes) -> bytes:
    return (u32(amount) + bytes((txn_type,)) + terminal_id + u32(terminal_txn_number)
            + date + time)


# Unload and overdraft-limit update (PBOC ED; session keys as for loads, with the unload key
# DULK or the update key DUK). The card answers MAC3 to an unload and a TAC to an update.

def u24(value: int) -> bytes:
    return value.to_bytes(3, "big")


def unload_mac1_input(balance: int, amount: int, txn_type: int, terminal_id: bytes) -> bytes:
    return u32(balance) + u32(amount) + bytes((txn_type,)) + terminal_id


def unload_mac2_input(amount: int, txn_type: int, terminal_id: bytes, date: bytes,
                      time: bytes) -> bytes:
    return u32(amount) + bytes((txn_type,)) + terminal_id + date + time


def unload_mac3_input(balance_after: int, online_counter: int, amount: int, txn_type: int,
                      terminal_id: bytes, date: bytes, time: bytes) -> bytes:
    return (u32(balance_after) + online_counter.to_bytes(2, "big") + u32(amount)
            + bytes((txn_type,)) + terminal_id + date + time)


def update_mac1_input(balance: int, old_limit: int, txn_type: int, terminal_id: bytes) -> bytes:
    return u32(balance) + u24(old_limit) + bytes((txn_type,)) + terminal_id


def update_mac2_input(new_limit: int, txn_type: int, terminal_id: bytes, date: bytes,
                      time: bytes) -> bytes:
    return u24(new_limit) + bytes((txn_type,)) + terminal_id + date + time


def update_tac_input(balance_after: int, online_counter: int, new_limit: int, txn_type: int,
                     terminal_id: bytes, date: bytes, time: bytes) -> bytes:
    return (u32(balance_after) + online_counter.to_bytes(2, "big") + u24(new_limit)
            + bytes((txn_type,)) + terminal_id + date + time)


# Secure messaging (PBOC / ISO 7816-4 with CLA 04): a record write onto the card carries a
# 4-byte MAC over its own header and data, chained from the card's GET CHALLENGE answer.

SM_MAC_SIZE = 4


def secure_messaging_input(cla: int, ins: int, p1: int, p2: int, data: bytes) -> bytes:
    """What a secure-messaging MAC covers: CLA INS P1 P2, then Lc as sent (the data's length
    plus the 4 MAC bytes), then the data without the MAC."""
    lc = len(data) + SM_MAC_SIZE
    if lc > 255:
        raise ValueError("a secure-messaging command has at most 251 bytes of data")
    return bytes((cla, ins, p1, p2, lc)) + data


def secure_messaging_mac(key: bytes, challenge: bytes, command: bytes) -> bytes:
    """The 4-byte MAC of a secure-messaging command (``command`` from
    :func:`secure_messaging_input`): ISO 9797-1 padding method 2; the ICV is the card's
    challenge (4 or 8 bytes) followed by zeros up to 8 bytes; a 16-byte key chains single DES
    under its left half and finishes the last block with triple DES (the retail MAC), an 8-byte
    key is single-DES CBC throughout."""
    if len(challenge) not in (4, 8):
        raise ValueError(f"a card challenge has 4 or 8 bytes, got {len(challenge)}")
    iv = challenge + bytes(8 - len(challenge))
    if len(key) == 16:
        return retail_mac(key, command, iv=iv)
    if len(key) == 8:
        return Cipher(_tdes(key), modes.CBC(iv)).encryptor().update(pad80(command))[-8:][:4]
    raise KeyError_("a secure-messaging key has 8 or 16 bytes")


def capp_update_icv(random: bytes, counter: int) -> bytes:
    """The ICV of a MAC'd UPDATE CAPP DATA CACHE (``84 DE``): the random INITIALIZE FOR CAPP
    PURCHASE answered (4 bytes), ``00 00``, then the offline counter it answered (2 bytes).
    PBOC's extended application uses six zero bytes and the card's ATC; an ED/EP counter only
    moves on a completed DEBIT, so svcard adds the session's random to tie the MAC to it."""
    if len(random) != 4 or not 0 <= counter <= 0xFFFF:
        raise ValueError("a CAPP session has a 4-byte random and a 2-byte counter")
    return random + b"\x00\x00" + counter.to_bytes(2, "big")


def capp_update_mac(key: bytes, random: bytes, counter: int, p1: int, p2: int,
                    record: bytes) -> bytes:
    """The 4-byte MAC of ``84 DE P1 P2 Lc record``: :func:`secure_messaging_mac` over
    :func:`secure_messaging_input` with :func:`capp_update_icv` as the ICV."""
    return secure_messaging_mac(key, capp_update_icv(random, counter),
                                secure_messaging_input(0x84, 0xDE, p1, p2, record))
