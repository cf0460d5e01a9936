"""Secure delivery of a digital product (seed 004 FIG. 4, claims 24-26).

1. The customer sends its signed order (``sign(order)^c``); the offer below names that order
   by the SHA-256 of its signed bytes.
2. The merchant encrypts the product under a fresh 256-bit key K2 (AES-256-GCM) and sends the
   ciphertext with a *description* it signs: merchant, session, order, product id, the words
   describing it, the price, the GCM nonce, the SHA-256 of the ciphertext, of the plaintext and
   of K2 (a commitment: the key released later is provably the merchant's). K2 itself goes only
   to the trusted party (the mediating agent), sealed to the trusted party's X25519 key.
3. The customer checks the signature and that the ciphertext is the one described, then signs
   an *acceptance* with its session key: the description's hash, its order, a fresh unique id,
   the time, and its own X25519 key K1.
4. The trusted party checks the acceptance against the description it holds and returns K2
   sealed to K1. There is no other way to get K2 out of it.
5. A dispute package (signed description, ciphertext, K2, signed acceptance) is judged by
   anyone holding the merchant's and the session's public keys: ``verify_dispute``.

Every sealed secret and every signature carries its own domain label, bound to the session
and the order, so nothing made for one order serves another.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ...kit.http import Refused
from .. import messages as M
from .. import signing
from ..money import Amount

DESCRIPTION = b"svcard-trade-product-description/1\n"   # merchant
ACCEPTANCE = b"svcard-trade-product-acceptance/1\n"     # customer (session key)
PRODUCT = b"svcard-trade-product/1\n"                   # AES-GCM associated data
K2_TO_PARTY = b"svcard-trade-k2-to-party/1\n"           # merchant -> trusted party
K2_TO_CUSTOMER = b"svcard-trade-k2-to-customer/1\n"     # trusted party -> customer (K1)
COMMIT = b"svcard-trade-k2-commitment/1\n"
VERSION = 1
MAX_PRODUCT = 8 << 20        # bytes of plaintext
MAX_PACKAGE = MAX_PRODUCT * 4 // 3 + 16384
MAX_SKEW = M.MAX_SKEW
MAX_LODGED = 100_000   # keys a trusted party holds at once (a server would expire them)

_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_VERSION: M.Checker = lambda v: v == VERSION   # noqa: E731
_NONCE = M._pattern(re.compile(r"[0-9a-f]{24}"))
DESCRIPTION_BODY: dict[str, Any] = {
    "v": _VERSION, "merchant": M.IDENT, "session": M.SESSION, "order": M.DIGEST,
    "product": M.IDENT, "text": M._text(2048), "price": M.MINOR, "currency": M.CURRENCY,
    "nonce": _NONCE, "size": M._int(0, MAX_PRODUCT), "ciphertext": M.DIGEST,
    "plaintext": M.DIGEST, "key": M.DIGEST}
ACCEPTANCE_BODY: dict[str, Any] = {
    "v": _VERSION, "session": M.SESSION, "order": M.DIGEST, "description": M.DIGEST,
    "k1": M.KEY, "unique": M._pattern(re.compile(r"[0-9a-f]{32}")), "created": M.SECONDS,
    "link": M.LINK_OR_NONE}     # a product bought fairly: the link that pays it, else ""
SIGNED_ACCEPTANCE: dict[str, Any] = {"acceptance": ACCEPTANCE_BODY, "sig": M.SIGNATURE}
PACKAGE: dict[str, Any] = {
    "description": DESCRIPTION_BODY, "description_sig": M.SIGNATURE,
    "ciphertext": lambda v: isinstance(v, str) and len(v) <= MAX_PACKAGE
    and _B64.fullmatch(v) is not None,
    "key": M.KEY, "acceptance": SIGNED_ACCEPTANCE}


class DeliveryError(M.MessageError):
    """A delivery step refused; the reason names the check (never a key)."""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def commitment(k2: bytes) -> str:
    return _sha(COMMIT + k2)


def _aad(d: Mapping[str, Any]) -> bytes:
    return PRODUCT + f"{d['merchant']}\n{d['session']}\n{d['order']}\n{d['product']}".encode()


def _seal(recipient: bytes, secret: bytes, label: bytes) -> bytes:
    """``secret`` for the holder of the X25519 key whose public half is ``recipient``."""
    eph = X25519PrivateKey.generate()
    epub = eph.public_key().public_bytes_raw()
    shared = eph.exchange(X25519PublicKey.from_public_bytes(recipient))
    key = HKDF(SHA256(), 32, None, label + epub + recipient).derive(shared)
    nonce = os.urandom(12)
    return epub + nonce + AESGCM(key).encrypt(nonce, secret, label)


def _unseal(private: bytes, sealed: bytes, label: bytes) -> bytes:
    if len(sealed) != 32 + 12 + 32 + 16:
        raise DeliveryError("sealed key: wrong length")
    me = X25519PrivateKey.from_private_bytes(private)
    epub, nonce, box = sealed[:32], sealed[32:44], sealed[44:]
    mine = me.public_key().public_bytes_raw()
    try:
        shared = me.exchange(X25519PublicKey.from_public_bytes(epub))
        key = HKDF(SHA256(), 32, None, label + epub + mine).derive(shared)
        return AESGCM(key).decrypt(nonce, box, label)
    except (ValueError, InvalidTag):
        raise DeliveryError("sealed key: does not open (not for this party or this order)") \
            from None


def new_exchange_key() -> tuple[bytes, bytes]:
    """A fresh (private, public) X25519 pair: the customer's K1, the trusted party's key."""
    private = X25519PrivateKey.generate()
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()


@dataclass(frozen=True)
class Offer:
    """What the merchant sends the customer: ``sign([prod]^K2, prodID, desc)^M``."""

    description: bytes     # canonical JSON of DESCRIPTION_BODY
    signature: str
    ciphertext: bytes


def offer(merchant_private: bytes, merchant: str, session: str, signed_order: bytes,
          product: str, text: str, price: Amount, plaintext: bytes,
          party_public: bytes) -> tuple[Offer, bytes]:
    """The merchant (claim 24): the product under a fresh K2 with its signed description, and
    K2 sealed to the trusted party (bound to this session and order). K2 is not returned."""
    if len(plaintext) > MAX_PRODUCT:
        raise DeliveryError(f"product: more than {MAX_PRODUCT} bytes")
    k2, nonce = AESGCM.generate_key(256), os.urandom(12)
    body: dict[str, Any] = {
        "v": VERSION, "merchant": merchant, "session": session, "order": _sha(signed_order),
        "product": product, "text": text, "price": price.minor, "currency": price.code,
        "nonce": nonce.hex(), "size": len(plaintext), "plaintext": _sha(plaintext),
        "key": commitment(k2)}
    ciphertext = AESGCM(k2).encrypt(nonce, plaintext, _aad(body))
    body["ciphertext"] = _sha(ciphertext)
    _parse(body, DESCRIPTION_BODY, "description")
    raw = signing.canonical(body)
    sealed = _seal(party_public, k2, K2_TO_PARTY + raw)
    return Offer(raw, signing.sign(merchant_private, DESCRIPTION, raw), ciphertext), sealed


def _parse(raw: bytes | dict[str, Any], fields: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``raw`` (bytes, or already parsed) with exactly ``fields``: a DeliveryError if not."""
    try:
        return M.check(M.load(raw, what) if isinstance(raw, bytes) else raw, fields, what)
    except Refused as exc:
        raise DeliveryError(exc.reason) from None


def _description(raw: bytes, signature: str, merchant_public: bytes) -> dict[str, Any]:
    d = _parse(raw, DESCRIPTION_BODY, "description")
    if signing.canonical(d) != raw:
        raise DeliveryError("description: not in its canonical encoding")
    if not signing.verify(merchant_public, DESCRIPTION, raw, signature):
        raise DeliveryError("description: the merchant's signature does not verify")
    return d


def check_offer(o: Offer, merchant_public: bytes, session: str,
                signed_order: bytes) -> dict[str, Any]:
    """The customer: the description, once its signature, its session and order and the
    ciphertext's hash are right (a product damaged or swapped in transit is refused here)."""
    d = _description(o.description, o.signature, merchant_public)
    if d["session"] != session or d["order"] != _sha(signed_order):
        raise DeliveryError("description: for another session or order")
    if _sha(o.ciphertext) != d["ciphertext"]:
        raise DeliveryError("product: the ciphertext is not the one described")
    return d


def accept(session_private: bytes, o: Offer, k1_public: bytes, now: int,
           link: bytes = b"") -> bytes:
    """The customer's ``sign(accept, unique)^c``: it accepts this description. ``link``: for
    a product bought fairly, the PayWord link that pays it, revealed only to the trusted
    party, which hands it to the merchant in the step that releases K2."""
    d = json.loads(o.description)
    body = {"v": VERSION, "session": d["session"], "order": d["order"],
            "description": _sha(o.description), "k1": k1_public.hex(),
            "unique": os.urandom(16).hex(), "created": now, "link": link.hex()}
    return signing.canonical(
        {"acceptance": body, "sig": signing.sign(session_private, ACCEPTANCE,
                                                 signing.canonical(body))})


def _acceptance(raw: bytes | dict[str, Any], customer_public: bytes) -> dict[str, Any]:
    a = _parse(raw, SIGNED_ACCEPTANCE, "acceptance")
    if isinstance(raw, bytes) and signing.canonical(a) != raw:
        raise DeliveryError("acceptance: not in its canonical encoding")
    body = a["acceptance"]
    if not signing.verify(customer_public, ACCEPTANCE, signing.canonical(body), a["sig"]):
        raise DeliveryError("acceptance: the session key's signature does not verify")
    return dict(body)


def signed_order(order_body: bytes, signature: str) -> bytes:
    """How a delivery names the customer's ``sign(order)^c``: its canonical text, a dot, the
    signature (the description holds the SHA-256 of these bytes)."""
    return order_body + b"." + signature.encode()


def check_description(raw: bytes, signature: str, merchant_public: bytes) -> dict[str, Any]:
    return _description(raw, signature, merchant_public)


def check_acceptance(raw: bytes, customer_public: bytes) -> dict[str, Any]:
    """An acceptance's body, once it is canonical and signed by ``customer_public``."""
    return _acceptance(raw, customer_public)


def lodged_key(private: bytes, sealed: bytes, description: bytes) -> bytes:
    """The trusted party: K2 out of a merchant's sealing, checked against its commitment."""
    k2 = _unseal(private, sealed, K2_TO_PARTY + description)
    if commitment(k2) != json.loads(description)["key"]:
        raise DeliveryError("sealed key: not the key the description commits to")
    return k2


def key_for_customer(k2: bytes, acceptance: bytes) -> bytes:
    """The trusted party: K2 sealed to the K1 the (checked) acceptance names."""
    try:
        return _seal(bytes.fromhex(json.loads(acceptance)["acceptance"]["k1"]), k2,
                     K2_TO_CUSTOMER + acceptance)
    except ValueError:      # a low-order point: no shared key can be made with it
        raise DeliveryError("acceptance: k1 is not a usable X25519 key") from None


@dataclass
class _Lodged:
    description: bytes
    k2: bytes
    accepted: str | None = None     # the unique id of the acceptance that released K2

    def __repr__(self) -> str:
        return f"_Lodged(description={_sha(self.description)[:16]}, accepted={self.accepted})"


class TrustedParty:
    """The mediating agent's FIG. 4 role: holds each order's K2 and releases it only against
    the customer's signed acceptance of the description K2 was lodged with. In memory; each
    check-then-act is one step under a lock (a server keeps the same steps in its DB)."""

    def __init__(self, private: bytes, merchants: Mapping[str, bytes],
                 sessions: Callable[[str], tuple[str, bytes] | None],
                 clock: Callable[[], int], most: int = MAX_LODGED) -> None:
        """``merchants``: each merchant's Ed25519 key; ``sessions(id)``: the open session's
        (merchant, session public key), or None; ``most``: keys held at once."""
        self._private = private
        self._merchants = dict(merchants)
        self._sessions = sessions
        self._most = most
        self._clock = clock
        self._lodged: dict[tuple[str, str], _Lodged] = {}
        self._uniques: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TrustedParty({len(self._lodged)} keys lodged)"

    def lodge(self, description: bytes, signature: str, sealed: bytes) -> None:
        """The merchant gives K2 (claim 25's trusted party): the description must be signed
        by the merchant it names and K2 must be the one it commits to."""
        d = _parse(description, DESCRIPTION_BODY, "description")
        public = self._merchants.get(d["merchant"])
        if public is None:
            raise DeliveryError(f"description: merchant {d['merchant']!r} is not known here")
        _description(description, signature, public)
        session = self._sessions(d["session"])
        if session is None or session[0] != d["merchant"]:
            raise DeliveryError("description: not a session open here with this merchant")
        k2 = _unseal(self._private, sealed, K2_TO_PARTY + description)
        if commitment(k2) != d["key"]:
            raise DeliveryError("sealed key: not the key the description commits to")
        with self._lock:
            old = self._lodged.get((d["session"], d["order"]))
            if old is not None:
                if old.description != description:
                    raise DeliveryError("order: another description is already lodged")
                return
            if len(self._lodged) >= self._most:
                raise DeliveryError(f"party: already holds {self._most} keys")
            self._lodged[(d["session"], d["order"])] = _Lodged(description, k2)

    def release(self, session: str, order: str, acceptance: bytes) -> bytes:
        """K2 sealed to the customer's K1, against its signed acceptance of exactly the
        description lodged for ``(session, order)``; nothing else releases it."""
        known = self._sessions(session)
        if known is None:
            raise DeliveryError("session: not known here")
        a = _acceptance(acceptance, known[1])
        if a["session"] != session or a["order"] != order:
            raise DeliveryError("acceptance: for another session or order")
        if abs(self._clock() - a["created"]) > MAX_SKEW:
            raise DeliveryError("acceptance: too old or from the future")
        with self._lock:
            lodged = self._lodged.get((session, order))
            if lodged is None:
                raise DeliveryError("order: no key lodged for it")
            if a["description"] != _sha(lodged.description):
                raise DeliveryError("acceptance: of another description")
            if self._uniques.get(a["unique"], (session, order)) != (session, order):
                raise DeliveryError("acceptance: its unique id was used for another order")
            if lodged.accepted not in (None, a["unique"]):
                raise DeliveryError("order: already accepted by another acceptance")
            lodged.accepted = a["unique"]
            self._uniques[a["unique"]] = (session, order)
            k2 = lodged.k2
        return _seal(bytes.fromhex(a["k1"]), k2, K2_TO_CUSTOMER + acceptance)


def open_key(k1_private: bytes, sealed: bytes, acceptance: bytes, o: Offer) -> bytes:
    """The customer: K2 out of the trusted party's answer, checked against the commitment."""
    k2 = _unseal(k1_private, sealed, K2_TO_CUSTOMER + acceptance)
    if commitment(k2) != json.loads(o.description)["key"]:
        raise DeliveryError("key: not the one the description commits to")
    return k2


def decrypt(o: Offer, k2: bytes) -> bytes:
    """The product, if it opens under K2 and is the plaintext described; else refused (and
    the customer has a dispute package to show)."""
    d = json.loads(o.description)
    try:
        plain = AESGCM(k2).decrypt(bytes.fromhex(d["nonce"]), o.ciphertext, _aad(d))
    except InvalidTag:
        raise DeliveryError("product: does not open under K2") from None
    if _sha(plain) != d["plaintext"]:
        raise DeliveryError("product: not the product described")
    return plain


def dispute_package(o: Offer, acceptance: bytes, k2: bytes) -> bytes:
    """Everything a third party needs: signed description, ciphertext, K2, acceptance."""
    return signing.canonical({
        "description": json.loads(o.description), "description_sig": o.signature,
        "ciphertext": base64.b64encode(o.ciphertext).decode(), "key": k2.hex(),
        "acceptance": json.loads(acceptance)})


@dataclass(frozen=True)
class Verdict:
    """``matches``: the product is the one described; ``mismatch``: the merchant's signed
    description is false (the product differs, or does not open under the committed K2);
    ``invalid``: the evidence does not hold together, so it proves nothing."""

    outcome: str
    reason: str


def verify_dispute(package: bytes, merchant_public: bytes, customer_public: bytes) -> Verdict:
    """A third party's judgement, with public keys only (the merchant's, the session's)."""
    if len(package) > MAX_PACKAGE:
        return Verdict("invalid", f"package: more than {MAX_PACKAGE} bytes")
    try:
        p = M.check(json.loads(package), PACKAGE, "package")
        raw = signing.canonical(p["description"])
        d = _description(raw, p["description_sig"], merchant_public)
        a = _acceptance(p["acceptance"], customer_public)
        ciphertext = base64.b64decode(p["ciphertext"], validate=True)
    except (ValueError, RecursionError, M.MessageError) as exc:
        return Verdict("invalid", str(exc))
    if (a["session"], a["order"], a["description"]) != (d["session"], d["order"], _sha(raw)):
        return Verdict("invalid", "acceptance: of another description, session or order")
    if _sha(ciphertext) != d["ciphertext"]:
        return Verdict("invalid", "product: the ciphertext is not the one described")
    k2 = bytes.fromhex(p["key"])
    if commitment(k2) != d["key"]:
        return Verdict("invalid", "key: not the one the description commits to")
    try:
        plain = AESGCM(k2).decrypt(bytes.fromhex(d["nonce"]), ciphertext, _aad(d))
    except InvalidTag:
        return Verdict("mismatch", "product: does not open under the committed K2")
    if _sha(plain) != d["plaintext"] or len(plain) != d["size"]:
        return Verdict("mismatch", "product: not the plaintext the merchant described")
    return Verdict("matches", "product: the one described")
