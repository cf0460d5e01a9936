"""The purse crypto against the deliberately plain implementations in ``plain.py``."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st
from plain import (
    des_encrypt_block,
    plain_diversify,
    plain_mac,
    plain_tac,
    tdes_encrypt_block,
)

from svcard.protocols import crypto


def test_des_primitive_known_answer() -> None:
    # The classic single-DES worked example (key 133457799BBCDFF1).
    key = bytes.fromhex("133457799BBCDFF1")
    assert des_encrypt_block(key, bytes.fromhex("0123456789ABCDEF")) == bytes.fromhex(
        "85E813540F0AB405")


def test_two_key_triple_des_with_equal_halves_is_single_des() -> None:
    key = bytes.fromhex("133457799BBCDFF1")
    block = bytes.fromhex("0123456789ABCDEF")
    assert crypto.encrypt_ecb(key + key, block) == bytes.fromhex("85E813540F0AB405")
    assert tdes_encrypt_block(key + key, block) == bytes.fromhex("85E813540F0AB405")


def test_padding_always_adds_80() -> None:
    assert crypto.pad80(b"") == bytes.fromhex("8000000000000000")
    assert crypto.pad80(bytes(8)) == bytes(8) + bytes.fromhex("8000000000000000")
    assert crypto.pad80(bytes(7)) == bytes(7) + b"\x80"


@given(key=st.binary(min_size=8, max_size=8), data=st.binary(max_size=64))
def test_single_des_mac_matches_plain_cbc_loop(key: bytes, data: bytes) -> None:
    assert crypto.mac(key, data) == plain_mac(key, data)


@given(key=st.binary(min_size=16, max_size=16), data=st.binary(max_size=64))
def test_triple_des_cbc_mac_matches_plain(key: bytes, data: bytes) -> None:
    assert crypto.cbc_mac(key, data) == plain_mac(key, data)


@given(master=st.binary(min_size=16, max_size=16), serial=st.binary(min_size=10, max_size=10))
def test_diversification_matches_plain(master: bytes, serial: bytes) -> None:
    assert crypto.card_key(master, serial) == plain_diversify(master, serial[-8:])
    issuer = os.urandom(8)
    two = plain_diversify(plain_diversify(master, issuer), serial[-8:])
    assert crypto.card_key(master, serial, issuer) == two


def test_session_keys_and_tac_match_plain() -> None:
    dpk, dlk, dtk = os.urandom(16), os.urandom(16), os.urandom(16)
    random = bytes.fromhex("A1B2C3D4")
    assert crypto.purchase_session_key(dpk, random, 0x0102, 0x0A0B0C0D) == tdes_encrypt_block(
        dpk, random + bytes.fromhex("01020C0D"))
    assert crypto.load_session_key(dlk, random, 7) == tdes_encrypt_block(
        dlk, random + bytes.fromhex("00078000"))
    data = os.urandom(27)
    assert crypto.tac(dtk, data) == plain_tac(dtk, data)


def test_mac_input_layouts() -> None:
    tid = bytes.fromhex("112233445566")
    d, t = bytes.fromhex("20270314"), bytes.fromhex("150926")
    assert crypto.purchase_mac1_input(0x1234, 6, tid, d, t).hex() == (
        "00001234" "06" "112233445566" "20270314" "150926")
    assert crypto.load_mac1_input(5, 0x64, 2, tid).hex() == "00000005" "00000064" "02" + tid.hex()
    assert crypto.load_tac_input(0x69, 3, 0x64, 2, tid, d, t).hex() == (
        "00000069" "0003" "00000064" "02" "112233445566" "20270314" "150926")
    assert crypto.purchase_tac_input(1, 6, tid, 9, d, t).hex() == (
        "00000001" "06" "112233445566" "00000009" "20270314" "150926")
