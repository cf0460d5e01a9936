"""The payment server's transaction database (SQLAlchemy Core): SQLite by default, PostgreSQL by
URL. Every step of a payment is a committed row change before the next exchange.

The rules (docs/security.md):

* **Only authenticated data moves a payment or lets it hold a unique key.** A draw's card
  serial, counter, expiry and balance are what the client *says*: they are recorded, never
  trusted, so a draw never voids, fails or blocks another payment. The card is authenticated
  only by its MAC2 (checked by the PSAM, or compared with the MAC2 the PSAM expects), so the
  unique (card, card counter) index covers ``confirmed`` rows only. The other unique keys are
  (merchant, transaction id), whose envelope the merchant sealed, and (PSAM, terminal
  transaction number), which the PSAM numbered.
* **Every check-then-act is one statement.** A state change is a conditional UPDATE
  (``... WHERE id = ? AND state = ?``) whose rowcount says who won (:meth:`PaymentDb.advance`);
  the loser re-reads the row. Nothing is decided on a row read earlier and written after an
  ``await``. This holds on SQLite and on PostgreSQL at READ COMMITTED.

States: ``received`` (draw recorded, no PSAM answer yet) -> ``issued`` (FIG. 5/6: waiting for
the card's MAC2) or ``released`` (FIG. 7/8: the PSAM recorded it at INIT SAM and the goods may
go) -> ``confirmed`` (the card's MAC2 verified). ``failed``: the PSAM refused the draw.
``busy``: no PSAM was free (the same draw may retry). ``voided``: the server restarted before the
PSAM answered. A card's "refused" report or a wrong MAC2 changes no state: only the column
``client_report`` records it.

Hand-off to clearing: ``batch``/``batch_number`` name the batch a PSAM record went out in and
``proof_handed`` says whether the card's TAC went with it (in the record, or in the batch's
"proofs"); a payment confirmed after its batch left is handed later in a late-proofs file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    bindparam,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.sql.elements import ColumnElement, TextClause

from ...kit.db import DuplicateError, current_group, now_ms, reading, step
from ...kit.schema import Schema, open_schema
from .leases import FENCE, Fence

metadata = MetaData()

FINAL = ("confirmed", "failed", "voided")

payments = Table(
    "payments", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("merchant_id", String(16), nullable=False),
    Column("txn_id", String(32), nullable=False),
    Column("variant", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason", String(200), nullable=False, default=""),
    Column("amount", BigInteger, nullable=False),
    Column("currency_code", Integer, nullable=False),
    Column("card_serial", String(20), nullable=False),
    Column("card_counter", Integer, nullable=False),
    Column("psam_id", String(20)),
    Column("ttn", BigInteger),
    Column("txn_date", String(8)),
    Column("txn_time", String(6)),
    Column("mac1", String(8)),
    Column("expected_mac2", String(8)),
    Column("card_mac2", String(8)),
    Column("tac", String(8)),
    Column("draw_digest", String(64), nullable=False),
    Column("debit_command", LargeBinary),
    Column("response_digest", String(64)),
    Column("result", LargeBinary),
    Column("client_report", String(200)),   # unauthenticated: recorded, never acted on
    Column("batch", String(120)),           # the batch file its PSAM record went out in
    Column("batch_number", BigInteger),
    Column("proof_handed", Integer, nullable=False, default=0),  # its TAC went to clearing
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    Column("node", String(100)),            # the node that recorded the draw (leases.py)
    UniqueConstraint("merchant_id", "txn_id", name="uq_merchant_txn"),
    UniqueConstraint("psam_id", "ttn", name="uq_psam_ttn"),
)
# (card, counter) is authenticated only by the card's MAC2: unique among confirmed payments
Index("uq_card_counter_confirmed", payments.c.card_serial, payments.c.card_counter, unique=True,
      sqlite_where=text("state = 'confirmed'"),
      postgresql_where=text("state = 'confirmed'"))
# What grows is never scanned whole (issue 16, point 2): the queries of a restart, a batch close
# and the late proofs each read a partial index that holds only the rows they look for (draws
# without a PSAM answer; rows handed in a batch; confirmed after their batch left, TAC not yet
# handed), so their cost follows those rows, not the table. Performance only: no schema change.
_OPEN_DRAWS = "state IN ('received', 'busy')"
_LATE = "state = 'confirmed' AND proof_handed = 0 AND batch IS NOT NULL"
SCANLESS = (
    Index("ix_payments_open_draws", payments.c.state,
          sqlite_where=text(_OPEN_DRAWS), postgresql_where=text(_OPEN_DRAWS)),
    Index("ix_payments_batch", payments.c.batch,
          sqlite_where=text("batch IS NOT NULL"), postgresql_where=text("batch IS NOT NULL")),
    Index("ix_payments_late_proofs", payments.c.psam_id, payments.c.ttn,
          sqlite_where=text(_LATE), postgresql_where=text(_LATE)),
)


def _add_node_column(conn: Connection) -> None:
    """Schema 1 -> 2: ``payments.node``, the node that recorded a draw (NULL before)."""
    found = inspect(conn)
    if found.has_table("payments") and "node" not in {
            c["name"] for c in found.get_columns("payments")}:
        conn.execute(text("ALTER TABLE payments ADD COLUMN node VARCHAR(100)"))


SCHEMA = Schema("payment", 2, metadata, {1: _add_node_column})


def make_engine(url: str) -> Engine:
    """An engine for ``url``, its schema version checked (kit/schema.py: created,
    adopted or upgraded; a newer one refused with SchemaError)."""
    engine = open_schema(url, SCHEMA)
    for index in SCANLESS:   # a database made before them gets them (new ones have them)
        try:
            index.create(engine, checkfirst=True)
        except DBAPIError:   # another process made it between the check and the create
            if index.name not in {i["name"] for i in inspect(engine).get_indexes("payments")}:
                engine.dispose()
                raise
    return engine


# The statements of a purchase, built once: their values are bound when they run, so SQLAlchemy
# takes the compiled form from its cache instead of building and hashing a statement each time.
_BY_TXN = select(payments).where(payments.c.merchant_id == bindparam("w_merchant"),
                                 payments.c.txn_id == bindparam("w_txn"))
_BY_ID = select(payments).where(payments.c.id == bindparam("w_id"))
_BY_PSAM_TTN = select(payments).where(payments.c.psam_id == bindparam("w_psam"),
                                      payments.c.ttn == bindparam("w_ttn"))
_INSERT = insert(payments)
_SET = update(payments).where(payments.c.id == bindparam("w_id"))  # SET: the named columns
_ADVANCE = _SET.where(payments.c.state == bindparam("w_state"))
_ADVANCE_FENCED = _ADVANCE.where(FENCE)   # and only while the node holds the PSAM's lease
Change = Callable[[dict[str, Any]], "dict[str, Any] | None"]


# The same statements as SQL text for the SQLite driver itself, in the writer's group: there
# SQLAlchemy's execution machinery costs ~25 us a statement, the driver ~5 (their errors are
# turned into SQLAlchemy's, so a full disk is still a 503 and a unique key a DuplicateError).
_SQL = {id(_BY_TXN): "SELECT * FROM payments WHERE merchant_id = :w_merchant AND txn_id = :w_txn",
        id(_BY_ID): "SELECT * FROM payments WHERE id = :w_id"}
_SQL_MADE: dict[tuple[str, ...], str] = {}


def _driver(conn: Connection) -> Any | None:
    """The SQLite driver connection of a step in the writer's group (its transaction begun
    by the group); None elsewhere (PostgreSQL, a tool, a test's own step)."""
    if conn.dialect.name != "sqlite" or current_group() is None:
        return None
    return conn.connection.dbapi_connection


def _run(driver: Any, sql: str, params: dict[str, Any]) -> Any:
    try:
        return driver.execute(sql, params)
    except sqlite3.Error as exc:
        raise DBAPIError.instance(sql, None, exc, sqlite3.Error,
                                  hide_parameters=True) from exc


def _made(kind: str, names: Iterable[str]) -> str:
    """The SQL of an INSERT of, or an UPDATE by id setting, the columns ``names`` (checked
    names of payments: see :func:`_update`), made once per set of names."""
    key = (kind, *names)
    sql = _SQL_MADE.get(key)
    if sql is None:
        if kind == "insert":
            sql = (f"INSERT INTO payments ({', '.join(key[1:])}) "
                   f"VALUES ({', '.join(':' + n for n in key[1:])})")
        else:
            sql = (f"UPDATE payments SET {', '.join(f'{n} = :{n}' for n in key[1:])} "
                   "WHERE id = :w_id" + (" AND state = :w_state" if kind == "advance" else ""))
        _SQL_MADE[key] = sql
    return sql


def _first(conn: Connection, query: Any, params: dict[str, Any]) -> dict[str, Any] | None:
    sql = _SQL.get(id(query))
    driver = _driver(conn) if sql is not None else None
    if driver is not None and sql is not None:
        cursor = _run(driver, sql, params)
        found = cursor.fetchone()
        names = [d[0] for d in cursor.description]
        return None if found is None else dict(zip(names, found, strict=True))
    row = conn.execute(query, params).first()
    return dict(row._mapping) if row is not None else None


def _insert(conn: Connection, values: dict[str, Any]) -> int:
    for name in values:
        if name not in payments.c or name == "id":
            raise ValueError(f"not a column of payments one may insert: {name}")
    driver = _driver(conn)
    if driver is not None:
        return int(_run(driver, _made("insert", values), values).lastrowid)
    key = conn.execute(_INSERT, values).inserted_primary_key
    assert key is not None
    return int(key[0])


def _update(conn: Connection, row_id: int, expect: str | None, values: dict[str, Any],
            fence: Fence | None = None) -> bool:
    """One row changed by id (and, with ``expect``, only while in that state; with ``fence``,
    only while the fence's lease is current), stamped."""
    for name in values:  # the SET clause is made of the parameters' names: columns only
        if name not in payments.c or name.startswith("w_") or name == "updated":
            raise ValueError(f"not a column of payments one may set: {name}")
    params = {"w_id": row_id, "w_state": expect, "updated": now_ms(), **values}
    driver = _driver(conn) if fence is None else None
    if driver is not None:
        kind = "set" if expect is None else "advance"
        return int(_run(driver, _made(kind, ["updated", *values]), params).rowcount) == 1
    query = _SET if expect is None else _ADVANCE if fence is None else _ADVANCE_FENCED
    result = conn.execute(query, {**params, **(fence.params() if fence else {})})
    return int(result.rowcount or 0) == 1


@dataclass
class PaymentDb:
    engine: Engine

    def get(self, merchant_id: str, txn_id: str) -> dict[str, Any] | None:
        with reading(self.engine, alone=True) as conn:
            return _first(conn, _BY_TXN, {"w_merchant": merchant_id, "w_txn": txn_id})

    def by_id(self, row_id: int) -> dict[str, Any] | None:
        with reading(self.engine, alone=True) as conn:
            return _first(conn, _BY_ID, {"w_id": row_id})

    def by_psam_ttn(self, psam_id: str, ttn: int) -> dict[str, Any] | None:
        with reading(self.engine, alone=True) as conn:
            return _first(conn, _BY_PSAM_TTN, {"w_psam": psam_id, "w_ttn": ttn})

    def insert_received(self, values: dict[str, Any]) -> int:
        """Record a draw (state ``received``). It touches no other row: its card fields are
        unauthenticated. A second draw of the same transaction is a :class:`DuplicateError`."""
        _, row_id = self.get_or_insert(values, look=False)
        assert row_id is not None
        return row_id

    def get_or_insert(self, values: dict[str, Any], insert: bool = True, look: bool = True,
                      ) -> tuple[dict[str, Any] | None, int | None]:
        """In one step: the row of ``values``' transaction if there is one (``look``), else
        (``insert``) the draw recorded as by :meth:`insert_received`: (row, None), or (None,
        the new row's id), or (None, None) if there was none and ``insert`` is False."""
        if not insert:
            return self.get(values["merchant_id"], values["txn_id"]), None
        stamp = now_ms()
        try:
            with step(self.engine, alone=True) as conn:
                if look:
                    row = _first(conn, _BY_TXN, {"w_merchant": values["merchant_id"],
                                                 "w_txn": values["txn_id"]})
                    if row is not None:
                        return row, None
                return None, _insert(conn, {
                    "reason": "", "proof_handed": 0, "created": stamp, "updated": stamp,
                    **values, "state": "received"})
        except IntegrityError as exc:
            raise DuplicateError(str(exc.orig)) from None

    def advance(self, row_id: int, from_state: str, fence: Fence | None = None,
                **values: Any) -> bool:
        """Compare-and-set: change the row only if it is still in ``from_state`` (and, with
        ``fence``, only while that PSAM lease is current), in one statement. True if this call
        changed it; False if another request got there first (the caller re-reads) or the
        lease was lost. A unique key that says no is a :class:`DuplicateError`."""
        try:
            with step(self.engine, alone=True) as conn:
                return _update(conn, row_id, from_state, values, fence)
        except IntegrityError as exc:
            raise DuplicateError(str(exc.orig)) from None

    def take(self, merchant_id: str, txn_id: str, from_state: str,
             change: Change) -> tuple[dict[str, Any] | None, bool]:
        """In one step: read the transaction's row and, if it is in ``from_state`` and
        ``change(row)`` gives values, :meth:`advance` it with them. (the row read, True) if this
        call changed it; else (the row as it is now, False): None, another state, or one that
        ``change`` left alone. A unique key that says no is a :class:`DuplicateError`."""
        where = {"w_merchant": merchant_id, "w_txn": txn_id}
        try:
            with step(self.engine, alone=True) as conn:
                row = _first(conn, _BY_TXN, where)
                values = change(row) if row is not None and row["state"] == from_state else None
                if row is None or values is None:
                    return row, False
                if _update(conn, row["id"], from_state, values):
                    return row, True
                return _first(conn, _BY_TXN, where), False  # another request won: re-read
        except IntegrityError as exc:
            raise DuplicateError(str(exc.orig)) from None

    def note(self, row_id: int, state: str, report: str) -> None:
        """Record an unauthenticated client report on a row still in ``state`` (no state
        change, no unique key: it only tells the operator what the client said)."""
        with step(self.engine, alone=True) as conn:
            conn.execute(update(payments).where(
                payments.c.id == row_id, payments.c.state == state,
            ).values(client_report=report[:200], updated=now_ms()))

    def set(self, row_id: int, **values: Any) -> None:
        with step(self.engine, alone=True) as conn:
            _update(conn, row_id, None, values)

    def recover(self, alive: list[str] | None = None) -> int:
        """On start: draws that never reached a PSAM answer are void. Returns how many. With
        ``alive`` (nodes sharing the database, leases.py): only the draws of other nodes."""
        where: list[ColumnElement[bool] | TextClause] = [text(_OPEN_DRAWS)]  # its index
        if alive is not None:
            where.append(or_(payments.c.node.is_(None), payments.c.node.not_in(alive)))
        with step(self.engine) as conn:
            result = conn.execute(update(payments).where(*where).values(
                state="voided", reason="payment server restarted before the PSAM answered"
                if alive is None else "its node stopped before the PSAM answered",
                updated=now_ms()))
            return int(result.rowcount or 0)

    # --- hand-off to clearing -----------------------------------------------------------
    def mark_handed(self, psam_id: str, batch: str, batch_number: int,
                    records: Iterable[tuple[int, bool]], fence: Fence | None = None) -> int:
        """The records (TTN, whether the card's TAC went with it) of one batch file (with
        ``fence``: only while that PSAM lease is current). How many rows were marked."""
        stamp = now_ms()
        query = update(payments).where(payments.c.psam_id == psam_id,
                                       payments.c.ttn == bindparam("w_ttn"))
        if fence is not None:
            query = query.where(FENCE)
        done = 0
        with step(self.engine) as conn:
            for ttn, handed in records:
                done += int(conn.execute(query.values(
                    batch=batch, batch_number=batch_number, proof_handed=1 if handed else 0,
                    updated=stamp), {"w_ttn": ttn, **(fence.params() if fence else {})},
                ).rowcount or 0)
        return done

    def batch_named(self, batch: str) -> bool:
        """Whether a row went out in the batch file ``batch`` (its file was written)."""
        with reading(self.engine) as conn:
            return conn.execute(select(payments.c.id).where(
                payments.c.batch == batch).limit(1)).first() is not None

    def late_proofs(self) -> list[dict[str, Any]]:
        """Confirmed payments whose PSAM record went to clearing without their TAC."""
        query = select(payments).where(text(_LATE), payments.c.tac.is_not(None),
                                       ).order_by(payments.c.psam_id, payments.c.ttn)
        with reading(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def mark_proofs_handed(self, row_ids: list[int]) -> None:
        with step(self.engine, alone=True) as conn:
            conn.execute(update(payments).where(
                payments.c.id.in_(row_ids), payments.c.proof_handed == 0,
            ).values(proof_handed=1, updated=now_ms()))

    def counts(self) -> dict[str, int]:
        with reading(self.engine) as conn:
            rows = conn.execute(select(payments.c.state)).all()
        out: dict[str, int] = {}
        for (state,) in rows:
            out[state] = out.get(state, 0) + 1
        return out
