"""The clearing database (SQLAlchemy Core): SQLite by default, PostgreSQL by URL.

What clearing has done, run by run: the runs and their settlement files (``clearing_runs``),
the batches it accepted (``cleared_batches``), the records it cleared and paid
(``cleared_records``), the records of accepted batches it did not clear (``uncleared_records``:
held, refused, skipped or superseded), the late proofs files it processed (``proof_files``), the
loads whose funds it moved into the float (``moved_loads``) and the double-entry ``ledger``.
A run writes all of it in one database transaction
(:func:`svcard.host.settle.clearing.run_clearing`); the audit reads it back
(:func:`ledger_balances`, :func:`cleared_keys` and the tables).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    func,
    select,
    update,
)

from ...protocols import purse as P
from ..kit.schema import Schema, open_schema

metadata = MetaData()

runs = Table(
    "clearing_runs", metadata,
    Column("run_number", Integer, primary_key=True),
    Column("created", BigInteger, nullable=False),
    Column("file", String(300), nullable=False),
    Column("mac", String(64), nullable=False),
)
batches = Table(
    "cleared_batches", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_number", Integer, nullable=False),
    Column("terminal_id", String(12), nullable=False),
    Column("batch_number", BigInteger, nullable=False),
    Column("mac", String(8), nullable=False),
    Column("psam_id", String(20), nullable=False),
    Column("record_count", Integer, nullable=False),
    Column("file", String(300)),
    # PSAMs of one pool share a terminal id and each numbers its own batches and TTNs, so
    # the PSAM serial is part of a batch's identity (a replay under another serial still
    # finds each of its records already cleared)
    UniqueConstraint("terminal_id", "psam_id", "batch_number", "mac", name="uq_batch"),
)
records = Table(
    "cleared_records", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_number", Integer, nullable=False),
    Column("card_serial", String(16), nullable=False),
    Column("card_counter", Integer, nullable=False),
    Column("issuer_id", String(16), nullable=False),
    Column("terminal_id", String(12), nullable=False),
    Column("ttn", BigInteger, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("merchant_id", String(16), nullable=False),
    Column("acquirer_id", String(16), nullable=False),
    Column("state", String(8), nullable=False),     # cleared
    Column("reason", String(200), nullable=False),
    Column("psam_id", String(20)),
    Column("batch_number", BigInteger),
    UniqueConstraint("card_serial", "card_counter", name="uq_record_card_counter"),
)
# every record of an accepted batch that was not cleared when its batch was: held (no card
# TAC yet) -> cleared (a late proof's TAC verified) | refused | superseded; refused; skipped
uncleared = Table(
    "uncleared_records", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_number", Integer, nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    Column("terminal_id", String(12), nullable=False),
    Column("psam_id", String(20), nullable=False),
    Column("batch_number", BigInteger, nullable=False),
    Column("record_index", Integer, nullable=False),
    Column("ttn", BigInteger, nullable=False),
    Column("card_serial", String(16), nullable=False),
    Column("card_counter", Integer, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("record", String(2 * P.PSAM_RECORD_SIZE), nullable=False),
    Column("state", String(12), nullable=False),
    Column("reason", String(200), nullable=False),
    Column("resolved_run", Integer),
    UniqueConstraint("terminal_id", "psam_id", "batch_number", "record_index",
                     name="uq_uncleared_record"),
)
Index("ix_uncleared_proof", uncleared.c.terminal_id, uncleared.c.psam_id,
      uncleared.c.batch_number, uncleared.c.ttn)
Index("ix_uncleared_state", uncleared.c.state)
proof_files = Table(
    "proof_files", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_number", Integer, nullable=False),
    Column("file", String(300), nullable=False),
    Column("digest", String(64), nullable=False),
    Column("proof_count", Integer, nullable=False),
    Column("cleared", Integer, nullable=False),
    UniqueConstraint("file", name="uq_proof_file"),
    UniqueConstraint("digest", name="uq_proof_digest"),
)
moved_loads = Table(
    "moved_loads", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_number", Integer, nullable=False),
    Column("bank_id", String(16), nullable=False),
    Column("txn_id", String(32), nullable=False),
    Column("issuer_id", String(16), nullable=False),
    Column("card_serial", String(20), nullable=False),
    Column("amount", BigInteger, nullable=False),
    UniqueConstraint("bank_id", "txn_id", name="uq_moved_load"),
)
ledger = Table(
    "ledger", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_number", Integer, nullable=False),
    Column("account", String(40), nullable=False),   # bank:ID, float:ISSUER, acquirer:ID, ...
    Column("amount", BigInteger, nullable=False),    # + credit, - debit
    Column("memo", String(100), nullable=False),
)

# the column order of the rows a run inserts with insert_many
RECORD_COLUMNS = ["run_number", "card_serial", "card_counter", "issuer_id", "terminal_id",
                  "ttn", "amount", "merchant_id", "acquirer_id", "state", "reason", "psam_id",
                  "batch_number"]
UNCLEARED_COLUMNS = ["run_number", "created", "updated", "terminal_id", "psam_id",
                     "batch_number", "record_index", "ttn", "card_serial", "card_counter",
                     "amount", "record", "state", "reason"]


SCHEMA = Schema("clearing", 1, metadata)


def make_engine(url: str) -> Engine:
    """An engine for ``url``, its schema version checked (kit/schema.py: created,
    adopted or upgraded; a newer one refused with SchemaError)."""
    return open_schema(url, SCHEMA)


def insert_many(conn: Connection, table: Table, rows: list[tuple[Any, ...]],
                names: list[str]) -> None:
    """Many rows through the driver's own executemany (SQLAlchemy's per-row parameter
    processing costs more than SQLite's insert itself)."""
    if not rows:
        return
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    sql = (f"INSERT INTO {table.name} ({', '.join(names)}) "
           f"VALUES ({', '.join([mark] * len(names))})")
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.executemany(sql, rows)
    finally:
        cursor.close()


def supersede(conn: Connection, run_number: int, stamp: int) -> None:
    """A held record whose card counter a cleared record used was never debited (a debit
    moves the counter, and the cleared one carries the card's TAC): it is superseded."""
    used = select(records.c.id).where(records.c.card_serial == uncleared.c.card_serial,
                                      records.c.card_counter == uncleared.c.card_counter)
    conn.execute(update(uncleared).where(uncleared.c.state == "held", used.exists()).values(
        state="superseded", reason="the card counter was used by a cleared record",
        resolved_run=run_number, updated=stamp))


def ledger_balances(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {account: int(total) for account, total in conn.execute(
            select(ledger.c.account, func.sum(ledger.c.amount)).group_by(ledger.c.account))}


def cleared_keys(engine: Engine) -> set[tuple[str, int]]:
    """(card serial 8 bytes hex, card counter) of every cleared record."""
    with engine.connect() as conn:
        return {(r.card_serial, r.card_counter) for r in conn.execute(
            select(records.c.card_serial, records.c.card_counter).where(
                records.c.state == "cleared"))}
