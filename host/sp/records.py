"""What other systems (the audit, clearing) and the SP's own reading tools may read of the SP:
its database, read only. Nothing here writes a row or creates a database (SQLite is opened
read-only, PostgreSQL in a read-only session); a database that does not exist or is not an SP's
is a :class:`~svcard.host.kit.db.DatabaseError`, a newer schema a
:class:`~svcard.host.kit.schema.SchemaError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine, select

from ..kit.schema import open_for_reading
from . import db as D
from .purses import db as PDB

SP_DB = "service provider database"
T = TypeVar("T")


def _reading(url: str, read: Callable[[Engine], T]) -> T:
    engine = open_for_reading(url, D.TABLES, SP_DB, D.SCHEMA)
    try:
        return read(engine)
    finally:
        engine.dispose()


def _rows(engine: Engine, table: Any, *where: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(
            select(table).where(*where).order_by(*table.primary_key.columns))]


def customers(url: str) -> list[dict[str, Any]]:
    """Every customer account (id, state, credit limit, reserved, open total, owed, ...)."""
    return _reading(url, lambda e: _rows(e, D.customers))


def orders(url: str, state: str | None = None) -> list[dict[str, Any]]:
    """The retail orders, oldest first; only those in ``state`` when given."""
    where = [] if state is None else [D.orders.c.state == state]
    return _reading(url, lambda e: _rows(e, D.orders, *where))


def order_log(url: str, order_ref: str | None = None) -> list[dict[str, Any]]:
    """The merchandising log, in order; one order's events when ``order_ref`` is given."""
    where = [] if order_ref is None else [D.order_log.c.order_ref == order_ref]
    return _reading(url, lambda e: _rows(e, D.order_log, *where))


def bill_lines(url: str, customer: str | None = None) -> list[dict[str, Any]]:
    """Every bill line (one per paid order): retail, wholesale, fee, discount, billed."""
    where = [] if customer is None else [D.bill_lines.c.customer == customer]
    return _reading(url, lambda e: _rows(e, D.bill_lines, *where))


def bills(url: str, customer: str | None = None) -> list[dict[str, Any]]:
    """The issued bills, each with its ``lines`` (list of bill line rows)."""
    def read(engine: Engine) -> list[dict[str, Any]]:
        where = [] if customer is None else [D.bills.c.customer == customer]
        found = _rows(engine, D.bills, *where)
        lines = _rows(engine, D.bill_lines, D.bill_lines.c.bill_id.is_not(None), *(
            [] if customer is None else [D.bill_lines.c.customer == customer]))
        for bill in found:
            bill["items"] = [ln for ln in lines if ln["bill_id"] == bill["id"]]
        return found
    return _reading(url, read)


def purses(url: str) -> list[dict[str, Any]]:
    """The provider's purses: serial, reader, state, balance (as last seen), opening balance,
    counters, currency."""
    return _reading(url, lambda e: _rows(e, PDB.purses))


def purse_payments(url: str, order_ref: str | None = None) -> list[dict[str, Any]]:
    """Which purse paid what, one row per ``order_ref`` (state, amount, counter, TAC)."""
    where = [] if order_ref is None else [PDB.payments.c.order_ref == order_ref]
    return _reading(url, lambda e: _rows(e, PDB.payments, *where))


def books(url: str) -> dict[str, list[dict[str, Any]]]:
    """Everything the audit's three-way closing reads, in one read-only session: customers,
    orders, bill lines, bills, purses, purse payments and purse loads (each a list of rows;
    the large goods/receipt/outcome texts left out)."""
    def read(engine: Engine) -> dict[str, list[dict[str, Any]]]:
        out = {"customers": _rows(engine, D.customers),
               "bill_lines": _rows(engine, D.bill_lines), "bills": _rows(engine, D.bills),
               "purses": _rows(engine, PDB.purses), "purse_loads": _rows(engine, PDB.loads)}
        out["orders"] = [{k: v for k, v in r.items() if k not in ("goods", "receipt")}
                         for r in _rows(engine, D.orders)]
        out["purse_payments"] = [{k: v for k, v in r.items() if k != "outcome"}
                                 for r in _rows(engine, PDB.payments)]
        return out
    return _reading(url, read)


def check_sp_db(url: str) -> None:
    """Refuse a database that does not exist or is not an SP's (read-only; reads nothing
    else): a command that changes rows never adds the SP's tables to another database."""
    _reading(url, lambda _engine: None)
