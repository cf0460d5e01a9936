"""The operator's decision on an order the SP left ``in_doubt`` after its tries
(``svcard sp order settle ORDER_REF``): from evidence, never a guess.

The evidence, in the order it is looked at:

1. **The pool's record of the payment** (``sp_purse_payments``, written step by step from the
   purse's own journal). ``paid``: the purse paid and the merchant confirmed: the order is paid.
   ``failed``, ``void`` or none: nothing reached the card: the order is failed. ``started``:
   a purse may be about to draw: not decided.
2. **The purse's journal** (``JOURNAL_DIR/SERIAL.jsonl``), for a payment the books left at
   ``drawing`` or ``debited``: a final line there (``done``, ``abandoned``, ``refused``,
   ``unproven``) is brought into the books first (exactly as the pool's resume does), then 1.
   again. A transaction still open in the journal needs the card itself: the SP's resume
   (``svcard serve sp`` at start, or the purse's next lease) asks it; not decided here.
3. **The payment server's record** (``--payment-db``), for a payment the card made (the SP
   holds its TAC) that the merchant's side did not confirm to the SP (``disputed``,
   ``unproven``). Taken only when it is the same transaction, card, counter and amount and,
   if ``confirmed``, carries the very TAC the card gave the SP (which no one without the
   card's key can make): ``confirmed`` -> paid (the merchant's POS got the money: clearing pays
   it); ``failed``/``voided`` -> the merchant was not paid: the order is failed (the card's
   debit stays ``disputed`` in the pool's books, for the audit and a person).

Paid: ``in_doubt -> paid -> billed`` (the bill line at the order's prices; the goods the pool
recorded are relayed through the customer's lookup). Failed: ``in_doubt -> failed``, the
customer's reservation given back, and the pool's claim closed for good when nothing was
paid. Each decision is one compare-and-set on the order's state and appends an
``operator`` event to the merchandising log with its evidence. Evidence missing, conflicting
or not final: :class:`NotDecided`, with one line saying which, and nothing changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select, update

from ..kit.db import now_ms, reading, step
from ..pay import records as pay_records
from ..terminal.journal import Journal
from . import db as D
from .billing import bill_order, log_event
from .purses import db as PDB
from .purses.config import from_row
from .purses.recording import RecordingJournal
from .server.payment import record_failed, record_paid

PAY_FINAL_NOT_PAID = ("failed", "voided")


class NotDecided(Exception):
    """The evidence is missing, conflicting or not final: nothing was changed."""


@dataclass
class Decision:
    order_ref: str
    state: str                  # billed | failed
    evidence: str
    line: dict[str, Any] | None = None
    goods: str | None = None
    steps: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"order_ref": self.order_ref, "state": self.state, "evidence": self.evidence,
                "line": self.line, "goods": self.goods, "steps": self.steps}

    def text(self) -> str:
        head = f"order {self.order_ref}: {self.state} ({self.evidence})"
        if self.line is not None:
            head += f"; billed {self.line['billed']} to {self.line['customer']}"
        return "\n".join([head, *[f"  {s}" for s in self.steps]])


def _order(engine: Engine, order_ref: str) -> dict[str, Any] | None:
    with reading(engine) as conn:
        row = conn.execute(select(D.orders).where(D.orders.c.order_ref == order_ref)).first()
    return dict(row._mapping) if row is not None else None


def _payment(engine: Engine, order_ref: str) -> dict[str, Any] | None:
    with reading(engine) as conn:
        row = conn.execute(select(PDB.payments).where(
            PDB.payments.c.order_ref == order_ref)).first()
    return dict(row._mapping) if row is not None else None


def settle_order(engine: Engine, order_ref: str, *, journal_dir: Path | None = None,
                 payment_dbs: tuple[str, ...] = (), maximum: int = 2**62,
                 due_days: int = 14) -> Decision:
    """Decide the ``in_doubt`` order ``order_ref`` from evidence (see the module text);
    :class:`NotDecided` (nothing changed) when the evidence does not decide it. ``maximum``
    and ``due_days``: the billing settings a bill line is made under."""
    order = _order(engine, order_ref)
    if order is None:
        raise NotDecided(f"no order {order_ref} in this SP database")
    if order["state"] != D.IN_DOUBT:
        raise NotDecided(f"order {order_ref} is {order['state']}, not in_doubt: nothing to "
                         f"settle")
    steps: list[str] = []
    pay = _payment(engine, order_ref)
    if pay is not None and pay["state"] in ("drawing", "debited"):
        pay = _from_journal(engine, pay, journal_dir, steps)
    if pay is None:
        return _failed(engine, order, "the pool never claimed it: nothing was paid", steps,
                       close_claim=True)
    state = pay["state"]
    if state in ("failed", "void"):
        why = f"the pool's record: {state}, nothing was paid ({pay['reason']})"
        return _failed(engine, order, why[:250], steps, close_claim=True)
    if state == "started":
        raise NotDecided(f"order {order_ref}: purse {pay['purse_serial']} claimed it and may "
                         f"be about to draw; the SP's resume of that purse decides it first")
    if state == "paid":
        return _paid(engine, order, pay, f"purse {pay['purse_serial']} paid {pay['amount']} "
                     f"(counter {pay['counter']}, TAC {pay['tac']}) and the merchant "
                     f"confirmed it", steps, maximum, due_days)
    if state in ("disputed", "unproven"):
        return _by_payment_server(engine, order, pay, payment_dbs, steps, maximum, due_days)
    raise NotDecided(f"order {order_ref}: the pool's record is {state}, which this command "
                     f"does not decide")


def _from_journal(engine: Engine, pay: dict[str, Any], journal_dir: Path | None,
                  steps: list[str]) -> dict[str, Any]:
    """A payment the books left open: the purse journal's final line brought in first."""
    serial, txn = str(pay["purse_serial"]), str(pay["txn_id"] or "")
    name = f"order {pay['order_ref']} ({pay['state']}, purse {serial}, transaction {txn})"
    if journal_dir is None:
        raise NotDecided(f"{name}: evidence missing: give the purses' journal folder "
                         f"(--journal-dir or --config)")
    path = journal_dir / f"{serial}.jsonl"
    if not path.is_file():
        raise NotDecided(f"{name}: evidence missing: no journal {path}")
    journal = Journal(path)
    entry = journal.entry(txn)
    if entry is None:
        raise NotDecided(f"{name}: evidence missing: the journal {path} does not hold it")
    if entry.get("card_serial") != serial:
        raise NotDecided(f"{name}: the journal's transaction {txn} is card "
                         f"{entry.get('card_serial')}'s, not this purse's: not evidence")
    if journal.is_open(txn):
        raise NotDecided(f"{name}: open in the purse's journal at step {entry.get('state')}: "
                         f"only the card can tell; the SP's resume of the purse asks it")
    RecordingJournal(path, PDB.PurseBook(engine)).replay(txn, str(entry["state"]), entry)
    steps.append(f"the purse's journal closed transaction {txn} as {entry['state']}")
    after = _payment(engine, str(pay["order_ref"]))
    if after is None or after["state"] in ("drawing", "debited"):
        raise NotDecided(f"{name}: the journal's {entry['state']} did not decide it")
    return after


def _by_payment_server(engine: Engine, order: dict[str, Any], pay: dict[str, Any],
                       payment_dbs: tuple[str, ...], steps: list[str], maximum: int,
                       due_days: int) -> Decision:
    """The card paid (its TAC is in the pool's books); the payment server says whether the
    merchant's POS took it."""
    ref, txn = str(order["order_ref"]), str(pay["txn_id"] or "")
    name = (f"order {ref}: purse {pay['purse_serial']} paid {pay['amount']} (transaction "
            f"{txn}, counter {pay['counter']}) and the merchant's side is {pay['state']}")
    if not payment_dbs:
        raise NotDecided(f"{name}: evidence missing: give the merchant's payment server "
                         f"database (--payment-db)")
    found = [p for url in payment_dbs for p in pay_records.payments(url)
             if p["txn_id"] == txn]
    if not found:
        raise NotDecided(f"{name}: evidence missing: no payment server record of it")
    if len(found) > 1:
        raise NotDecided(f"{name}: {len(found)} payment server records of one transaction: "
                         f"conflicting, not evidence")
    rec = found[0]
    same = (str(rec["card_serial"])[-16:].lower() == str(pay["purse_serial"])[-16:].lower()
            and pay["counter"] is not None and int(rec["card_counter"]) == int(pay["counter"])
            and int(rec["amount"]) == int(pay["amount"] or -1))   # (a new purse pays at 0)
    if not same:
        raise NotDecided(f"{name}: the payment server's record is card {rec['card_serial']} "
                         f"counter {rec['card_counter']} amount {rec['amount']}: another "
                         f"payment, not evidence")
    if rec["state"] == "confirmed":
        if not pay["tac"] or str(rec["tac"] or "").lower() != str(pay["tac"]).lower():
            raise NotDecided(f"{name}: the payment server's 'confirmed' carries TAC "
                             f"{rec['tac']}, not the card's TAC {pay['tac'] or '(none)'}: "
                             f"not taken as proof")
        with step(engine) as conn:   # the pool's books follow: the merchant was paid
            conn.execute(update(PDB.payments).where(
                PDB.payments.c.order_ref == ref,
                PDB.payments.c.state.in_(("disputed", "unproven"))).values(
                state="paid", reason="operator: the payment server confirmed it with the "
                                     "card's TAC", updated=now_ms()))
        steps.append(f"payment server: {rec['merchant_id']}/{txn} confirmed with the card's "
                     f"TAC {rec['tac']}")
        paid = _payment(engine, ref) or pay
        return _paid(engine, order, paid, f"the payment server confirmed {rec['merchant_id']}"
                     f"/{txn} with the card's TAC", steps, maximum, due_days)
    if rec["state"] in PAY_FINAL_NOT_PAID:
        steps.append(f"payment server: {rec['merchant_id']}/{txn} is {rec['state']} "
                     f"({rec['reason']}); the card's debit stays {pay['state']} for the audit")
        return _failed(engine, order, f"the payment server {rec['state']} {txn}: the "
                       f"merchant was not paid", steps, close_claim=False)
    raise NotDecided(f"{name}: the payment server's record is {rec['state']}, not final: "
                     f"ask again later")


def _paid(engine: Engine, order: dict[str, Any], pay: dict[str, Any], evidence: str,
          steps: list[str], maximum: int, due_days: int) -> Decision:
    ref = str(order["order_ref"])
    outcome = from_row(pay)
    if not record_paid(engine, ref, outcome):
        now = _order(engine, ref) or {}
        raise NotDecided(f"order {ref} is {now.get('state')} now: the SP decided it meanwhile")
    _log(engine, order, "paid", evidence)
    line = bill_order(engine, ref, maximum, due_days)
    if line is None:   # billed by the SP's own recovery in between: its line stands
        steps.append("billed by the SP meanwhile")
    return Decision(ref, D.BILLED, evidence, line=line, goods=outcome.goods or None,
                    steps=steps)


def _failed(engine: Engine, order: dict[str, Any], evidence: str, steps: list[str], *,
            close_claim: bool) -> Decision:
    ref = str(order["order_ref"])
    if close_claim:
        if not record_failed(engine, ref, f"operator: {evidence}"):
            raise NotDecided(f"order {ref}: a payment for it started meanwhile: run again "
                             f"once it is settled")
    else:
        at = now_ms()
        with step(engine) as conn:
            moved = conn.execute(update(D.orders).where(
                D.orders.c.order_ref == ref, D.orders.c.state == D.IN_DOUBT).values(
                state=D.FAILED, reason=f"operator: {evidence}"[:300], updated=at)).rowcount
            if moved != 1:
                raise NotDecided(f"order {ref} changed meanwhile: run again")
            conn.execute(update(D.customers).where(
                D.customers.c.id == order["customer"]).values(
                reserved=D.customers.c.reserved - order["reserved"], updated=at))
            log_event(conn, ref, str(order["customer"]), "failed", at,
                      reason=f"operator: {evidence}"[:300])
    _log(engine, order, "failed", evidence)
    return Decision(ref, D.FAILED, evidence, steps=steps)


def _log(engine: Engine, order: dict[str, Any], decided: str, evidence: str) -> None:
    at = now_ms()
    with step(engine) as conn:
        log_event(conn, str(order["order_ref"]), str(order["customer"]), "operator", at,
                  decided=decided, evidence=evidence[:300])


