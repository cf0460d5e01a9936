"""The members' electronic wallets (seed 003 FIG. 1 step a4): which cards, accounts and credit
cards each member holds, as database steps."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError

from ...kit.db import now_ms, reading, step
from . import db as D

MAX_PER_WALLET = 50


def add(engine: Engine, member: str, kind: str, number: str, card_kind: str = "") -> str:
    """``added``, ``held`` (in this wallet already), ``taken`` (in another's) or ``full``."""
    w = D.wallet.c
    try:
        with step(engine) as conn:
            row = conn.execute(select(w.member).where(w.kind == kind, w.number == number)).first()
            if row is not None:
                return "held" if row.member == member else "taken"
            if len(conn.execute(select(w.number).where(w.member == member)).all()) \
                    >= MAX_PER_WALLET:
                return "full"
            conn.execute(insert(D.wallet).values(kind=kind, number=number, member=member,
                                                 card_kind=card_kind, added=now_ms()))
    except IntegrityError:
        return "taken"
    return "added"


def holds(engine: Engine, member: str, kind: str, number: str) -> dict[str, Any] | None:
    w = D.wallet.c
    with reading(engine) as conn:
        row = conn.execute(select(D.wallet).where(w.kind == kind, w.number == number,
                                                  w.member == member)).first()
    return dict(row._mapping) if row is not None else None


def contents(engine: Engine, member: str) -> list[dict[str, Any]]:
    w = D.wallet.c
    with reading(engine) as conn:
        rows = conn.execute(select(D.wallet).where(w.member == member)
                            .order_by(w.added, w.number)).all()
    return [dict(r._mapping) for r in rows]


def owner(conn: Any, number: str) -> str:
    """The member whose wallet holds card ``number`` ("" if none), inside a step."""
    w = D.wallet.c
    found = conn.execute(select(w.member).where(w.kind == "card", w.number == number)).scalar()
    return str(found) if found is not None else ""
