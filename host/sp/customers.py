"""Customer accounts at the SP (``svcard sp customer add|block|unblock|list``): straight in the
SP's database, as the bank's accounts are in the bank's."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from ..kit.db import now_ms, reading, step
from . import db as D

ID_MAX, NAME_MAX, REASON_MAX = 32, 100, 200


class CustomerError(ValueError):
    """A customer command that cannot be done; the message says why."""


def add_customer(engine: Engine, customer: str, public_key: bytes, credit_limit: int,
                 currency_code: int, name: str | None = None) -> None:
    if not 1 <= len(customer) <= ID_MAX:
        raise CustomerError(f"a customer id has 1 to {ID_MAX} characters")
    at = now_ms()
    try:
        with step(engine) as conn:
            conn.execute(insert(D.customers).values(
                id=customer, name=(name or customer)[:NAME_MAX], public_key=public_key.hex(),
                state=D.ACTIVE, block_reason="", credit_limit=credit_limit, reserved=0,
                open_total=0, owed=0, currency_code=currency_code, created=at, updated=at))
    except IntegrityError:
        raise CustomerError(f"customer {customer} exists already") from None


def set_blocked(engine: Engine, customer: str, blocked: bool, reason: str = "") -> None:
    """Block (with ``reason``) or unblock ``customer``; an unknown customer is refused."""
    values = ({"state": D.BLOCKED, "block_reason": reason[:REASON_MAX] or "blocked"}
              if blocked else {"state": D.ACTIVE, "block_reason": ""})
    with step(engine) as conn:
        changed = conn.execute(update(D.customers).where(D.customers.c.id == customer).values(
            updated=now_ms(), **values)).rowcount
    if changed != 1:
        raise CustomerError(f"no customer {customer}")


def set_credit_limit(engine: Engine, customer: str, credit_limit: int) -> None:
    with step(engine) as conn:
        changed = conn.execute(update(D.customers).where(D.customers.c.id == customer).values(
            credit_limit=credit_limit, updated=now_ms())).rowcount
    if changed != 1:
        raise CustomerError(f"no customer {customer}")


def list_customers(engine: Engine) -> list[dict[str, Any]]:
    """Every customer (no key material but the public key), by id."""
    with reading(engine) as conn:
        rows = conn.execute(select(D.customers).order_by(D.customers.c.id)).all()
    return [dict(r._mapping) for r in rows]
