"""Step 2 of a retail order (FIG. 2 steps 204-208, FIG. 3A 312-316): the SP pays the merchant's
checkout with a purse of its pool (the merchant sees an ordinary card payment), records the
payment, and bills it.

The order's row is ``paying`` before :meth:`Payer.pay` is called, under the order's unique
``order_ref``; the pool records the payment under that reference and answers the same
reference again with the payment it recorded, never a second one. So every outcome is safe:

* the pool paid: ``paying -> paid`` (wholesale amount, merchant transaction, purse, goods,
  receipt) in one transaction, then the billing unit's ``paid -> billed`` in another;
* the pool said nothing was paid (:class:`PursePoolError`): ``paying -> failed``, and the
  reservation is given back in the same transaction;
* anything else (the payment's outcome is unknown: a merchant that failed after the card's
  debit, a crash): ``in_doubt``, the reservation kept. :func:`recover` asks the pool again
  under the same ``order_ref``.

After a restart :func:`recover` bills every ``paid`` order and asks again for every ``paying``
and ``in_doubt`` one, so no order stays paid and unbilled and none is paid twice.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol

import httpx
from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from ...kit.db import now_ms, reading, step
from ...pay.client import PaymentOutcome
from .. import db as D
from ..billing import log_event
from ..purses import db as PDB
from ..purses.pool import PursePoolError

log = logging.getLogger("svcard.sp")
MAX_ATTEMPTS = 5       # asks of the pool for an in-doubt order before it waits for an operator


class Payer(Protocol):
    """What the SP needs of its purse pool (``purses/pool.py:PursePool``)."""

    def pay(self, checkout_url: str, *, http: httpx.Client, order_ref: str,
            amount: int | None = None, max_amount: int | None = None) -> PaymentOutcome: ...


def close_unpaid(conn: Connection, order_ref: str, currency_code: int) -> bool:
    """In the SP's transaction that fails the order: close ``order_ref``'s claim in the pool
    for good (``failed`` or absent -> ``void``), so no pool, in this process or another, pays
    it afterwards. False when a payment for it is under way or made (the SP must not fail it).
    A row another transaction inserts meanwhile is an :class:`IntegrityError`."""
    now = now_ms()
    pay = PDB.payments.c
    if conn.execute(update(PDB.payments).where(
            pay.order_ref == order_ref, pay.state.in_(("failed", "void"))).values(
            state="void", updated=now)).rowcount == 1:
        return True
    if conn.execute(select(pay.state).where(pay.order_ref == order_ref)).first() is not None:
        return False
    conn.execute(insert(PDB.payments).values(
        order_ref=order_ref, purse_serial="", currency_code=currency_code, state="void",
        reason="the SP failed the order with nothing paid", created=now, updated=now))
    return True


class _ClaimLive(Exception):
    """The pool's row for the order shows a payment under way or made: not failed."""


def _move(engine: Engine, order_ref: str, expect: tuple[str, ...], state: str, event: str,
          release: bool, close_claim: bool = False, **values: Any) -> bool:
    """One order's state change (compare-and-set on its state), its log event, and the
    customer's reservation released when ``release``; with ``close_claim``, the pool's claim
    on the order closed for good in the same transaction (:class:`_ClaimLive` if it cannot
    be: nothing changed)."""
    at = now_ms()
    detail = {k: v for k, v in values.items() if k not in ("goods", "receipt")}
    with step(engine) as conn:
        changed = conn.execute(update(D.orders).where(
            D.orders.c.order_ref == order_ref, D.orders.c.state.in_(expect)).values(
            state=state, updated=at, **values)).rowcount
        if changed != 1:
            return False
        order = conn.execute(select(D.orders.c.customer, D.orders.c.reserved,
                                    D.orders.c.currency_code).where(
            D.orders.c.order_ref == order_ref)).one()
        if close_claim and not close_unpaid(conn, order_ref, int(order.currency_code)):
            raise _ClaimLive(order_ref)
        if release:
            conn.execute(update(D.customers).where(D.customers.c.id == order.customer).values(
                reserved=D.customers.c.reserved - order.reserved, updated=at))
        log_event(conn, order_ref, order.customer, event, at, **detail)
    return True


def record_paid(engine: Engine, order_ref: str, outcome: PaymentOutcome) -> bool:
    return _move(engine, order_ref, D.OPEN_STATES, D.PAID, "paid", False,
                 wholesale=int(outcome.amount), merchant_txn=outcome.txn_id[:32],
                 purse_serial=str(getattr(outcome, "purse_serial", ""))[:40],
                 goods=outcome.goods, receipt=json.dumps(outcome.receipt, sort_keys=True,
                                                         default=str),
                 reason="")


def record_failed(engine: Engine, order_ref: str, reason: str, attempts: int = 1) -> bool:
    """``failed`` and the reservation given back, only if no pool can pay the order any more
    (its claim closed in the same transaction). A payment under way for it (another SP
    process's pool took the order meanwhile): ``in_doubt`` instead, and False."""
    try:
        return _move(engine, order_ref, D.OPEN_STATES, D.FAILED, "failed", True,
                     close_claim=True, reason=reason[:300])
    except (_ClaimLive, IntegrityError):
        record_in_doubt(engine, order_ref, f"{reason[:150]}; but a payment for it is under "
                                           "way elsewhere: asked again later", attempts)
        return False


def record_in_doubt(engine: Engine, order_ref: str, reason: str, attempts: int) -> bool:
    return _move(engine, order_ref, D.OPEN_STATES, D.IN_DOUBT, "in_doubt", False,
                 reason=reason[:300], attempts=attempts)


def pay_order(engine: Engine, payer: Payer, http: httpx.Client, order: dict[str, Any]
              ) -> tuple[str, PaymentOutcome | None, str]:
    """Pay one ``paying``/``in_doubt`` order through the pool (blocking: a worker thread's
    call) and record what happened: (new state, outcome, reason)."""
    ref = str(order["order_ref"])
    attempts = int(order.get("attempts") or 0) + 1
    try:
        agreed = order.get("wholesale_agreed")
        outcome = payer.pay(str(order["checkout_url"]), http=http, order_ref=ref,
                            amount=None if agreed is None else int(agreed),
                            max_amount=int(order["max_wholesale"]))
    except PursePoolError as exc:       # the pool's word: nothing was paid
        reason = f"the SP could not pay: {exc}"
        return (D.FAILED if record_failed(engine, ref, reason, attempts)
                else _state(engine, ref),
                None, reason)
    except Exception as exc:            # the outcome is unknown: never guessed
        reason = f"payment outcome unknown ({type(exc).__name__}: {str(exc)[:200]})"
        log.warning("order %s in doubt: %s", ref, reason)
        record_in_doubt(engine, ref, reason, attempts)
        return _state(engine, ref), None, reason
    if not record_paid(engine, ref, outcome):
        return _state(engine, ref), outcome, ""
    return D.PAID, outcome, ""


def _state(engine: Engine, order_ref: str) -> str:
    with reading(engine) as conn:
        return str(conn.execute(select(D.orders.c.state).where(
            D.orders.c.order_ref == order_ref)).scalar_one())


def open_orders(engine: Engine, states: tuple[str, ...]) -> list[dict[str, Any]]:
    with reading(engine) as conn:
        rows = conn.execute(select(D.orders).where(D.orders.c.state.in_(states)).order_by(
            D.orders.c.id)).all()
    return [dict(r._mapping) for r in rows]
