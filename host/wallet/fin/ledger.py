"""The financial system's database steps. Each is ONE transaction (``kit.db.step``): the check
and the change it allows cannot be split, and every money movement is claimed by its unique
``ref`` in the same transaction, so a repeated request gets the first one's outcome and a
reused ref with other content is refused (:class:`RefConflict`)."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from ...kit.db import now_ms, reading, step
from . import db as D

MAX_CARDS_PER_APPLICANT = 20


class RefConflict(Exception):
    """A ref used before for another request."""


@dataclass(frozen=True)
class Outcome:
    result: str            # done | declined
    reason: str
    balance: int | None    # the card's balance after it (None: no such card)
    repeated: bool = False

    def answer(self, ref: str) -> dict[str, Any]:
        return {"ref": ref, "result": self.result, "reason": self.reason,
                "balance": self.balance, "repeated": self.repeated}


def new_number() -> str:
    return "9" + "".join(secrets.choice("0123456789") for _ in range(15))


def issue_card(engine: Engine, ref: str, kind: str, currency: int, applicant: str,
               digest_of: Any) -> tuple[str | None, bool, str]:
    """(number, new, reason): a new card for ``applicant``, or the one ``ref`` issued before
    (new False); (None, False, reason) when the application is not approved."""
    for _ in range(8):
        number = new_number()
        try:
            with step(engine) as conn:
                done = conn.execute(select(D.issues.c.number).where(
                    D.issues.c.ref == ref)).scalar()
                if done is not None:
                    return str(done), False, "issued before under this ref"
                held = conn.execute(select(D.cards.c.number).where(
                    D.cards.c.applicant == applicant)).all()
                if len(held) >= MAX_CARDS_PER_APPLICANT:
                    return None, False, f"at most {MAX_CARDS_PER_APPLICANT} cards per member"
                now = now_ms()
                conn.execute(insert(D.cards).values(
                    number=number, kind=kind, state=D.ACTIVE, balance=0, currency=currency,
                    secret_digest=digest_of(number), failures=0, applicant=applicant,
                    created=now, updated=now))
                conn.execute(insert(D.issues).values(ref=ref, number=number, at=now))
            return number, True, "approved"
        except IntegrityError:
            continue   # a number taken already, or the same ref at the same moment: again
    raise RuntimeError("no free card number found")


def check_secret(engine: Engine, number: str, digest: str, max_failures: int) -> str:
    """``ok``, ``wrong`` (counted), ``locked`` (too many wrong tries) or ``unknown``."""
    with step(engine) as conn:
        card = conn.execute(select(D.cards).where(D.cards.c.number == number)
                            .with_for_update()).first()
        if card is None:
            return "unknown"
        if card.failures >= max_failures or card.state != D.ACTIVE:
            return "locked"
        ok = secrets.compare_digest(card.secret_digest, digest)
        conn.execute(update(D.cards).where(D.cards.c.number == number).values(
            failures=0 if ok else D.cards.c.failures + 1, updated=now_ms()))
    return "ok" if ok else "wrong"


def link_source(engine: Engine, kind: str, number: str, digest: str, applicant: str,
                max_failures: int) -> str:
    """Record that ``applicant`` proved it holds account/credit card ``number``: ``ok``,
    ``wrong`` (counted), ``locked`` (too many wrong secrets in a row) or ``unknown``."""
    table = D.accounts if kind == "account" else D.credit
    with step(engine) as conn:
        row = conn.execute(select(table.c.secret_digest, table.c.failures).where(
            table.c.number == number).with_for_update()).first()
        if row is None:
            return "unknown"
        if row.failures >= max_failures:
            return "locked"
        ok = secrets.compare_digest(row.secret_digest, digest)
        conn.execute(update(table).where(table.c.number == number).values(
            failures=0 if ok else table.c.failures + 1, updated=now_ms()))
        if not ok:
            return "wrong"
        if conn.execute(select(D.links.c.created).where(
                D.links.c.kind == kind, D.links.c.number == number,
                D.links.c.applicant == applicant)).first() is None:
            conn.execute(insert(D.links).values(kind=kind, number=number, applicant=applicant,
                                                created=now_ms()))
    return "ok"


def _repeat(conn: Any, ref: str, digest: str) -> Outcome | None:
    row = conn.execute(select(D.movements).where(D.movements.c.ref == ref)).first()
    if row is None:
        return None
    if row.digest != digest:
        raise RefConflict(f"ref {ref} was used for another request")
    balance = conn.execute(select(D.cards.c.balance).where(
        D.cards.c.number == row.card)).scalar()
    return Outcome(row.result, row.reason, balance, repeated=True)


def move(engine: Engine, ref: str, kind: str, card: str, source: str, amount: int,
         currency: int, digest: str, applicant: str | None, max_balance: int,
         order: str = "") -> Outcome:
    """One movement, in one step: ``cash`` (an agent's top-up), ``account`` or ``credit``
    (a charge from a source ``applicant`` linked) credit the card; ``debit`` takes the
    amount off it. Declined with nothing changed: no such card, another currency, a source
    not linked or short of money, a balance too low or over ``max_balance``."""
    try:
        return _move(engine, ref, kind, card, source, amount, currency, digest, applicant,
                     max_balance, order)
    except IntegrityError:   # the same ref at the same moment: the winner's outcome
        with reading(engine) as conn:
            found = _repeat(conn, ref, digest)
        if found is None:
            raise
        return found


def _move(engine: Engine, ref: str, kind: str, card: str, source: str, amount: int,
          currency: int, digest: str, applicant: str | None, max_balance: int,
          order: str) -> Outcome:
    with step(engine) as conn:
        found = _repeat(conn, ref, digest)
        if found is not None:
            return found
        reason = _apply(conn, kind, card, source, amount, currency, applicant, max_balance)
        conn.execute(insert(D.movements).values(
            ref=ref, kind=kind, card=card, source=source, amount=amount, currency=currency,
            digest=digest, result=D.DECLINED if reason else D.DONE, reason=reason or "",
            at=now_ms()))
        balance = conn.execute(select(D.cards.c.balance).where(
            D.cards.c.number == card)).scalar()
        if not reason:   # reported to the gateway: written with the movement itself
            at = now_ms()
            conn.execute(insert(D.outbox).values(ref=ref, sent=0, at=at, body=json.dumps({
                "ref": ref, "kind": kind, "card": card, "amount": amount,
                "currency": currency, "balance": balance, "counterparty": source,
                "order": order, "at": at}, sort_keys=True)))
    return Outcome(D.DECLINED if reason else D.DONE, reason or "", balance)


def _apply(conn: Any, kind: str, card: str, source: str, amount: int, currency: int,
           applicant: str | None, max_balance: int) -> str | None:
    """The movement's changes, or why it is declined (then nothing changed)."""
    c = D.cards.c
    row = conn.execute(select(D.cards).where(c.number == card).with_for_update()).first()
    if row is None:
        return "no such card"
    if row.state != D.ACTIVE:
        return "the card is blocked"
    if row.currency != currency:
        return "the card holds another currency"
    now = now_ms()
    if kind == "debit":
        done = conn.execute(update(D.cards).where(
            c.number == card, c.balance >= amount).values(
            balance=c.balance - amount, updated=now)).rowcount
        return None if done == 1 else "insufficient balance"
    if row.balance + amount > max_balance:
        return "the card's balance would pass its limit"
    if kind in ("account", "credit"):
        if applicant is None or row.applicant != applicant or conn.execute(
                select(D.links.c.created).where(D.links.c.kind == kind,
                                                D.links.c.number == source,
                                                D.links.c.applicant == applicant)).first() \
                is None:
            return f"this {kind} is not linked to the card's holder"
        if kind == "account":
            a = D.accounts.c
            done = conn.execute(update(D.accounts).where(
                a.number == source, a.currency == currency, a.balance >= amount).values(
                balance=a.balance - amount, updated=now)).rowcount
            if done != 1:
                return "the account's balance is too low"
        else:
            k = D.credit.c
            done = conn.execute(update(D.credit).where(
                k.number == source, k.currency == currency,
                k.used + amount <= k.credit_limit).values(
                used=k.used + amount, updated=now)).rowcount
            if done != 1:
                return "the credit card's limit would be passed"
    conn.execute(update(D.cards).where(c.number == card).values(
        balance=c.balance + amount, updated=now))
    return None


def balances(engine: Engine, numbers: list[str]) -> dict[str, dict[str, Any]]:
    with reading(engine) as conn:
        rows = conn.execute(select(D.cards).where(D.cards.c.number.in_(numbers))).all()
    return {r.number: {"balance": r.balance, "currency": r.currency, "kind": r.kind,
                       "state": r.state} for r in rows}


def add_source(engine: Engine, kind: str, number: str, digest: str, amount: int,
               currency: int) -> None:
    """A bank account (``amount``: its balance) or a credit card (``amount``: its limit),
    straight in the database (the bank's own business, not the wallet's)."""
    now = now_ms()
    with step(engine) as conn:
        if kind == "account":
            conn.execute(insert(D.accounts).values(number=number, balance=amount,
                                                   currency=currency, secret_digest=digest,
                                                   failures=0, updated=now))
        else:
            conn.execute(insert(D.credit).values(number=number, credit_limit=amount, used=0,
                                                 currency=currency, secret_digest=digest,
                                                 failures=0, updated=now))


def source_state(engine: Engine, kind: str, number: str) -> dict[str, Any] | None:
    table = D.accounts if kind == "account" else D.credit
    with reading(engine) as conn:
        row = conn.execute(select(table).where(table.c.number == number)).first()
    return dict(row._mapping) if row is not None else None


def pending_reports(engine: Engine, limit: int = 100) -> list[dict[str, Any]]:
    o = D.outbox.c
    with reading(engine) as conn:
        rows = conn.execute(select(o.body).where(o.sent == 0).order_by(o.at, o.ref)
                            .limit(limit)).all()
    return [json.loads(r.body) for r in rows]


def mark_sent(engine: Engine, refs: list[str]) -> None:
    with step(engine) as conn:
        conn.execute(update(D.outbox).where(D.outbox.c.ref.in_(refs)).values(sent=1))


def card_kind(engine: Engine, number: str) -> str | None:
    """``virtual`` or ``real``, or None for no such card."""
    with reading(engine) as conn:
        return conn.execute(select(D.cards.c.kind).where(D.cards.c.number == number)).scalar()


def van_purse_approval(engine: Engine, ref: str, card: str, source: str, amount: int,
                       currency: int) -> Outcome | None:
    """Embodiment 3 with a real card: the VAN's approval of purchase ``ref`` (``pay:ID``),
    given only on the gateway's debit of the same ref (made over its authenticated link once
    the card's purse paid that purchase, gateway/purse.py ``mirror``) for this card, mall,
    amount and currency. One step: that debit checked and the approval recorded (a second
    ask is ``repeated``). None: the purse has not paid this purchase (nothing recorded)."""
    try:
        return _van_purse_approval(engine, ref, card, source, amount, currency)
    except IntegrityError:
        # PostgreSQL: a concurrent copy recorded the approval first; seen now, ``repeated``
        return _van_purse_approval(engine, ref, card, source, amount, currency)


def _van_purse_approval(engine: Engine, ref: str, card: str, source: str, amount: int,
                        currency: int) -> Outcome | None:
    m, v = D.movements.c, D.van_purse.c
    with step(engine) as conn:
        paid = conn.execute(select(D.movements).where(m.ref == ref)).first()
        if paid is None or paid.result != D.DONE or paid.kind != "debit" or (
                paid.card, paid.source, paid.amount, paid.currency) != (
                card, source, amount, currency):
            return None
        before = conn.execute(select(v.ref).where(v.ref == ref)).first() is not None
        if not before:
            conn.execute(insert(D.van_purse).values(ref=ref, at=now_ms()))
        balance = conn.execute(select(D.cards.c.balance).where(
            D.cards.c.number == card)).scalar()
    return Outcome(D.DONE, "", balance, repeated=before)
