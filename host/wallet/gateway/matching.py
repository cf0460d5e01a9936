"""Embodiment 1's match (seed 003 FIG. 4 steps b5-b8), as database steps.

:func:`store_choice` keeps what the member's wallet sent (the card chosen and the purchase
information the mall's page gave it). :func:`match` takes the mall's own view of the purchase
and, in ONE conditional UPDATE, moves the one purchase whose every field equals it (mall,
order, the customer's id at the mall, product-list digest, amount, currency, nonce, expiry)
from ``chosen`` (and not expired) to ``approving``. A purchase left ``approving`` longer than
:data:`STALE_MS` (the process asking for its debit stopped) matches again, so the same debit
ref is asked again and never a second debit; one still in flight does not (a concurrent copy
of the request is refused). :func:`settle` records the financial system's answer,
compare-and-set; :func:`in_flight` lists what a restart must ask about again."""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import Engine, and_, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from ...kit.db import now_ms, reading, step
from ...kit.http import Refused
from . import db as D

STALE_MS = 10_000
MAX_OPEN = 50            # a member's purchases chosen or filled, unpaid and not expired
FIELDS = {"mall": "mall", "order": "mall_order", "customer": "customer",
          "products_digest": "products_digest", "amount": "amount", "currency": "currency",
          "nonce": "nonce", "expires": "expires"}


def store_choice(engine: Engine, member: str, card: str, p: dict[str, Any],
                 state: str = D.CHOSEN) -> str | None:
    """The new purchase's id, or None if the mall's order has a purchase already. ``state``:
    ``chosen`` (embodiment 1) or ``filled`` (2 and 3: the secret is checked later). Refused
    (429) when the member has :data:`MAX_OPEN` open purchases already (counted in the step)."""
    pid = secrets.token_hex(16)
    now = now_ms()
    c = D.purchases.c
    try:
        with step(engine) as conn:
            if conn.execute(select(func.count()).select_from(D.purchases).where(
                    c.member == member, c.state.in_((D.CHOSEN, D.FILLED)),
                    c.expires > now)).scalar_one() >= MAX_OPEN:
                raise Refused(429, 429, f"at most {MAX_OPEN} open purchases per member: "
                                        "pay or let some expire first")
            conn.execute(insert(D.purchases).values(
                id=pid, member=member, card=card, state=state, reason="", created=now,
                updated=now, **{column: p[name] for name, column in FIELDS.items()}))
    except IntegrityError:
        return None
    return pid


def match(engine: Engine, p: dict[str, Any], now: int, state: str = D.CHOSEN,
          extra: dict[str, str] | None = None) -> tuple[str, dict[str, Any] | None]:
    """(``matched``, the purchase) or (why not, the purchase by mall and order or None):
    ``none``, ``approved``, ``declined``, ``approving`` (in flight), ``expired``,
    ``mismatch``. Only a purchase in ``state`` matches (a ``filled`` one never matches an
    embodiment-1 request, which carries no secret), and ``extra`` columns must be equal too
    (embodiment 2: the purchase id in the profile token and the card)."""
    c = D.purchases.c
    wanted = {column: p[name] for name, column in FIELDS.items()} | (extra or {})
    equal = [c[column] == value for column, value in wanted.items()]
    with step(engine) as conn:
        done = conn.execute(update(D.purchases).where(
            *equal, or_(and_(c.state == state, c.expires > now),
                        and_(c.state == D.APPROVING, c.updated < now - STALE_MS))).values(
            state=D.APPROVING, updated=now)).rowcount
        row = conn.execute(select(D.purchases).where(
            c.mall == p["mall"], c.mall_order == p["order"])).first()
    found = dict(row._mapping) if row is not None else None
    if done == 1:
        return "matched", found
    if found is None:
        return "none", None
    same = all(found[column] == value for column, value in wanted.items())
    if found["state"] in (D.APPROVED, D.DECLINED) or (same and found["state"] == D.APPROVING):
        return found["state"], found
    if same and found["state"] == state and found["expires"] <= now:
        return "expired", found
    return "mismatch", found


def settle(engine: Engine, pid: str, approved: bool, reason: str) -> bool:
    c = D.purchases.c
    with step(engine) as conn:
        return bool(conn.execute(update(D.purchases).where(
            c.id == pid, c.state == D.APPROVING).values(
            state=D.APPROVED if approved else D.DECLINED, reason=reason[:200],
            updated=now_ms())).rowcount == 1)


def by_order(engine: Engine, mall: str, order: str) -> dict[str, Any] | None:
    c = D.purchases.c
    with reading(engine) as conn:
        row = conn.execute(select(D.purchases).where(c.mall == mall,
                                                     c.mall_order == order)).first()
    return dict(row._mapping) if row is not None else None


def purchase(engine: Engine, pid: str) -> dict[str, Any] | None:
    with reading(engine) as conn:
        row = conn.execute(select(D.purchases).where(D.purchases.c.id == pid)).first()
    return dict(row._mapping) if row is not None else None


def in_flight(engine: Engine) -> list[dict[str, Any]]:
    """Purchases matched whose debit's outcome was never recorded."""
    with reading(engine) as conn:
        rows = conn.execute(select(D.purchases).where(
            D.purchases.c.state == D.APPROVING)).all()
    return [dict(r._mapping) for r in rows]
