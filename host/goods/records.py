"""What other systems (the audit) may read of the goods parties (seed 000): each party's
database, read only. Nothing here writes a row or creates a database (SQLite is opened
read-only, PostgreSQL in a read-only session). Which party a database belongs to is read from
its tables; a database that does not exist or is no goods party's is a
:class:`~svcard.host.kit.db.DatabaseError`, a newer schema a
:class:`~svcard.host.kit.schema.SchemaError`.

The large signed texts (digital orders, confirmations, first messages) and the PIN hashes are
left out of every row: the audit needs the states, amounts, currencies, cards and stamps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine, inspect, select

from ..kit.db import DatabaseError, masked_url, open_existing
from ..kit.schema import check
from . import db as D

GOODS_DB = "goods party database"
T = TypeVar("T")

# each party's tables, by which its database is told from the others'
TABLES: dict[str, tuple[Any, ...]] = {
    "merchant": (D.merchant_orders,),
    "payment": (D.payment_orders,),
    "auth": (D.devices, D.auth_orders),
    "bank": (D.accounts, D.bank_payments),
    "fulfil": (D.goods,),
}
# read too when present (made by newer servers; a database without them is still that party's):
# the purse-paid path's sessions (payment: card, counter, TAC of each committed composite
# purchase) and goods (fulfil: ``capp`` -> ``written`` | ``expired``, never in goods_goods)
PURSE_TABLES: dict[str, tuple[Any, ...]] = {
    "payment": (D.purse_sessions,),
    "fulfil": (D.purse_goods, D.capp_sessions),
}
LEFT_OUT = frozenset({"digital_order", "merchant_signature", "confirmation",
                      "confirmation_signature", "answer", "first_message", "first_signature",
                      "pin_hash", "public_key", "expected_mac2"})


def _role(engine: Engine, url: str) -> str:
    with engine.connect() as conn:
        inspector = inspect(conn)
        found = [role for role, tables in TABLES.items()
                 if all(inspector.has_table(t.name) for t in tables)]
    if len(found) != 1:
        raise DatabaseError(f"{masked_url(url)}: not a {GOODS_DB} (no goods merchant, "
                            "payment, authentication, institution or fulfilment tables)")
    return found[0]


def _reading(url: str, read: Callable[[Engine, str], T]) -> T:
    engine = open_existing(url, (), GOODS_DB)
    try:
        role = _role(engine, url)
        check(engine, D.SCHEMAS[role])
        return read(engine, role)
    finally:
        engine.dispose()


def _rows(engine: Engine, table: Any) -> list[dict[str, Any]]:
    """The rows, without the texts; ``answered``: whether the row's ``answer`` is set (the
    payment server's "the fulfilment server kept it")."""
    with engine.connect() as conn:
        found = conn.execute(select(table).order_by(*table.primary_key.columns)).all()
    out = []
    for r in found:
        row = {k: v for k, v in r._mapping.items() if k not in LEFT_OUT}
        if "answer" in r._mapping:
            row["answered"] = r._mapping["answer"] is not None
        out.append(row)
    return out


def role_of(url: str) -> str:
    """Which party's database ``url`` is: merchant, payment, auth, bank or fulfil."""
    return _reading(url, lambda _engine, role: role)


def books(url: str) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    """(the party, its tables' rows by table name), in one read-only session."""
    def read(engine: Engine, role: str) -> tuple[str, dict[str, list[dict[str, Any]]]]:
        with engine.connect() as conn:
            inspector = inspect(conn)
            extra = [t for t in PURSE_TABLES.get(role, ()) if inspector.has_table(t.name)]
        return role, {t.name: _rows(engine, t) for t in (*TABLES[role], *extra)}
    return _reading(url, read)


def goods(url: str) -> list[dict[str, Any]]:
    """The fulfilment server's goods (state, card, device, record, deadline, writes, amount,
    currency)."""
    role, tables = books(url)
    if role != "fulfil":
        raise DatabaseError(f"{masked_url(url)}: the {role} party's database, not the "
                            "fulfilment server's")
    return tables[D.goods.name]


def check_goods_db(url: str) -> None:
    """Refuse a database that does not exist or is no goods party's (read-only)."""
    role_of(url)
