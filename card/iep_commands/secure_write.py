"""Goods written onto the purse by secure messaging: GET CHALLENGE (``00 84``), UPDATE RECORD
(``04 DC``) and APPEND RECORD (``04 E2``) on the goods record files (:mod:`svcard.card.goods`).

This is how a good paid for outside the purse (a bank account, seed 000) reaches the card: the
fulfilment server's key service holds the card's *goods key* and computes the MAC, the device
in between only relays the APDU, so it can neither forge, alter nor replay a good.

- GET CHALLENGE ``00 84 00 00 04`` (or ``08``) answers a fresh random of Le bytes. It serves the
  very next command only: any other command, a reselection or a reset throws it away, and the
  write that uses it uses it up, whatever the write's answer.
- UPDATE RECORD ``04 DC P1 P2 Lc record || MAC`` writes a record (P2 = SFI << 3 | mode: ``100``
  P1 is a record number, ``000`` P1 is a tag: the record of the same good, or the first
  empty one); APPEND RECORD ``04 E2 00 P2 Lc record || MAC`` (P2 = SFI << 3) writes the first
  empty record. Lc counts the 4 MAC bytes.
- The MAC (:func:`svcard.protocols.crypto.secure_messaging_mac`) covers CLA INS P1 P2 Lc and the
  record, padded ``80 00..``, with the challenge followed by zeros as the ICV, under the goods
  key (retail MAC with a 16-byte key).

Checks, in order: P1/P2 (``6A86``), a record and a MAC in the data, short Lc (``6700``); the
card has a goods key (``6982``), not locked (``6983``); a challenge was asked for just before
(``6985``); the MAC (``6988``, ISO 7816-4 "incorrect secure messaging data objects", the answer
PBOC issuer-script writes give; the wrong MAC is counted against the goods key, in the image,
before the card answers, as the purse keys' ``9302`` is); then the goods file's own checks
(:meth:`~svcard.card.goods.GoodsFiles.check_write`: file, length, record number, tag, layout;
``6A84`` for an append to a full file). A tag-mode write of a good the card holds in a state
its use led to (not valid any more, or a transit token with fewer rides) keeps the card's
record and answers ``9000``: a late or replayed delivery restores nothing. Only then is the
record written: the record and the goods key's failure counter back at 0 in one atomic image
write, so a power cut leaves the old record or the new one. A plain ``00 DC`` / ``00 E2``
answers ``6982``: goods files are written with secure messaging only.
"""

from __future__ import annotations

import hmac
import os
from typing import TYPE_CHECKING

from ...protocols import crypto
from ...protocols import goods as G
from ...protocols import sw as SW
from ...protocols.apdu import CommandAPDU
from ..runtime import CardError
from .lockout import KEY_LOCKED, KIND_GOODS, count_failure

if TYPE_CHECKING:
    from ..iep import Iep

CLA_SM = 0x04                  # ISO 7816-4: proprietary secure messaging, header authenticated
INS_GET_CHALLENGE = 0x84
INS_UPDATE_RECORD = 0xDC
INS_APPEND_RECORD = 0xE2
SM_DATA_INCORRECT = 0x6988     # ISO 7816-4: incorrect secure messaging data objects
CHALLENGE_SIZES = (4, 8)


def get_challenge(iep: Iep, cmd: CommandAPDU) -> bytes:
    """GET CHALLENGE: a fresh random (never the image's ``fixed_random``: a repeated challenge
    would let a write be replayed), kept for the next command."""
    if cmd.p1 or cmd.p2:
        raise CardError(SW.WRONG_P1P2)
    if cmd.data or cmd.le not in CHALLENGE_SIZES:
        raise CardError(SW.WRONG_LENGTH)
    challenge = os.urandom(cmd.le)
    iep.challenge = challenge
    return challenge


def update_record(iep: Iep, cmd: CommandAPDU) -> bytes:
    """UPDATE RECORD with secure messaging: one goods record, by number or by tag."""
    return _write(iep, cmd, append=False)


def append_record(iep: Iep, cmd: CommandAPDU) -> bytes:
    """APPEND RECORD with secure messaging: the first empty record of the file."""
    return _write(iep, cmd, append=True)


def plain_write(iep: Iep, cmd: CommandAPDU) -> bytes:
    """``00 DC`` / ``00 E2``: goods are written with secure messaging only."""
    raise CardError(SW.SECURITY_STATUS)


def _write(iep: Iep, cmd: CommandAPDU, *, append: bool) -> bytes:
    challenge = iep.take_challenge()   # used up by this command, whatever it answers
    sfi, mode = cmd.p2 >> 3, cmd.p2 & 0x07
    if append and (cmd.p1 != 0 or mode != 0):
        raise CardError(SW.WRONG_P1P2)
    if not append and mode not in (G.MODE_RECORD, G.MODE_TAG):
        raise CardError(SW.WRONG_P1P2)
    if cmd.extended or len(cmd.data) <= crypto.SM_MAC_SIZE:
        raise CardError(SW.WRONG_LENGTH)
    state = iep.state
    key = state.goods_key
    if key is None:
        raise CardError(SW.SECURITY_STATUS)
    if state.goods_mac_failures.get(key.index, 0) >= state.mac_failure_limit:
        raise CardError(KEY_LOCKED)
    if challenge is None:
        raise CardError(SW.CONDITIONS_NOT_SATISFIED)
    record, mac = cmd.data[:-crypto.SM_MAC_SIZE], cmd.data[-crypto.SM_MAC_SIZE:]
    expected = crypto.secure_messaging_mac(key.key, challenge, crypto.secure_messaging_input(
        cmd.cla, cmd.ins, cmd.p1, cmd.p2, record))
    if not hmac.compare_digest(expected, mac):
        count_failure(iep, KIND_GOODS, key)
        raise CardError(SM_DATA_INCORRECT)
    goods = state.goods
    if append:
        number = goods.find(sfi, G.TAG_EMPTY)
        if number is None:
            raise CardError(_FILE_FULL)
        number = goods.check_write(sfi, number, G.MODE_RECORD, record)
    else:
        number = goods.check_write(sfi, cmd.p1, mode, record)
        if mode == G.MODE_TAG and _used_since(goods.read(sfi, number), record):
            # delivered before and used since: a late or replayed delivery keeps the card's
            # record (a device could otherwise win back a ride or a used ticket by saying the
            # first write never landed); the right MAC still clears the failure count
            if state.goods_mac_failures.pop(key.index, None):
                iep.persist()
            return b""
    state.goods_mac_failures.pop(key.index, None)   # written with the record, below
    iep.write_goods(((sfi, number, record),))
    return b""


def _used_since(held: bytes, record: bytes) -> bool:
    """Whether ``held`` is the good ``record`` delivers, in a state its use led to: no longer
    valid (used, expired, void), or a transit token with fewer rides left."""
    if held[0] != record[0] or held[G.GOOD_KEY] != record[G.GOOD_KEY]:
        return False
    if held[1] != G.STATUS_VALID:
        return True
    return held[0] == G.TAG_TRANSIT and held[26:28] < record[26:28]


_FILE_FULL = 0x6A84   # ISO 7816-4: not enough memory space in the file
