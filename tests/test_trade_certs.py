"""Temporary certificates (seed 004's four-zone PKI): host/trade/trust/certs.py."""

from __future__ import annotations

import json

import pytest

from svcard.host.trade import signing
from svcard.host.trade.trust import certs

NOW = 1_800_000_000
SESSION = "op1-am.42"


@pytest.fixture()
def pki() -> dict[str, bytes]:
    cfi, cfi_pub = signing.new_key()      # the customer's FI
    mfi, mfi_pub = signing.new_key()      # the merchant's FI
    other, other_pub = signing.new_key()  # some third FI
    _, session_pub = signing.new_key()
    return {"cfi": cfi, "cfi_pub": cfi_pub, "mfi": mfi, "mfi_pub": mfi_pub, "other": other,
            "other_pub": other_pub, "session_pub": session_pub}


def chain(k: dict[str, bytes], now: int = NOW, lifespan: int = 600) -> bytes:
    issued = certs.issue(k["cfi"], "bank-a", SESSION, k["session_pub"], now, lifespan)
    return certs.resign(k["mfi"], {"bank-a": k["cfi_pub"]}, issued, now)


def test_honest_chain_gives_the_merchant_the_session_key_only(pki: dict[str, bytes]) -> None:
    blob = chain(pki)
    got = certs.verify(pki["mfi_pub"], blob, SESSION, NOW + 10)
    assert got == certs.SessionKey(SESSION, pki["session_pub"], NOW + 600)
    body = json.loads(blob)["cert"]
    assert set(body) == {"v", "session", "key", "not_before", "not_after"}
    assert "bank-a" not in blob.decode()      # not even the customer's FI is named
    assert len(blob) < 300


def test_resigned_by_the_wrong_fi_is_refused(pki: dict[str, bytes]) -> None:
    issued = certs.issue(pki["cfi"], "bank-a", SESSION, pki["session_pub"], NOW)
    forged = certs.resign(pki["other"], {"bank-a": pki["cfi_pub"]}, issued, NOW)
    with pytest.raises(certs.CertError, match="own FI"):
        certs.verify(pki["mfi_pub"], forged, SESSION, NOW)
    # the zone-1 certificate itself is not a zone-3 one (another label, and it names its issuer)
    with pytest.raises(certs.CertError):
        certs.verify(pki["cfi_pub"], issued, SESSION, NOW)


def test_merchant_fi_refuses_an_unknown_or_forged_issuer(pki: dict[str, bytes]) -> None:
    issued = certs.issue(pki["other"], "bank-a", SESSION, pki["session_pub"], NOW)
    with pytest.raises(certs.CertError, match="does not verify"):
        certs.resign(pki["mfi"], {"bank-a": pki["cfi_pub"]}, issued, NOW)
    with pytest.raises(certs.CertError, match="not a known FI"):
        certs.resign(pki["mfi"], {"bank-b": pki["cfi_pub"]}, issued, NOW)


def test_expired_and_not_yet_valid_are_refused(pki: dict[str, bytes]) -> None:
    blob = chain(pki, lifespan=60)
    certs.verify(pki["mfi_pub"], blob, SESSION, NOW + 59)
    with pytest.raises(certs.CertError, match="expired"):
        certs.verify(pki["mfi_pub"], blob, SESSION, NOW + 60)
    with pytest.raises(certs.CertError, match="not yet valid"):
        certs.verify(pki["mfi_pub"], blob, SESSION, NOW - certs.CLOCK_SKEW - 1)
    issued = certs.issue(pki["cfi"], "bank-a", SESSION, pki["session_pub"], NOW, 60)
    with pytest.raises(certs.CertError, match="expired"):   # the merchant's FI checks too
        certs.resign(pki["mfi"], {"bank-a": pki["cfi_pub"]}, issued, NOW + 61)
    with pytest.raises(certs.CertError, match="lifespan"):
        certs.issue(pki["cfi"], "bank-a", SESSION, pki["session_pub"], NOW,
                    certs.MAX_LIFESPAN + 1)


def test_another_session_is_refused(pki: dict[str, bytes]) -> None:
    with pytest.raises(certs.CertError, match="another session"):
        certs.verify(pki["mfi_pub"], chain(pki), "op1-am.43", NOW)


def _signed(private: bytes, label: bytes, body: dict[str, object]) -> bytes:
    raw = signing.canonical(body)
    return signing.canonical({"cert": body, "sig": signing.sign(private, label, raw)})


@pytest.mark.parametrize("extra", [{"customer": "alice"}, {"issuer": "bank-a"},
                                   {"name": "Alice Smith"}])
def test_an_identity_field_smuggled_in_is_refused_even_if_signed(
        pki: dict[str, bytes], extra: dict[str, str]) -> None:
    body = {"v": 1, "session": SESSION, "key": pki["session_pub"].hex(), "not_before": NOW,
            "not_after": NOW + 600, **extra}
    blob = _signed(pki["mfi"], certs.RESIGNED, body)     # a correct signature over it
    with pytest.raises(certs.CertError, match="unknown"):
        certs.verify(pki["mfi_pub"], blob, SESSION, NOW)
    issued = _signed(pki["cfi"], certs.ISSUED, {**body, "issuer": "bank-a",
                                                 "customer": "alice"})
    with pytest.raises(certs.CertError, match="unknown"):
        certs.resign(pki["mfi"], {"bank-a": pki["cfi_pub"]}, issued, NOW)


def test_a_signed_overlong_validity_or_missing_field_is_refused(pki: dict[str, bytes]) -> None:
    body = {"v": 1, "session": SESSION, "key": pki["session_pub"].hex(), "not_before": NOW,
            "not_after": NOW + certs.MAX_LIFESPAN + 1}
    with pytest.raises(certs.CertError, match="validity"):
        certs.verify(pki["mfi_pub"], _signed(pki["mfi"], certs.RESIGNED, body), SESSION, NOW)
    del body["not_after"]
    with pytest.raises(certs.CertError, match="missing"):
        certs.verify(pki["mfi_pub"], _signed(pki["mfi"], certs.RESIGNED, body), SESSION, NOW)


def test_tampered_noncanonical_or_oversized_encodings_are_refused(pki: dict[str, bytes]) -> None:
    blob = chain(pki)
    other_key = signing.new_key()[1].hex()
    tampered = blob.replace(pki["session_pub"].hex().encode(), other_key.encode())
    with pytest.raises(certs.CertError, match="own FI"):
        certs.verify(pki["mfi_pub"], tampered, SESSION, NOW)
    spaced = json.dumps(json.loads(blob), indent=1).encode()
    with pytest.raises(certs.CertError, match="canonical"):
        certs.verify(pki["mfi_pub"], spaced, SESSION, NOW)
    with pytest.raises(certs.CertError, match="bytes"):
        certs.verify(pki["mfi_pub"], blob + b" " * certs.MAX_CERT, SESSION, NOW)
    with pytest.raises(certs.CertError):
        certs.verify(pki["mfi_pub"], b"\xff not json", SESSION, NOW)


def test_reverse_direction_for_the_merchant_session_key(pki: dict[str, bytes]) -> None:
    _, merchant_session = signing.new_key()
    issued = certs.issue(pki["mfi"], "bank-m", SESSION, merchant_session, NOW)
    blob = certs.resign(pki["cfi"], {"bank-m": pki["mfi_pub"]}, issued, NOW)
    assert certs.verify(pki["cfi_pub"], blob, SESSION, NOW).key == merchant_session


def test_the_fi_refuses_to_issue_for_a_malformed_session(pki: dict[str, bytes]) -> None:
    for session in ("", "no-dot", "x" * 40 + ".1", "a b.1"):
        with pytest.raises(certs.CertError, match="session"):
            certs.issue(pki["cfi"], "bank-a", session, pki["session_pub"], NOW)
