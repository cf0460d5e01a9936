"""BER-TLV (ISO/IEC 8825-1 as used by ISO 7816-4 and EMV): parse and build.

Tags keep their encoded form as an integer (``0x6F``, ``0x9F0C``, ``0xBF0C``). Lengths use the
short form below 128 and the 81/82/83 long forms above. Parsing is strict: a truncated tag,
length or value raises :class:`TLVError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple


class TLVError(ValueError):
    """Bytes that are not valid BER-TLV."""


class TLV(NamedTuple):
    """One data object: the encoded tag as an integer, and the value bytes."""

    tag: int
    value: bytes

    @property
    def constructed(self) -> bool:
        first = self.tag >> (8 * (tag_size(self.tag) - 1))
        return bool(first & 0x20)

    def children(self) -> list[TLV]:
        if not self.constructed:
            raise TLVError(f"tag {self.tag:X} is primitive and has no children")
        return parse(self.value)

    def __bytes__(self) -> bytes:
        return build(self.tag, self.value)


def tag_size(tag: int) -> int:
    return max(1, (tag.bit_length() + 7) // 8)


def encode_length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n <= 0xFF:
        return b"\x81" + bytes((n,))
    if n <= 0xFFFF:
        return b"\x82" + n.to_bytes(2, "big")
    if n <= 0xFFFFFF:
        return b"\x83" + n.to_bytes(3, "big")
    raise TLVError(f"length {n} is too long for this encoder")


def build(tag: int, value: bytes | Iterable[TLV]) -> bytes:
    """Encode one TLV; a constructed value may be given as child TLVs."""
    body = value if isinstance(value, bytes | bytearray) else b"".join(bytes(c) for c in value)
    return tag.to_bytes(tag_size(tag), "big") + encode_length(len(body)) + bytes(body)


def _read(data: bytes, pos: int) -> tuple[TLV, int]:
    end = len(data)
    start = pos
    first = data[pos]
    pos += 1
    if first & 0x1F == 0x1F:
        while True:
            if pos >= end:
                raise TLVError(f"tag starting at offset {start} is truncated")
            b = data[pos]
            pos += 1
            if not b & 0x80:
                break
            if pos - start > 4:
                raise TLVError(f"tag at offset {start} is longer than 4 bytes")
    tag = int.from_bytes(data[start:pos], "big")
    if pos >= end:
        raise TLVError(f"tag {tag:X} has no length")
    lb = data[pos]
    pos += 1
    if lb < 0x80:
        length = lb
    elif lb in (0x81, 0x82, 0x83):
        k = lb & 0x7F
        if pos + k > end:
            raise TLVError(f"length of tag {tag:X} is truncated")
        length = int.from_bytes(data[pos : pos + k], "big")
        pos += k
    else:
        raise TLVError(f"length byte {lb:02X} of tag {tag:X} is not supported")
    if pos + length > end:
        raise TLVError(f"value of tag {tag:X} needs {length} bytes, {end - pos} remain")
    return TLV(tag, bytes(data[pos : pos + length])), pos + length


def iter_parse(data: bytes) -> Iterator[TLV]:
    pos = 0
    while pos < len(data):
        if data[pos] in (0x00, 0xFF):  # padding between TLVs (ISO 7816-4 5.2.2.1)
            pos += 1
            continue
        item, pos = _read(data, pos)
        yield item


def parse(data: bytes) -> list[TLV]:
    """Parse a sequence of TLVs at one level."""
    return list(iter_parse(data))


def find(items: Iterable[TLV], tag: int, *, recursive: bool = True) -> TLV | None:
    """The first TLV with ``tag``, searching constructed children when ``recursive``."""
    for item in items:
        if item.tag == tag:
            return item
        if recursive and item.constructed:
            hit = find(item.children(), tag)
            if hit is not None:
                return hit
    return None
