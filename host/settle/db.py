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

import bisect
import hashlib
import time
from dataclasses import dataclass
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
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from ...protocols import purse as P
from ..kit.schema import Schema, open_schema
from ..load import records as load_records

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


# Each batch or proofs file a run handled for good, with its stat (clearing.py skips it while
# unchanged). A table of SCHEMA like the two below.
handled_files = Table(
    "clearing_handled_files", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("folder", String(1000), nullable=False),
    Column("name", String(300), nullable=False),
    Column("run_number", Integer, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("ctime_ns", BigInteger, nullable=False),
    Column("inode", String(24), nullable=False),
    Column("digest", String(64), nullable=False),
    Column("verdict", String(200), nullable=False),
    UniqueConstraint("folder", "name", name="uq_handled_file"),
)

# Where each load server database was read up to (issue 16: a run read every load ever made).
# New tables of SCHEMA's metadata: opening the database (kit/schema.py prepare) makes them in
# its locked transaction, on a database made before them too (no column changed: no upgrade).
load_marks = Table(
    "clearing_load_marks", metadata,
    Column("source", String(1000), primary_key=True),   # the URL, its password hidden
    Column("mark", BigInteger, nullable=False),         # every row id <= mark was read ...
    Column("bank_id", String(16), nullable=False),      # ... and the row at the mark is this
    Column("txn_id", String(32), nullable=False),       # load (else: another database)
)
# ... except these id ranges: rows read in a state not final yet (they may still become
# ``loaded``) and ids not seen yet (a PostgreSQL insert not committed when the run read: its
# id is taken before the commit). An unseen id is given up as a rolled-back insert once it is
# still missing GAP_MS after a run first saw it missing (clearing's clock) and, on PostgreSQL,
# every transaction that could hold it has ended (``xid``).
open_loads = Table(
    "clearing_open_loads", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("source", String(1000), nullable=False),
    Column("lo", BigInteger, nullable=False),
    Column("hi", BigInteger, nullable=False),
    Column("seen", BigInteger, nullable=False),   # ms, when a run first saw it open
    # PostgreSQL: the next transaction id when a run first saw it open; the ids not seen are
    # given up only once every transaction below it has ended (a load server stopped between
    # its INSERT and its COMMIT keeps the id open however long it stays stopped)
    Column("xid", BigInteger),
    Index("ix_open_loads_source", "source"),
)
GAP_MS = 10 * 60 * 1000
MAX_OPEN_RANGES = 100_000   # more: the mark is not moved (the next run reads from it again)


@dataclass
class LoadMark:
    """A load database's mark as a run read it (``old``) and as the run will leave it."""

    source: str
    old: int | None          # None: no mark yet
    mark: int
    key: tuple[str, str] | None
    ranges: list[Range]


def _source(url: str) -> str:
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except ArgumentError:   # not a URL: opening it says so; no password kept either way
        shown = "#" + hashlib.sha256(url.encode()).hexdigest()
    if len(shown) <= 1000:
        return shown
    return shown[:935] + "#" + hashlib.sha256(shown.encode()).hexdigest()


Range = tuple[int, int, int, int | None]   # lo, hi, seen, xid


def _still_open(lo: int, hi: int, seen: int, xid: int | None, got: load_records.LoadsAfter,
                now: int, out: list[Range]) -> None:
    """The parts of id range [lo, hi] that no row read covers, kept while younger than
    GAP_MS or while a transaction that could hold one of them may still commit it."""
    ids = got.ids
    ended = xid is None or (got.xmin_before is not None and got.xmin_before >= xid)
    if now - seen >= GAP_MS and ended:
        return
    at = lo
    for row_id in ids[bisect.bisect_left(ids, lo):bisect.bisect_right(ids, hi)]:
        if row_id > at:
            out.append((at, row_id - 1, seen, xid))
        at = row_id + 1
    if at <= hi:
        out.append((at, hi, seen, xid))


def _merged(ranges: list[Range], cap: int) -> list[Range]:
    """``ranges`` (sorted) merged down to ``cap`` by closing the smallest spaces between
    neighbours: a merged range only re-reads rows (a load is moved once, by its key), and it
    ages as its youngest part (latest ``seen``, latest ``xid``), so nothing is given up early.
    Without it, loads left open for good past the cap kept the mark where it was forever."""
    if len(ranges) <= cap or cap < 1:
        return ranges
    spaces = sorted(range(len(ranges) - 1), key=lambda i: ranges[i + 1][0] - ranges[i][1])
    joined = set(spaces[:len(ranges) - cap])   # i joined: ranges i and i + 1 become one
    out: list[Range] = []
    for i, (lo, hi, seen, xid) in enumerate(ranges):
        if i - 1 in joined:
            plo, _, pseen, pxid = out[-1]
            xids = [x for x in (pxid, xid) if x is not None]
            out[-1] = (plo, hi, max(pseen, seen), max(xids) if xids else None)
        else:
            out.append((lo, hi, seen, xid))
    return out


def new_loads(engine: Engine, urls: tuple[str, ...]) -> tuple[list[dict[str, Any]],
                                                                list[LoadMark]]:
    """The ``loaded`` loads of each load server database that a run must look at: those past
    the database's mark and those in its open ranges (no full read once a mark is kept), and
    the marks the run leaves (:func:`save_load_marks`, in the run's transaction)."""
    if not urls:
        return [], []
    now = int(time.time() * 1000)
    rows: list[dict[str, Any]] = []
    marks: list[LoadMark] = []
    for url in urls:
        source = _source(url)
        with engine.connect() as conn:
            at = conn.execute(select(load_marks).where(load_marks.c.source == source)).first()
            kept = [(r.lo, r.hi, r.seen, r.xid) for r in conn.execute(
                select(open_loads.c.lo, open_loads.c.hi, open_loads.c.seen,
                       open_loads.c.xid).where(open_loads.c.source == source))]
        old = int(at.mark) if at is not None else None
        got = load_records.loads_after(url, old or 0, (at.bank_id, at.txn_id) if at else None,
                                       [(r[0], r[1]) for r in kept])
        rows.extend(got.rows)
        start = 0 if got.restarted or old is None else old
        ranges: list[Range] = []
        for lo, hi, seen, xid in ([] if got.restarted else kept):
            _still_open(lo, hi, seen, xid, got, now, ranges)
        top = max([start, *got.ids])
        if top > start:   # ids past the old mark not read: not committed yet, or rolled back
            _still_open(start + 1, top, now, got.xmax_after, got, now, ranges)
        ranges += [(row_id, row_id, now, got.xmax_after) for row_id in got.open_ids]
        ranges.sort()
        key = got.keys.get(top)
        if key is None and top > 0:   # the mark did not move: its row was not re-read
            key = (at.bank_id, at.txn_id) if at is not None else None
        ranges = _merged(ranges, MAX_OPEN_RANGES)
        if len(ranges) > MAX_OPEN_RANGES:   # left as it was: the next run reads it all again
            key = None
        marks.append(LoadMark(source, old, top, key, ranges))
    return rows, marks


def save_load_marks(conn: Connection, marks: list[LoadMark]) -> None:
    """Move each database's mark, in the run's transaction: a compare-and-set on the mark the
    run read (another run that moved it first makes this run fail whole, moving nothing)."""
    for m in marks:
        if m.key is None:
            continue
        values = {"mark": m.mark, "bank_id": m.key[0], "txn_id": m.key[1]}
        if m.old is None:
            conn.execute(insert(load_marks).values(source=m.source, **values))
        elif not conn.execute(update(load_marks).where(
                load_marks.c.source == m.source, load_marks.c.mark == m.old).values(
                **values)).rowcount:
            raise RuntimeError("another clearing run read the same load database at the same "
                               "time: this run moved nothing, run it again")
        conn.execute(delete(open_loads).where(open_loads.c.source == m.source))
        insert_many(conn, open_loads, [(m.source, *r) for r in m.ranges],
                    ["source", "lo", "hi", "seen", "xid"])
