"""What other systems may read of loading: the load server's and the banks' databases, read
only.

Settlement reads them: clearing moves the funds of every ``loaded`` load into the issuer's float
(:mod:`svcard.host.settle.clearing`), and the audit matches the load server's decisions with
the banks' debits and refunds (:mod:`svcard.host.settle.audit`); ``svcard bank account list``
lists a bank's accounts. This module is that read interface: nothing here writes a row, and
nothing is created: each database must exist and hold its server's tables
(:func:`svcard.host.kit.db.open_existing`: SQLite opened read-only), else a
:class:`~svcard.host.kit.db.DatabaseError` names it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Engine, or_, select, text

from ..kit.schema import Schema, open_for_reading
from .bank.db import SCHEMA as BANK_SCHEMA
from .bank.db import BankDb
from .bank.db import accounts as accounts_table
from .bank.db import bank_loads as bank_loads_table
from .server.db import FINAL, LoadDb
from .server.db import SCHEMA as LOAD_SCHEMA
from .server.db import loads as loads_table

LOAD_DB = "load server database"
BANK_DB = "bank database"

T = TypeVar("T")


def _reading(url: str, tables: tuple[str, ...], what: str, read: Callable[[Engine], T]) -> T:
    """``read`` on a read-only engine for ``url`` (a newer schema than this svcard's is
    refused: :class:`~svcard.host.kit.schema.SchemaError`), disposed afterwards."""
    schema: Schema = BANK_SCHEMA if what == BANK_DB else LOAD_SCHEMA
    engine = open_for_reading(url, tables, what, schema)
    try:
        return read(engine)
    finally:
        engine.dispose()


def check_load_db(url: str) -> None:
    """Refuse (:class:`~svcard.host.kit.db.DatabaseError`) a load server database that does
    not exist or is not one; reads nothing else."""
    _reading(url, (loads_table.name,), LOAD_DB, lambda _engine: None)


def check_bank_db(url: str) -> None:
    """Refuse (:class:`~svcard.host.kit.db.DatabaseError`) a bank database that does not
    exist or is not one; reads nothing else."""
    _reading(url, (bank_loads_table.name, accounts_table.name), BANK_DB, lambda _engine: None)


def loads(url: str, state: str | None = None) -> list[dict[str, Any]]:
    """The loads in the load server's database at ``url``, oldest first (by row id), each as
    column name -> value (the columns of :data:`svcard.host.load.server.db.loads`: ``bank_id``,
    ``txn_id``, ``issuer_id``, ``card_serial``, ``online_counter``, ``amount``, ``state``,
    ``evidence``, ``created``...); only those in ``state`` when it is given."""
    return _reading(url, (loads_table.name,), LOAD_DB,
                    lambda engine: LoadDb(engine).rows(state))


@dataclass
class LoadsAfter:
    """What :func:`loads_after` read: the ``loaded`` rows among the rows past the mark and the
    open ranges (oldest first, as :func:`loads` gives them), the ids of every row read, those
    still open (not in a final state: they may yet become ``loaded``), and whether the row at
    the mark was not the expected one (``restarted``: everything was read from the start)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    open_ids: list[int] = field(default_factory=list)
    keys: dict[int, tuple[str, str]] = field(default_factory=dict)   # id -> (bank, txn)
    restarted: bool = False
    # PostgreSQL: the oldest transaction id still running before the rows were read, and the
    # next one to be given after (every transaction below xmin_before had ended, so its rows
    # were read; an id missing now is not held by a transaction below xmax_after unless one of
    # them is still running)
    xmin_before: int | None = None
    xmax_after: int | None = None


RANGES_PER_QUERY = 200


def loads_after(url: str, mark: int, mark_key: tuple[str, str] | None,
                ranges: Sequence[tuple[int, int]]) -> LoadsAfter:
    """The rows of the load server's database at ``url`` past row id ``mark`` or inside one of
    ``ranges`` (inclusive id ranges a reader kept open: rows not final yet, ids not seen yet),
    all through the primary key: a reader that keeps its mark reads only what is new or still
    open, never the whole history. If the row at ``mark`` is missing or is not ``mark_key``
    (bank id, transaction id) the database is not the one the mark was taken in: everything
    is read (``restarted``)."""
    def read(engine: Engine) -> LoadsAfter:
        out = LoadsAfter()
        snapshot = (text("SELECT txid_snapshot_xmin(txid_current_snapshot()), "
                         "txid_snapshot_xmax(txid_current_snapshot())")
                    if engine.dialect.name == "postgresql" else None)
        with engine.connect() as conn:
            if snapshot is not None:   # READ COMMITTED: each statement its own snapshot
                out.xmin_before = int(conn.execute(snapshot).one()[0])
            start, spans = mark, list(ranges)
            if mark > 0:
                at = conn.execute(select(loads_table.c.bank_id, loads_table.c.txn_id).where(
                    loads_table.c.id == mark)).first()
                if at is None or (at[0], at[1]) != mark_key:
                    start, spans, out.restarted = 0, [], True
            found: dict[int, dict[str, Any]] = {}
            parts = [spans[i:i + RANGES_PER_QUERY]
                     for i in range(0, len(spans), RANGES_PER_QUERY)]
            wheres = [loads_table.c.id > start] + [
                or_(*[loads_table.c.id.between(lo, hi) for lo, hi in part]) for part in parts]
            for where in wheres:
                for r in conn.execute(select(loads_table).where(where)):
                    found[r.id] = dict(r._mapping)
            if snapshot is not None:
                out.xmax_after = int(conn.execute(snapshot).one()[1])
        for row_id in sorted(found):
            row = found[row_id]
            out.ids.append(row_id)
            out.keys[row_id] = (row["bank_id"], row["txn_id"])
            if row["state"] == "loaded":
                out.rows.append(row)
            elif row["state"] not in FINAL:
                out.open_ids.append(row_id)
        return out
    return _reading(url, (loads_table.name,), LOAD_DB, read)


def bank_loads(url: str) -> list[dict[str, Any]]:
    """The loads in the bank database at ``url``, in creation order, each as column name ->
    value (the columns of :data:`svcard.host.load.bank.db.bank_loads`: ``txn_id``, ``amount``,
    ``state`` (``debited``, ``confirmed`` or ``refunded``)...)."""
    return _reading(url, (bank_loads_table.name,), BANK_DB,
                    lambda engine: BankDb(engine).loads())


def accounts(url: str) -> list[dict[str, Any]]:
    """The customer accounts in the bank database at ``url``, by account id, each as column
    name -> value without the secret's hash (``account_id``, ``holder``, ``balance``...)."""
    return _reading(url, (accounts_table.name,), BANK_DB,
                    lambda engine: BankDb(engine).accounts())
