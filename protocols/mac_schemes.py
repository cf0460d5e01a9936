"""MAC-scheme profiles: how one issuer's purses make their session keys and MACs.

The card (IEP), the PSAM and the load HSM all compute purchase and load MACs through this
module, each with the profile its issuer names, so the three agree byte for byte. A profile
fixes three things of the purchase (loads, unloads and the TAC are the same in every profile
known so far):

* the purchase session key (``purchase_session_key``),
* the MAC algorithm under it (MAC1 and MAC2),
* extra MAC1 data: how many bytes of the card's UID follow the PBOC MAC1 input.

Profiles (see docs/protocol.md, "MAC-scheme profiles"):

``pboc``
    PBOC ED/EP as svcard always did: an 8-byte session key
    ``3DES_DPK(random 4 || offline counter 2 || TTN's last 2 bytes)``, single-DES CBC-MAC with
    ISO 9797-1 padding method 2, no extra MAC1 data.

``changsha-metro``
    The purse of a published Changsha metro card applet (GitHub ConardLKL/ChangSha, read at
    commit 2c2754fc5d33feb43435840e8de2e68a0e2c92d6): the same 8-byte block padded to two
    blocks (``|| 80 00 00 00 00 00 00 00``) and enciphered under DPK in ECB mode gives a
    16-byte session key; MAC1 and MAC2 are ISO 9797-1 MAC algorithm 3 (retail MAC) under it;
    MAC1's input is PBOC's followed by the card's 9-byte UID (the code the card answers to
    ``80 CA 00 00 09``). Its loads and TACs are PBOC's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import crypto

DEFAULT = "pboc"


def _pboc_purchase_key(dpk: bytes, random: bytes, offline_counter: int, ttn: int) -> bytes:
    return crypto.purchase_session_key(dpk, random, offline_counter, ttn)


def _padded_purchase_key(dpk: bytes, random: bytes, offline_counter: int, ttn: int) -> bytes:
    block = random + offline_counter.to_bytes(2, "big") + (ttn & 0xFFFF).to_bytes(2, "big")
    return crypto.encrypt_ecb(dpk, crypto.pad80(block))


@dataclass(frozen=True, slots=True)
class MacScheme:
    """One named profile: the purchase session key, the MAC under it, and the extra MAC1
    data (``uid_size`` bytes of card UID, 0 for none)."""

    name: str
    summary: str
    purchase_key: Callable[[bytes, bytes, int, int], bytes]
    purchase_mac: Callable[[bytes, bytes], bytes]
    uid_size: int = 0


SCHEMES: dict[str, MacScheme] = {
    "pboc": MacScheme(
        "pboc", "PBOC: 8-byte session key, single-DES CBC-MAC", _pboc_purchase_key,
        crypto.mac),
    "changsha-metro": MacScheme(
        "changsha-metro", "Changsha metro: 16-byte session key, retail MAC, 9-byte UID in MAC1",
        _padded_purchase_key, crypto.retail_mac, uid_size=9),
}
NAMES = tuple(SCHEMES)


class SchemeError(ValueError):
    """An unknown profile name, or a UID of the wrong size for the profile."""


def scheme(name: str) -> MacScheme:
    """The profile called ``name``."""
    found = SCHEMES.get(name)
    if found is None:
        raise SchemeError(f"unknown MAC scheme {name!r} (known: {', '.join(NAMES)})")
    return found


def check_uid(s: MacScheme, uid: bytes | None) -> bytes:
    """The UID the profile's MAC1 takes (empty for none); a missing or wrong-sized one is a
    :class:`SchemeError`."""
    got = uid or b""
    if len(got) != s.uid_size:
        raise SchemeError(f"the {s.name} scheme takes a {s.uid_size}-byte card UID in MAC1, "
                          f"got {len(got)} bytes")
    return got


# --- purchase -----------------------------------------------------------------------------

def purchase_session_key(s: MacScheme, dpk: bytes, random: bytes, offline_counter: int,
                         ttn: int) -> bytes:
    return s.purchase_key(dpk, random, offline_counter, ttn)


def purchase_mac1(s: MacScheme, session_key: bytes, amount: int, txn_type: int,
                  terminal_id: bytes, date: bytes, time: bytes, uid: bytes | None) -> bytes:
    """MAC1 of DEBIT FOR PURCHASE (made by the PSAM, checked by the card)."""
    data = crypto.purchase_mac1_input(amount, txn_type, terminal_id, date, time)
    return s.purchase_mac(session_key, data + check_uid(s, uid))


def purchase_mac2(s: MacScheme, session_key: bytes, amount: int) -> bytes:
    """MAC2 of the DEBIT answer (made by the card, checked by the PSAM)."""
    return s.purchase_mac(session_key, crypto.purchase_mac2_input(amount))


# --- load (the same in every profile so far) ------------------------------------------------

def load_session_key(s: MacScheme, dlk: bytes, random: bytes, online_counter: int) -> bytes:
    return crypto.load_session_key(dlk, random, online_counter)


def load_mac1(s: MacScheme, session_key: bytes, balance: int, amount: int, txn_type: int,
              terminal_id: bytes) -> bytes:
    """S1: MAC1 of INITIALIZE FOR LOAD (made by the card, checked by the HSM)."""
    return crypto.mac(session_key, crypto.load_mac1_input(balance, amount, txn_type,
                                                          terminal_id))


def load_mac2(s: MacScheme, session_key: bytes, amount: int, txn_type: int,
              terminal_id: bytes, date: bytes, time: bytes) -> bytes:
    """S2: MAC2 of CREDIT FOR LOAD (made by the HSM, checked by the card)."""
    return crypto.mac(session_key, crypto.load_mac2_input(amount, txn_type, terminal_id, date,
                                                          time))
