"""Deliberately plain reference implementations for the tests.

Everything here is written a second way, independent of ``svcard.protocols``: single-block DES
only (from ``cryptography``, checked against the FIPS 81 known answer in the tests), triple DES
as explicit encrypt-decrypt-encrypt, CBC as an explicit XOR loop, padding by hand, fields
sliced by offset rather than parsed with ``construct``.
"""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, modes

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def des_encrypt_block(key8: bytes, block: bytes) -> bytes:
    enc = Cipher(TripleDES(key8 * 3), modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


def des_decrypt_block(key8: bytes, block: bytes) -> bytes:
    dec = Cipher(TripleDES(key8 * 3), modes.ECB()).decryptor()
    return dec.update(block) + dec.finalize()


def tdes_encrypt_block(key16: bytes, block: bytes) -> bytes:
    k1, k2 = key16[:8], key16[8:]
    return des_encrypt_block(k1, des_decrypt_block(k2, des_encrypt_block(k1, block)))


def xor8(a: bytes, b: bytes) -> bytes:
    return bytes([a[i] ^ b[i] for i in range(8)])


def plain_pad(data: bytes) -> bytes:
    out = bytearray(data)
    out.append(0x80)
    while len(out) % 8 != 0:
        out.append(0x00)
    return bytes(out)


def plain_mac(key: bytes, data: bytes) -> bytes:
    """CBC-MAC, zero ICV, 80-padding, first 4 bytes; DES for 8-byte keys, 3DES for 16."""
    chain = bytes(8)
    padded = plain_pad(data)
    for i in range(0, len(padded), 8):
        block = xor8(chain, padded[i : i + 8])
        chain = (des_encrypt_block(key, block) if len(key) == 8
                 else tdes_encrypt_block(key, block))
    return chain[:4]


def plain_diversify(master: bytes, factor: bytes) -> bytes:
    inverted = bytes([b ^ 0xFF for b in factor])
    return tdes_encrypt_block(master, factor) + tdes_encrypt_block(master, inverted)


def plain_tac(dtk: bytes, data: bytes) -> bytes:
    return plain_mac(xor8(dtk[:8], dtk[8:]), data)


def demo_issuer() -> dict:
    with (FIXTURES / "demo-issuer.toml").open("rb") as fh:
        return tomllib.load(fh)


def demo_card_keys(serial: bytes) -> dict[str, bytes]:
    issuer = demo_issuer()
    factor = serial[-8:]
    return {
        "dpk": plain_diversify(bytes.fromhex(issuer["purchase_keys"][0]["master_key"]), factor),
        "dpk2": plain_diversify(bytes.fromhex(issuer["purchase_keys"][1]["master_key"]), factor),
        "dlk": plain_diversify(bytes.fromhex(issuer["load_keys"][0]["master_key"]), factor),
        "dtk": plain_diversify(bytes.fromhex(issuer["tac_master_key"]), factor),
    }
