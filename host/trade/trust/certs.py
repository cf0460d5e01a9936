"""Temporary certificates (seed 004, the four-zone PKI).

A customer and a merchant are each known only to their own financial institution (FI); the
FIs know each other (zone 1). At session start the customer's FI signs a *temporary
certificate* holding nothing but the session's Ed25519 public key, the session id and a short
validity; it goes to the merchant's FI, which checks it with the issuing FI's key and signs
the same facts again for its own customer, the merchant. The merchant then needs one key only,
its own FI's, learns no identity (not even which FI the customer banks with), and checks no
revocation list: a certificate lives minutes, and expiry replaces revocation. The reverse
direction (the merchant's session key for the customer) is the same two calls with the roles
swapped.

A certificate is the canonical JSON ``{"cert": BODY, "sig": HEX}`` (``signing.canonical``),
at most ``MAX_CERT`` bytes; ``BODY`` has exactly the fields below, nothing more (an identity
smuggled into it is refused, not ignored). Each FI signs under its own domain label, so a
zone-1 signature never passes as a zone-3 one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...kit.http import Refused
from .. import messages as M
from .. import signing

ISSUED = b"svcard-trade-tempcert-issued/1\n"     # customer's FI -> merchant's FI (zone 1)
RESIGNED = b"svcard-trade-tempcert/1\n"          # merchant's FI -> merchant (zone 3)
VERSION = 1
MAX_LIFESPAN = 3600          # seconds a temporary certificate may live at most
MAX_CERT = 1024              # bytes of an encoded certificate
CLOCK_SKEW = 60              # seconds a not_before may lie ahead of the checker's clock

_VERSION: M.Checker = lambda v: v == VERSION   # noqa: E731
BODY: dict[str, Any] = {"v": _VERSION, "session": M.SESSION, "key": M.KEY,
                        "not_before": M.SECONDS, "not_after": M.SECONDS}
ISSUED_BODY: dict[str, Any] = {**BODY, "issuer": M.IDENT}
ENVELOPE_ISSUED: dict[str, Any] = {"cert": ISSUED_BODY, "sig": M.SIGNATURE}
ENVELOPE: dict[str, Any] = {"cert": BODY, "sig": M.SIGNATURE}


class CertError(M.MessageError):
    """A temporary certificate refused: the reason names the field or the check."""


@dataclass(frozen=True)
class SessionKey:
    """What a verified certificate tells its holder: a key for a session, until a time."""

    session: str
    key: bytes
    not_after: int


def issue(fi_private: bytes, fi_id: str, session: str, session_key: bytes, now: int,
          lifespan: int = 600) -> bytes:
    """The customer's FI: a certificate for ``session_key`` in ``session``, signed for the
    merchant's FI (zone 1)."""
    if not 1 <= lifespan <= MAX_LIFESPAN:
        raise CertError(f"lifespan: {lifespan} s, not within 1..{MAX_LIFESPAN}")
    body = {"v": VERSION, "session": session, "key": session_key.hex(), "not_before": now,
            "not_after": now + lifespan, "issuer": fi_id}
    try:
        M.check(body, ISSUED_BODY, "certificate")
    except Refused as exc:
        raise CertError(exc.reason) from None
    return signing.canonical(
        {"cert": body, "sig": signing.sign(fi_private, ISSUED, signing.canonical(body))})


def _open(blob: bytes, fields: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if len(blob) > MAX_CERT:
        raise CertError(f"certificate: more than {MAX_CERT} bytes")
    try:
        data = M.check(M.load(blob, "certificate"), fields, "certificate")
    except Refused as exc:
        raise CertError(exc.reason) from None
    if signing.canonical(data) != blob:
        raise CertError("certificate: not in its canonical encoding")
    return data["cert"], data["sig"]


def _check_time(body: Mapping[str, Any], now: int) -> None:
    if not 0 < body["not_after"] - body["not_before"] <= MAX_LIFESPAN:
        raise CertError(f"certificate: validity longer than {MAX_LIFESPAN} s or empty")
    if now >= body["not_after"]:
        raise CertError("certificate: expired")
    if now + CLOCK_SKEW < body["not_before"]:
        raise CertError("certificate: not yet valid")


def resign(fi_private: bytes, issuers: Mapping[str, bytes], blob: bytes,
           now: int | None) -> bytes:
    """The merchant's FI: check a zone-1 certificate with the key of the FI it names (one of
    ``issuers``, the FIs this one has agreements with), then sign the same session, key and
    validity for its own merchant, without the issuer. ``now`` None: its age is not checked
    (it came inside a message the issuer signed, read again later)."""
    body, sig = _open(blob, ENVELOPE_ISSUED)
    public = issuers.get(body["issuer"])
    if public is None:
        raise CertError(f"certificate: issuer {body['issuer']!r} is not a known FI")
    if not signing.verify(public, ISSUED, signing.canonical(body), sig):
        raise CertError("certificate: the issuer's signature does not verify")
    if now is not None:
        _check_time(body, now)
    out = {k: body[k] for k in BODY}
    return signing.canonical(
        {"cert": out, "sig": signing.sign(fi_private, RESIGNED, signing.canonical(out))})


def verify(my_fi_public: bytes, blob: bytes, session: str, now: int | None) -> SessionKey:
    """The merchant: the session key a certificate vouches for, checked with its own FI's key
    only; refused if for another session, expired, re-signed by another FI, or carrying any
    field beyond the session, the key and the validity. ``now`` None: its age is not checked
    (the customer, reading it inside the answer its own FI signed when the session opened:
    a resume may come after the certificate's short life)."""
    body, sig = _open(blob, ENVELOPE)
    if not signing.verify(my_fi_public, RESIGNED, signing.canonical(body), sig):
        raise CertError("certificate: not signed by this party's own FI")
    if body["session"] != session:
        raise CertError("certificate: for another session")
    if now is not None:
        _check_time(body, now)
    return SessionKey(body["session"], bytes.fromhex(body["key"]), body["not_after"])


def vouched(fi_public: bytes, blob: bytes, session: str) -> bytes:
    """For a judge, after the fact: the key an FI's zone-1 certificate (:func:`issue`)
    vouched for in ``session``, checked with that FI's public key. Its validity is not
    checked (a dispute comes after a certificate's short life); its signature and session
    are, and CertError says which failed."""
    body, sig = _open(blob, ENVELOPE_ISSUED)
    if not signing.verify(fi_public, ISSUED, signing.canonical(body), sig):
        raise CertError("certificate: not signed by this FI")
    if body["session"] != session:
        raise CertError("certificate: for another session")
    return bytes.fromhex(body["key"])


def relay(fi_private: bytes, issuer: str, issuer_public: bytes, text: str, session: str,
          key: bytes | None, now: int | None) -> str:
    """The FI in the middle, as a server does it: a certificate carried in a message, checked
    to come from ``issuer`` (the peer that sent the message) for ``session`` (and ``key``
    when the message names it too), re-signed for this FI's own customer. CertError if not."""
    out = resign(fi_private, {issuer: issuer_public}, text.encode(), now)
    body = json.loads(out)["cert"]
    if body["session"] != session:
        raise CertError("certificate: for another session")
    if key is not None and body["key"] != key.hex():
        raise CertError("certificate: for another key than the message names")
    return out.decode()
