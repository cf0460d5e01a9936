"""ISO/IEC 7816-4 command and response APDUs.

Commands are parsed strictly: every case (1, 2, 3, 4; short and extended length) is
recognised from the byte count alone, and anything that fits none of them raises
:class:`APDUFormatError` with the status word a card answers (6700, wrong length).
"""

from __future__ import annotations

from typing import NamedTuple

from . import sw as SW

SHORT_MAX = 256
EXTENDED_MAX = 65536


class APDUFormatError(ValueError):
    """A byte string that is not a well-formed APDU; ``sw`` is what a card answers."""

    def __init__(self, message: str, sw: int = SW.WRONG_LENGTH) -> None:
        super().__init__(message)
        self.sw = sw


class CommandAPDU(NamedTuple):
    """One command. ``le`` is None when absent; 256 (short) or 65536 (extended) mean 'all'."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    le: int | None = None
    extended: bool = False

    @property
    def case(self) -> int:
        if self.data:
            return 4 if self.le is not None else 3
        return 2 if self.le is not None else 1

    def __bytes__(self) -> bytes:
        return build_command(self.cla, self.ins, self.p1, self.p2, self.data, self.le,
                             extended=self.extended)

    def hex(self) -> str:
        return bytes(self).hex().upper()


def _check_byte(name: str, value: int) -> None:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"{name} must be a byte, got {value}")


def build_command(cla: int, ins: int, p1: int, p2: int, data: bytes = b"",
                  le: int | None = None, *, extended: bool | None = None) -> bytes:
    """Encode a command; extended length is chosen when needed unless ``extended`` says."""
    if not (0 <= cla <= 0xFF and 0 <= ins <= 0xFF and 0 <= p1 <= 0xFF and 0 <= p2 <= 0xFF):
        for name, value in (("CLA", cla), ("INS", ins), ("P1", p1), ("P2", p2)):
            _check_byte(name, value)
    if len(data) > EXTENDED_MAX - 1:
        raise ValueError(f"command data of {len(data)} bytes is longer than 65535")
    if le is not None and not 1 <= le <= EXTENDED_MAX:
        raise ValueError(f"Le must be 1..65536 (256/65536 = all), got {le}")
    need_ext = len(data) > 255 or (le is not None and le > SHORT_MAX)
    ext = need_ext if extended is None else extended
    if need_ext and not ext:
        raise ValueError("data or Le too long for a short APDU")
    out = bytearray((cla, ins, p1, p2))
    if not ext:
        if data:
            out.append(len(data))
            out += data
        if le is not None:
            out.append(le % 256)
        return bytes(out)
    if data:
        out += b"\x00" + len(data).to_bytes(2, "big") + data
        if le is not None:
            out += (le % EXTENDED_MAX).to_bytes(2, "big")
    elif le is not None:
        out += b"\x00" + (le % EXTENDED_MAX).to_bytes(2, "big")
    return bytes(out)


def parse_command(raw: bytes) -> CommandAPDU:
    """Decode a command APDU, refusing any byte count that matches no ISO 7816-4 case."""
    n = len(raw)
    if n < 4:
        raise APDUFormatError(f"a command APDU has at least 4 bytes, got {n}")
    cla, ins, p1, p2 = raw[0], raw[1], raw[2], raw[3]
    if n == 4:
        return CommandAPDU(cla, ins, p1, p2)
    b4 = raw[4]
    if n == 5:
        return CommandAPDU(cla, ins, p1, p2, b"", b4 or SHORT_MAX)
    if b4 != 0:
        lc = b4
        if n == 5 + lc:
            return CommandAPDU(cla, ins, p1, p2, bytes(raw[5:]))
        if n == 6 + lc:
            return CommandAPDU(cla, ins, p1, p2, bytes(raw[5:-1]), raw[-1] or SHORT_MAX)
        raise APDUFormatError(f"Lc={lc} does not match the {n - 5} bytes after the header")
    # b4 == 0 and n > 5: extended length.
    if n < 7:
        raise APDUFormatError("extended length needs two more bytes after the 00 marker")
    two = int.from_bytes(raw[5:7], "big")
    if n == 7:
        return CommandAPDU(cla, ins, p1, p2, b"", two or EXTENDED_MAX, extended=True)
    lc = two
    if lc == 0:
        raise APDUFormatError("extended Lc of 0 followed by more bytes")
    if n == 7 + lc:
        return CommandAPDU(cla, ins, p1, p2, bytes(raw[7:]), extended=True)
    if n == 9 + lc:
        le = int.from_bytes(raw[-2:], "big") or EXTENDED_MAX
        return CommandAPDU(cla, ins, p1, p2, bytes(raw[7:-2]), le, extended=True)
    raise APDUFormatError(f"extended Lc={lc} does not match the {n - 7} bytes after it")


class ResponseAPDU(NamedTuple):
    """One answer: data then the two status bytes."""

    data: bytes
    sw: int

    @property
    def sw1(self) -> int:
        return self.sw >> 8

    @property
    def sw2(self) -> int:
        return self.sw & 0xFF

    @property
    def ok(self) -> bool:
        return self.sw == SW.OK

    def __bytes__(self) -> bytes:
        return self.data + self.sw.to_bytes(2, "big")


def parse_response(raw: bytes) -> ResponseAPDU:
    if len(raw) < 2:
        raise APDUFormatError(f"a response has at least the 2 status bytes, got {len(raw)}")
    return ResponseAPDU(bytes(raw[:-2]), int.from_bytes(raw[-2:], "big"))


def response(data: bytes = b"", sw: int = SW.OK) -> bytes:
    return data + sw.to_bytes(2, "big")
