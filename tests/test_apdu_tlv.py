from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from svcard.protocols import sw as SW
from svcard.protocols import tlv
from svcard.protocols.apdu import (
    APDUFormatError,
    CommandAPDU,
    build_command,
    parse_command,
    parse_response,
)


@pytest.mark.parametrize(("hexstr", "case", "data", "le", "ext"), [
    ("00A40400", 1, "", None, False),
    ("805C000204", 2, "", 4, False),
    ("00B0950000", 2, "", 256, False),
    ("00A4040003A00000", 3, "A00000", None, False),
    ("00A4040003A0000000", 4, "A00000", 256, False),
    ("80500102", 1, "", None, False),
    ("00B00000000100", 2, "", 256, True),
    ("00B00000000000", 2, "", 65536, True),
    ("00DA00000000020102", 3, "0102", None, True),
    ("00DA000000000201020100", 4, "0102", 256, True),
])
def test_parse_every_case(hexstr: str, case: int, data: str, le: int | None, ext: bool) -> None:
    cmd = parse_command(bytes.fromhex(hexstr))
    assert cmd.case == case
    assert cmd.data == bytes.fromhex(data)
    assert cmd.le == le
    assert cmd.extended is ext
    assert bytes(cmd) == bytes.fromhex(hexstr)


@pytest.mark.parametrize("hexstr", [
    "", "00", "00A404",            # shorter than a header
    "00A4040005A000",              # Lc says 5, 2 follow
    "00A4040002A0000000",          # Lc 2, then 2 extra bytes
    "00A4040000FF",                # short form with a 00 marker and one byte
    "00A4040000000200",            # extended Lc 2, one byte follows
    "00A40400000000AA",            # extended Lc 0 followed by data
])
def test_malformed_commands_are_refused_with_6700(hexstr: str) -> None:
    with pytest.raises(APDUFormatError) as err:
        parse_command(bytes.fromhex(hexstr))
    assert err.value.sw == SW.WRONG_LENGTH


def test_build_chooses_extended_when_needed() -> None:
    raw = build_command(0x00, 0xD6, 0, 0, bytes(300))
    assert raw[4:7] == b"\x00\x01\x2c" and len(raw) == 7 + 300
    with pytest.raises(ValueError):
        build_command(0x00, 0xD6, 0, 0, bytes(300), extended=False)
    with pytest.raises(ValueError):
        build_command(0x100, 0, 0, 0)


@given(cla=st.integers(0, 255), ins=st.integers(0, 255), p1=st.integers(0, 255),
       p2=st.integers(0, 255), data=st.binary(max_size=600),
       le=st.none() | st.integers(1, 65536))
def test_build_parse_round_trip(cla: int, ins: int, p1: int, p2: int, data: bytes,
                                le: int | None) -> None:
    raw = build_command(cla, ins, p1, p2, data, le)
    cmd = parse_command(raw)
    assert (cmd.cla, cmd.ins, cmd.p1, cmd.p2, cmd.data) == (cla, ins, p1, p2, data)
    assert cmd.le == le
    assert bytes(CommandAPDU(cla, ins, p1, p2, data, le, cmd.extended)) == raw


def test_response_split() -> None:
    r = parse_response(bytes.fromhex("0102039000"))
    assert r.data == b"\x01\x02\x03" and r.sw == 0x9000 and r.ok and r.sw1 == 0x90
    with pytest.raises(APDUFormatError):
        parse_response(b"\x90")


def test_status_word_meanings() -> None:
    assert SW.meaning(0x9302) == "MAC invalid"
    assert "2 tries left" in SW.meaning(0x63C2)
    assert "GET RESPONSE" in SW.meaning(0x6110)
    assert SW.is_valid(0x9000) and SW.is_valid(0x6A82) and not SW.is_valid(0x1234)


def test_tlv_parse_and_build() -> None:
    raw = bytes.fromhex("6F0E8407A0000000031010A5035001AA")
    items = tlv.parse(raw)
    assert len(items) == 1 and items[0].tag == 0x6F and items[0].constructed
    children = items[0].children()
    assert children[0] == tlv.TLV(0x84, bytes.fromhex("A0000000031010"))
    found = tlv.find(items, 0x50)
    assert found is not None and found.value == b"\xaa"
    assert tlv.build(0x6F, children) == raw


def test_tlv_multibyte_tags_and_long_lengths() -> None:
    value = bytes(300)
    raw = tlv.build(0x9F0C, value)
    assert raw[:5] == bytes.fromhex("9F0C82012C")
    assert tlv.parse(raw) == [tlv.TLV(0x9F0C, value)]
    assert tlv.build(0xBF0C, b"")[:3] == bytes.fromhex("BF0C00")
    assert tlv.parse(bytes.fromhex("5F2A020156")) == [tlv.TLV(0x5F2A, b"\x01\x56")]
    assert tlv.build(0x50, bytes(200))[:3] == bytes.fromhex("5081C8")


@pytest.mark.parametrize("hexstr", ["9F", "5F2A", "5003AABB", "50820100", "5084000000010000",
                                    "9F8080808001"])
def test_tlv_truncated_or_bad(hexstr: str) -> None:
    with pytest.raises(tlv.TLVError):
        tlv.parse(bytes.fromhex(hexstr))


@given(st.lists(st.tuples(st.sampled_from([0x50, 0x84, 0x9F0C, 0x5F2A, 0xDF01]),
                          st.binary(max_size=400)), max_size=5))
def test_tlv_round_trip(pairs: list[tuple[int, bytes]]) -> None:
    raw = b"".join(tlv.build(t, v) for t, v in pairs)
    assert [(i.tag, i.value) for i in tlv.parse(raw)] == pairs
