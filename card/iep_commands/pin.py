"""The IEP's PIN: VERIFY (which opens the ED passbook until the purse is deselected) and CHANGE
PIN. A wrong PIN costs a try, written before the card answers; no tries left blocks the PIN
(``6983``). PIN reload and unblock, when they come, go here too.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from ...protocols import sw as SW
from ...protocols.apdu import CommandAPDU
from ..runtime import CardError

if TYPE_CHECKING:
    from ..iep import Iep


def encode_pin(pin: str) -> bytes:
    """A PIN of 4..12 digits as BCD, an odd count padded with F."""
    if not (pin.isdigit() and 4 <= len(pin) <= 12):
        raise ValueError("a PIN has 4 to 12 digits")
    text = pin + ("F" if len(pin) % 2 else "")
    return bytes.fromhex(text)


def check_pin(iep: Iep, candidate: bytes) -> None:
    """Compare ``candidate`` (BCD) with the PIN: a match restores the tries and opens the ED;
    a mismatch costs a try and answers ``63Cx`` (x tries left), or ``6983`` at the last."""
    s = iep.state
    if s.pin is None:
        raise CardError(SW.CONDITIONS_NOT_SATISFIED)
    if s.pin_tries_left <= 0:
        raise CardError(SW.PIN_BLOCKED)
    if hmac.compare_digest(candidate, encode_pin(s.pin)):
        if s.pin_tries_left != s.pin_try_limit:
            s.pin_tries_left = s.pin_try_limit
            iep.persist()
        iep.pin_ok = True
        return
    s.pin_tries_left -= 1
    iep.pin_ok = False
    iep.persist()
    if s.pin_tries_left == 0:
        raise CardError(SW.PIN_BLOCKED)
    raise CardError(0x63C0 | s.pin_tries_left)


def verify(iep: Iep, cmd: CommandAPDU) -> bytes:
    """VERIFY ``00 20 00 00``: with a PIN, check it; with no data, tell the tries left."""
    if cmd.p1 != 0 or cmd.p2 != 0:
        raise CardError(SW.WRONG_P1P2)
    s = iep.state
    if not cmd.data:  # ask for the retry counter
        if s.pin_tries_left <= 0:
            raise CardError(SW.PIN_BLOCKED)
        if iep.pin_ok:
            return b""
        raise CardError(0x63C0 | s.pin_tries_left)
    if not 2 <= len(cmd.data) <= 6:
        raise CardError(SW.WRONG_LENGTH)
    check_pin(iep, cmd.data)
    return b""


def change_pin(iep: Iep, cmd: CommandAPDU) -> bytes:
    """CHANGE PIN (80 5E 01 00): old PIN || FF || new PIN, both BCD."""
    if cmd.p1 != 0x01 or cmd.p2 != 0x00:
        raise CardError(SW.WRONG_P1P2)
    old, sep, new = cmd.data.partition(b"\xff")
    if not sep or not 2 <= len(old) <= 6 or not 2 <= len(new) <= 6:
        raise CardError(SW.WRONG_LENGTH)
    text = new.hex().upper().rstrip("F")
    if not (text.isdigit() and 4 <= len(text) <= 12):
        raise CardError(SW.INCORRECT_DATA)
    check_pin(iep, old)
    iep.state.pin = text
    iep.persist()
    return b""
