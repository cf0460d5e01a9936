"""The secure-messaging MAC of a record write (CLA 04): checked against a real card's log and
against a plain second implementation."""

from __future__ import annotations

import random

import pytest
from plain import des_decrypt_block, des_encrypt_block, plain_pad, xor8

from svcard.protocols import crypto


def plain_sm_mac(key: bytes, challenge: bytes, command: bytes) -> bytes:
    """Single-DES CBC under the left key half from IV = challenge || zeros, the last block
    deciphered under the right half and enciphered under the left (16-byte key)."""
    chain = challenge + bytes(8 - len(challenge))
    padded = plain_pad(command)
    for i in range(0, len(padded), 8):
        chain = des_encrypt_block(key[:8], xor8(chain, padded[i:i + 8]))
    if len(key) == 16:
        chain = des_encrypt_block(key[:8], des_decrypt_block(key[8:], chain))
    return chain[:4]


def test_the_mac_of_a_real_cards_secure_write() -> None:
    # A Huada vendor log of a Changsha metro card (GitHub ConardLKL/ChangSha,
    # doc/华大智宝/CSMetroScriptandLog_20151102/t1_initAndActive.txt, lines 48-51, with the
    # card maintenance key of the script beside it): GET CHALLENGE answered 1B534732, and the
    # card accepted UPDATE BINARY 04 D6 85 00 2C ... with the MAC C853F358.
    key = bytes.fromhex("F28E92292DCB63F11EA7F5776A7122B8")
    apdu = bytes.fromhex("04D685002C07314100000000004100000089999985020020150605000F0000"
                         "0001000120150605203808080000C853F358")
    command = crypto.secure_messaging_input(apdu[0], apdu[1], apdu[2], apdu[3], apdu[5:-4])
    assert command == apdu[:-4]   # Lc counts the MAC
    assert crypto.secure_messaging_mac(key, bytes.fromhex("1B534732"), command) == apdu[-4:]


@pytest.mark.parametrize("key_size", [8, 16])
@pytest.mark.parametrize("challenge_size", [4, 8])
def test_the_mac_matches_a_plain_implementation(key_size: int, challenge_size: int) -> None:
    rng = random.Random(12)
    for _ in range(50):
        key = rng.randbytes(key_size)
        challenge = rng.randbytes(challenge_size)
        data = rng.randbytes(rng.randrange(0, 60))
        command = crypto.secure_messaging_input(0x04, 0xDC, 1, 0x5C, data)
        assert crypto.secure_messaging_mac(key, challenge, command) == \
            plain_sm_mac(key, challenge, command)


def test_the_challenge_changes_the_mac() -> None:
    key = bytes(range(16))
    command = crypto.secure_messaging_input(0x04, 0xE2, 0, 0x58, bytes(40))
    macs = {crypto.secure_messaging_mac(key, c, command)
            for c in (b"\x00\x00\x00\x01", b"\x00\x00\x00\x02", bytes(8))}
    assert len(macs) == 3


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        crypto.secure_messaging_mac(bytes(16), b"\x01\x02\x03", b"x")
    with pytest.raises(crypto.KeyError_):
        crypto.secure_messaging_mac(bytes(24), bytes(4), b"x")
    with pytest.raises(ValueError):
        crypto.secure_messaging_input(0x04, 0xDC, 1, 4, bytes(252))


def test_the_retail_mac_with_a_zero_iv_is_unchanged() -> None:
    key, data = bytes(range(16)), b"svcard"
    assert crypto.retail_mac(key, data) == crypto.retail_mac(key, data, iv=bytes(8))
