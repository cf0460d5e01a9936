"""Completing a T=0-style answer inside the reader, so the host above never sees one.

A card that answers ``6Cxx`` says "wrong Le, ask again with Le = xx"; one that answers ``61xx``
says "xx more bytes are waiting, fetch them with GET RESPONSE". :func:`complete` does both for
any reader whose raw transmit is given to it (PC/SC through pcscd, a user's pyscard connection).

The re-sent command is rebuilt with :mod:`svcard.protocols.apdu` (parsed, Le set, encoded
again), so the data of a case-3/case-4 command and the length form of an extended one stay as
they were; only Le changes. A command that parses as no ISO 7816-4 case is not re-sent: its
``6Cxx`` goes up unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

from ..protocols.apdu import SHORT_MAX, APDUFormatError, parse_command
from .base import ReaderError

MAX_CHAINED_RESPONSES = 64
GET_RESPONSE = 0xC0


def with_le(apdu: bytes, le_byte: int) -> bytes | None:
    """``apdu`` with its Le set to what a ``6Cxx`` answer asked (xx = 00 means 256), or None
    when ``apdu`` is no well-formed command."""
    try:
        cmd = parse_command(apdu)
    except APDUFormatError:
        return None
    return bytes(cmd._replace(le=le_byte or SHORT_MAX))


def complete(send: Callable[[bytes], bytes], apdu: bytes, name: str) -> bytes:
    """Send ``apdu`` with ``send`` (which returns data || SW1 SW2), re-send it once on ``6Cxx``
    and follow ``61xx`` with GET RESPONSE until the card has given everything."""
    answer = send(apdu)
    if answer[-2] == 0x6C:
        again = with_le(apdu, answer[-1])
        if again is not None:
            answer = send(again)
    # GET RESPONSE keeps an interindustry command's logical channel; proprietary: CLA 00
    cla = 0x00 if apdu[0] & 0x80 else apdu[0] & 0x03
    data = bytearray()
    for _ in range(MAX_CHAINED_RESPONSES):
        if answer[-2] != 0x61:
            break
        data += answer[:-2]
        answer = send(bytes((cla, GET_RESPONSE, 0x00, 0x00, answer[-1])))
    else:
        raise ReaderError(f"{name}: more than {MAX_CHAINED_RESPONSES} GET RESPONSEs")
    return bytes(data) + answer
