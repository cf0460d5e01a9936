"""Ending and clearing a trading session (seed 004 FIG. 3, claim 11): the transaction records
both sides send the mediating trusted agent, and its comparison of them.

A **transaction record** is one party's account of a session: how it ended, the number of
purchases, their total in the merchant's currency, the highest PayWord link index paid, the
SHA-256 ``list_hash`` of the purchase list and the list itself SEALED (AES-256-GCM). The
mediating agent sees only the hash, the count and the total; it compares them, never the
purchases.

* The list is ``[{index, item, units, signature}]``, in link order; ``signature`` is the
  customer's signature of that order (``sign(order)^c``). The customer made every signature and
  the merchant kept every one, so both compute the same hash for the same list; the mediating
  agent sees at most the last order, and without the others it cannot guess a list and test
  it against the hash (each entry holds 64 bytes it cannot predict).
* Each side seals its list under a key only it can make again, derived per session with
  HKDF-SHA256: the customer from its PayWord chain's seed (kept in its session file), the
  merchant from its own private key. Nothing new has to be stored or escrowed, and neither
  can open the other's list. In a dispute a side opens its own sealed list (or hands the
  per-session key to an arbiter, which opens that one session and nothing else), and the
  mediating agent's stored ``list_hash`` proves that the list shown is the one reported.
* The merchant's record carries its **evidence**: the commitment it took (signed by the
  session key), the last link it holds, and the customer's signed order for that link. The
  mediating agent checks that evidence itself: the commitment's signature under the session
  key IT registered at initiation, the link hashed down to the committed root, the order's
  signature. The amount cleared is ``proven index x unit``: what the merchant can show, never
  what either side says (:func:`compare`). With no merchant record, the customer's own record,
  which carries the same kind of evidence, proves what the customer admits (:func:`admitted`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import Engine, or_, select, update

from ..kit.db import step
from . import db as D
from . import messages as M
from . import signing as S
from .money import Amount, Conversion, conversion_postings, convert
from .payword import Commitment, PaywordError, h

MAX_RECORD = 2 << 20         # bytes of one record message (the sealed list is most of it)
MAX_ENTRIES = 4_000          # purchases one record may list (and a session may take: at
                             # most ~432 bytes each sealed, so a record fits in MAX_RECORD)
SIDES = ("customer", "merchant")
ENDINGS = ("spent", "terminated", "merchant", "timeout")
_SEALED = 2 * (12 + 16 + MAX_RECORD // 2)

EVIDENCE: dict[str, Any] = {
    "index": M._int(1, 1_000_000), "link": M.KEY, "commitment": M._text(1024),
    "commitment_signature": M.SIGNATURE, "order": M._text(512),
    "order_signature": M.SIGNATURE}
RECORD: dict[str, Any] = {
    "session": M.SESSION, "side": lambda v: v in SIDES, "party": M.IDENT,
    "ended": lambda v: v in ENDINGS, "index": M._int(0, 1_000_000),
    "count": M._int(0, MAX_ENTRIES), "total": M.MINOR, "currency": M.CURRENCY,
    "list_hash": M.DIGEST,
    "sealed": lambda v: isinstance(v, str) and 0 < len(v) <= _SEALED,
    "evidence": lambda v: v is None or isinstance(v, dict), "created": M.SECONDS}


class ClosingError(ValueError):
    """A record that cannot be used (the message says which field)."""


def entry(index: int, item: str, units: int, signature: str) -> dict[str, Any]:
    return {"index": index, "item": item, "units": units, "signature": signature}


def list_hash(session: str, entries: list[dict[str, Any]]) -> str:
    return hashlib.sha256(S.canonical({"session": session, "entries": entries})).hexdigest()


def record_key(secret: bytes, session: str, side: str) -> bytes:
    """The per-session key a side seals its list with (from a secret only that side has)."""
    return HKDF(hashes.SHA256(), 32, None,
                f"svcard-trade-record/1|{side}|{session}".encode()).derive(secret)


def seal(key: bytes, session: str, side: str, entries: list[dict[str, Any]]) -> str:
    """The list under ``key``; the nonce is derived from the key and the list, so the same
    list seals to the same text (a record sent again is the same bytes) and two different
    lists never share a nonce."""
    body = S.canonical({"entries": entries})
    nonce = hmac.new(key, body, hashlib.sha256).digest()[:12]
    return (nonce + AESGCM(key).encrypt(nonce, body, f"{side}|{session}".encode())).hex()


def unseal(key: bytes, session: str, side: str, sealed: str) -> list[dict[str, Any]]:
    """The list a side sealed (its own key); ClosingError if the key or the text is wrong."""
    try:
        raw = bytes.fromhex(sealed)
        body = AESGCM(key).decrypt(raw[:12], raw[12:], f"{side}|{session}".encode())
        entries: list[dict[str, Any]] = json.loads(body)["entries"]
    except (ValueError, InvalidTag, KeyError, TypeError):
        raise ClosingError("the sealed list does not open with this key") from None
    return entries


def make_record(session: str, side: str, party: str, ended: str, currency: str, unit: int,
                entries: list[dict[str, Any]], key: bytes, created: int,
                evidence: dict[str, Any] | None = None) -> dict[str, Any]:
    """A side's transaction record (to be signed by the sender)."""
    units = sum(int(e["units"]) for e in entries)
    return {"session": session, "side": side, "party": party, "ended": ended,
            "index": units, "count": len(entries), "total": units * unit,
            "currency": currency, "list_hash": list_hash(session, entries),
            "sealed": seal(key, session, side, entries), "evidence": evidence,
            "created": created}


def parse_record(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_RECORD:
        raise ClosingError(f"record: more than {MAX_RECORD} bytes")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ClosingError("record: not JSON") from None
    try:
        M.check(data, RECORD, "record")
        if data["evidence"] is not None:
            M.check(data["evidence"], EVIDENCE, "record.evidence")
    except M.MessageError as exc:
        raise ClosingError(exc.reason) from None
    return dict(data)


@dataclass
class Proof:
    """What a merchant's evidence shows, checked by the mediating agent itself."""

    index: int = 0
    unit: int = 0
    length: int = 0
    problems: list[str] = field(default_factory=list)


def check_evidence(ev: dict[str, Any] | None, session: str, merchant: str, currency: str,
                   deposit: int, session_key: bytes) -> Proof:
    """The link index the evidence proves (0 with the problem when it proves nothing)."""
    if ev is None:
        return Proof()
    body = ev["commitment"].encode()
    if not S.verify(session_key, S.COMMITMENT, body, ev["commitment_signature"]):
        return Proof(problems=["the commitment is not signed by the session's key"])
    try:
        c = Commitment.from_payload(json.loads(body))
    except (ValueError, PaywordError):
        return Proof(problems=["the commitment is malformed"])
    if c.session != session or c.merchant != merchant or c.currency != currency or \
            c.value > deposit:
        return Proof(problems=["the commitment is for another session, merchant, currency "
                               "or more than the deposit"])
    proof = Proof(0, c.unit, c.length)
    if ev["index"] > c.length:
        proof.problems.append(f"link {ev['index']} is past the chain's end ({c.length})")
        return proof
    x = bytes.fromhex(ev["link"])
    for _ in range(ev["index"]):
        x = h(x)
    if x != c.root:
        proof.problems.append(f"link {ev['index']} does not hash down to the committed root: "
                              "forged")
        return proof
    order_body = ev["order"].encode()
    try:
        order = json.loads(order_body)
    except ValueError:
        order = None
    if not S.verify(session_key, S.ORDER, order_body, ev["order_signature"]) or \
            not isinstance(order, dict) or order.get("session") != session or \
            order.get("index") != ev["index"]:
        proof.problems.append(f"no order signed by the customer for link {ev['index']}")
        return proof
    proof.index = ev["index"]
    return proof


@dataclass
class Decision:
    index: int                 # the link index cleared
    amount: int                # merchant's currency: index x unit
    outcome: str               # agreed | one-sided | disputed
    reasons: list[str]


def compare(session: dict[str, Any], merchant: dict[str, Any] | None,
            customer: dict[str, Any] | None) -> Decision:
    """Compare both records and decide from the merchant's evidence (``session``: the
    mediating agent's row: session, merchant, currency_merchant, deposit_merchant,
    session_key)."""
    reasons: list[str] = []
    proof = Proof()
    if merchant is not None:
        proof = check_evidence(merchant["evidence"], session["session"], session["merchant"],
                               session["currency_merchant"], session["deposit_merchant"],
                               bytes.fromhex(session["session_key"]))
        reasons += [f"merchant evidence: {p}" for p in proof.problems]
        shown = proof.index * proof.unit
        if merchant["index"] != proof.index or merchant["total"] != shown:
            reasons.append(f"the merchant claims link {merchant['index']} = "
                           f"{merchant['total']}; its evidence shows link {proof.index} = "
                           f"{shown}")
    for side, rec in (("merchant", merchant), ("customer", customer)):
        if rec is not None and rec["currency"] != session["currency_merchant"]:
            reasons.append(f"the {side}'s record is in {rec['currency']}")
    if merchant is not None and customer is not None:
        for name in ("index", "count", "total", "list_hash"):
            if merchant[name] != customer[name]:
                reasons.append(f"the records differ in {name}")
    if merchant is None and customer is not None:
        proof = admitted(session, customer, reasons)
    amount = proof.index * proof.unit
    if reasons:
        outcome = "disputed"
    elif merchant is None or customer is None:
        outcome = "one-sided"
    else:
        outcome = "agreed"
    return Decision(proof.index, amount, outcome, reasons)


def admitted(session: dict[str, Any], customer: dict[str, Any], reasons: list[str]) -> Proof:
    """What the customer's own record admits when the merchant's never came: the customer's
    record is signed by the session key and carries the same kind of evidence as a merchant's
    (the commitment, the link at its index, its signed order for that link). A verified
    admission is evidence AGAINST the customer, so the merchant is paid that link; evidence
    that does not verify, or that proves another index than the record claims, proves nothing
    (0) and the session is disputed."""
    ev = customer["evidence"]
    if ev is None:
        return Proof()
    proof = check_evidence(ev, session["session"], session["merchant"],
                           session["currency_merchant"], session["deposit_merchant"],
                           bytes.fromhex(session["session_key"]))
    reasons += [f"customer evidence: {p}" for p in proof.problems]
    if not proof.problems and (customer["index"] != proof.index or
                               customer["total"] != proof.index * proof.unit):
        reasons.append(f"the customer's record claims link {customer['index']} = "
                       f"{customer['total']}; its evidence shows link {proof.index}")
        return Proof()
    return proof if not proof.problems else Proof()


@dataclass(frozen=True)
class Settlement:
    """The money of a cleared session: the merchant is paid ``paid`` from the deposit, the rest
    goes back to the customer at the session's rate, rounded down (the leftover to the
    rounding account), and the customer is charged ``withdrawal`` = deposit - rest."""

    paid: Amount
    back: Conversion
    withdrawal: Amount


def settle(deposit_customer: Amount, deposit_merchant: Amount, rate_back: Any,
           paid: int) -> Settlement:
    rest = Amount(deposit_merchant.minor - paid, deposit_merchant.code)
    back = convert(rest, deposit_customer.code, rate_back)
    return Settlement(Amount(paid, deposit_merchant.code), back,
                      Amount(deposit_customer.minor - back.target.minor, deposit_customer.code))


def clearing_postings(s: Settlement, session: str, account_manager: str,
                      merchant: str) -> list[tuple[str, Amount]]:
    """The deposit account emptied: the merchant's part to the merchant, the rest converted
    back to the account manager (it sums to zero in each currency)."""
    out = [(f"deposit:{session}", Amount(-s.paid.minor, s.paid.code)),
           (f"merchant:{merchant}", s.paid)]
    return out + conversion_postings(s.back, f"deposit:{session}", f"am:{account_manager}")


# the mediating agent's clock: what is due, and a receipt marked

def mark_delivered(engine: Engine, session: str, column: str, now: int) -> None:
    with step(engine) as conn:
        conn.execute(update(D.acq_clearings).where(D.acq_clearings.c.session == session)
                     .values({column: 1, "updated": now}))


def due(engine: Engine, now: int, grace_ms: int, skip: Sequence[str] = ()
        ) -> list[dict[str, Any]]:
    """Open sessions past their expiry or with a record older than the grace (but those in
    ``skip``: waiting to ask their merchant again); clearings not yet received by both
    account managers (each ``{"kind": ..., **row}``)."""
    s, r, c = D.acq_sessions.c, D.acq_records.c, D.acq_clearings.c
    with engine.connect() as conn:
        late = select(r.session).where(r.at <= now - grace_ms)
        query = select(D.acq_sessions).where(s.state == D.OPEN, or_(
            s.expires <= now, s.session.in_(late)))
        if skip:
            query = query.where(s.session.not_in(list(skip)))
        rows = [{"kind": "close", **dict(x._mapping)} for x in conn.execute(
            query.order_by(s.expires).limit(500)).all()]
        rows += [{"kind": "deliver", **dict(x._mapping)} for x in conn.execute(
            select(D.acq_clearings).where(or_(c.am_done == 0, c.mam_done == 0))
            .limit(500)).all()]
    return rows
