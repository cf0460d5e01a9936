"""A clearing run reads only the loads and held records that are new or still open (issue 16,
point 2, "clearing inputs").

Before: every run read every ``loaded`` load the load server ever logged (to find the few not
moved yet), and a late proofs file read every record clearing ever kept for its PSAM. Now each
load database has a mark (the last row id read, and that row's key) and a few open id ranges
(rows not final yet, ids not committed yet), moved in the run's transaction; a proofs file asks
only for its own (batch, TTN) keys.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, insert, update
from test_clearing_growth import PSAM, TERMINAL, Setup, write_batch

from svcard.host.load.server import db as LDB
from svcard.host.settle import clearing as CL
from svcard.host.settle import db as SDB
from svcard.host.settle.proofs import ProofsVerdict, apply_proofs

HISTORY = 2000   # loads cleared before the measured run (benchmarks/bench_growth.py: 100,000)


class Loads:
    """A load server database with rows put in directly (ids chosen when asked)."""

    def __init__(self, path: Path) -> None:
        self.url = f"sqlite:///{path}"
        self.engine = LDB.make_engine(self.url)
        self.count = 0

    def add(self, n: int = 1, state: str = "loaded", row_id: int | None = None,
            amount: int = 100, bank: str = "0000000000000B01") -> list[int]:
        rows = []
        for _ in range(n):
            self.count += 1
            c = self.count
            rows.append({**({"id": row_id} if row_id is not None else {}),
                         "bank_id": bank, "txn_id": f"T{c:08d}", "state": state,
                         "amount": amount, "currency_code": 156, "issuer_id": "0102030405060708",
                         "card_serial": f"{c:016X}", "s1": f"{c:08X}",
                         "online_counter": c if state == "loaded" else None,
                         "created": 1, "updated": 1})
        with self.engine.begin() as conn:
            ids = [int(conn.execute(insert(LDB.loads).values(**r)).inserted_primary_key[0])
                   for r in rows]
        return ids

    def set_state(self, row_id: int, state: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(LDB.loads).where(LDB.loads.c.id == row_id).values(
                state=state, online_counter=10_000_000 + row_id))


def run(setup: Setup, *urls: str) -> CL.ClearingReport:
    return CL.run_clearing(setup.config, setup.folder, setup.engine, setup.out,
                           load_db_urls=urls)


def rows_read(path: Path) -> tuple[list[int], Any]:
    """Count the rows of table ``loads`` that the statements run against any engine return,
    by running each again on the file (the same text and parameters): [count] and the
    listener (to remove)."""
    counted = [0]

    def seen(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        if statement.lstrip().startswith("SELECT") and "FROM loads" in statement:
            with sqlite3.connect(path) as raw:
                counted[0] += len(raw.execute(statement, params).fetchall())

    event.listen(Engine, "before_cursor_execute", seen)
    return counted, seen


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Setup:
    monkeypatch.setattr(CL, "FRESH_NS", 0, raising=False)
    return Setup(tmp_path)


def test_a_run_reads_only_the_loads_logged_since_the_last(setup: Setup, tmp_path: Path) -> None:
    db = Loads(tmp_path / "load.db")
    db.add(HISTORY)
    first = run(setup, db.url)
    assert first.loads_moved == HISTORY and first.total_loaded == 100 * HISTORY
    db.add(5, amount=7)
    counted, listener = rows_read(tmp_path / "load.db")
    try:
        again = run(setup, db.url)
    finally:
        event.remove(Engine, "before_cursor_execute", listener)
    assert again.loads_moved == 5 and again.total_loaded == 35
    print("rows read from the load database:", counted[0])
    assert counted[0] <= 5 + 1   # before: HISTORY + 5 (every loaded load, at every run)
    assert run(setup, db.url).loads_moved == 0


def test_a_load_still_open_at_a_run_is_moved_when_it_becomes_loaded(setup: Setup,
                                                                    tmp_path: Path) -> None:
    db = Loads(tmp_path / "load.db")
    db.add(3)
    (authorized,) = db.add(1, state="authorized")
    (received,) = db.add(1, state="received")
    db.add(1, state="refused")   # final: not kept open
    db.add(2)
    assert run(setup, db.url).loads_moved == 5
    db.set_state(authorized, "loaded")   # below the mark now
    db.add(1)
    second = run(setup, db.url)
    assert second.loads_moved == 2
    db.set_state(received, "loaded")
    third = run(setup, db.url)
    assert third.loads_moved == 1
    assert run(setup, db.url).loads_moved == 0


def test_an_id_committed_late_is_moved_and_a_gap_expires(setup: Setup, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL takes an id before the insert commits: a run may see id 12 but not 11 yet.
    The missing id stays open; a row committed there later is moved. A gap older than
    GAP_MS (a rolled-back insert) is dropped."""
    db = Loads(tmp_path / "load.db")
    for i in (1, 2, 3, 5, 12):
        db.add(1, row_id=i)
    assert run(setup, db.url).loads_moved == 5
    with setup.engine.connect() as conn:
        kept = sorted((r.lo, r.hi) for r in conn.execute(SDB.open_loads.select()))
    assert kept == [(4, 4), (6, 11)]
    db.add(1, row_id=11)
    assert run(setup, db.url).loads_moved == 1
    monkeypatch.setattr(SDB, "GAP_MS", 0)
    assert run(setup, db.url).loads_moved == 0
    with setup.engine.connect() as conn:
        assert list(conn.execute(SDB.open_loads.select())) == []
    db.add(1, row_id=4)   # too late: the gap was given up (a commit 10 minutes late)
    db.add(1, row_id=13)
    assert run(setup, db.url).loads_moved == 1


def test_another_database_at_the_same_url_is_read_whole(setup: Setup, tmp_path: Path) -> None:
    path = tmp_path / "load.db"
    db = Loads(path)
    db.add(10)
    assert run(setup, db.url).loads_moved == 10
    db.engine.dispose()
    path.unlink()
    other = Loads(path)
    other.count = 500   # other transaction ids
    other.add(12, amount=3)
    report = run(setup, other.url)
    assert report.loads_moved == 12 and report.total_loaded == 36


def test_a_failed_run_leaves_the_mark(setup: Setup, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    db = Loads(tmp_path / "load.db")
    db.add(4)
    assert run(setup, db.url).loads_moved == 4
    db.add(3)

    def broken(*args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(CL, "write_durably", broken)
    with pytest.raises(OSError):
        run(setup, db.url)
    monkeypatch.undo()
    monkeypatch.setattr(CL, "FRESH_NS", 0, raising=False)
    assert run(setup, db.url).loads_moved == 3


def test_two_load_databases_keep_their_own_marks(setup: Setup, tmp_path: Path) -> None:
    a, b = Loads(tmp_path / "a.db"), Loads(tmp_path / "b.db")
    b.count = 1000
    a.add(3)
    b.add(2, bank="0000000000000B02")
    assert run(setup, a.url, b.url).loads_moved == 5
    b.add(1, bank="0000000000000B02")
    assert run(setup, a.url, b.url).loads_moved == 1
    a.add(1)
    assert run(setup, a.url, b.url).loads_moved == 1


def test_a_proofs_file_asks_only_for_its_own_records(setup: Setup) -> None:
    """The held records are looked up by this file's (batch, TTN) keys, through the index;
    before, every record clearing ever kept for the PSAM was read."""
    write_batch(setup.folder / "b1.json", 1)
    run(setup)
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(" ".join(statement.split()))

    pv = ProofsVerdict("proofs-x.json", "processed", "", digest="d" * 64,
                       terminal_id=TERMINAL.hex().upper(), psam_id=PSAM,
                       proofs=[(1, 1, b"\0" * 4), (9, 3, b"\0" * 4)])
    event.listen(setup.engine, "before_cursor_execute", seen)
    try:
        with setup.engine.begin() as conn:
            apply_proofs(conn, setup.config, pv, 99, set(), lambda *a: None)
    finally:
        event.remove(setup.engine, "before_cursor_execute", seen)
    assert [o["state"] for o in pv.outcomes] == ["not held", "not held"]
    asked = [s for s in statements if "FROM uncleared_records" in s]
    assert asked and all("batch_number" in s.split(" WHERE ")[1] for s in asked), asked


def test_an_insert_committed_after_a_run_on_postgresql(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The real case of an id taken before its commit: on PostgreSQL, load A takes id n and
    commits after load B (id n + 1) and after a clearing run read B. The next run moves A."""
    from pg_env import start_cluster

    cluster = start_cluster()
    try:
        setup = Setup(tmp_path, cluster.new_database())
        url = cluster.new_database()
        db = Loads.__new__(Loads)
        db.url, db.engine, db.count = url, LDB.make_engine(url), 0
        db.add(3)
        assert run(setup, url).loads_moved == 3
        late = db.engine.connect()
        slow = late.begin()
        late.execute(insert(LDB.loads).values(
            bank_id="0000000000000B01", txn_id="LATE", state="loaded", amount=9,
            currency_code=156, issuer_id="0102030405060708", card_serial="F" * 16, s1="AAAAAAAA",
            online_counter=1, created=1, updated=1))
        db.add(1, amount=5)   # a later id, committed first
        first = run(setup, url)
        assert (first.loads_moved, first.total_loaded) == (1, 5)
        slow.commit()
        late.close()
        second = run(setup, url)
        assert (second.loads_moved, second.total_loaded) == (1, 9)
        assert run(setup, url).loads_moved == 0
        # a node stopped between INSERT and COMMIT for longer than GAP_MS: its id stays open
        # while its transaction runs; an insert rolled back is given up after GAP_MS
        frozen, dropped = db.engine.connect(), db.engine.connect()
        held, undone = frozen.begin(), dropped.begin()
        for conn, txn in ((frozen, "FROZEN"), (dropped, "UNDONE")):
            conn.execute(insert(LDB.loads).values(
                bank_id="0000000000000B01", txn_id=txn, state="loaded", amount=11,
                currency_code=156, issuer_id="0102030405060708", card_serial=txn.ljust(16, "0"),
                s1=txn[:8].ljust(8, "0"), online_counter=1, created=1, updated=1))
        db.add(1, amount=5)
        assert run(setup, url).total_loaded == 5
        undone.rollback()
        dropped.close()
        real = SDB.time.time
        monkeypatch.setattr(SDB.time, "time", lambda: real() + 11 * 60)
        assert run(setup, url).loads_moved == 0
        with setup.engine.connect() as conn:
            still = [(r.lo, r.hi) for r in conn.execute(SDB.open_loads.select())]
        assert len(still) == 1   # the frozen one's id; the undone one's given up
        held.commit()
        frozen.close()
        assert run(setup, url).total_loaded == 11
        monkeypatch.undo()
        db.engine.dispose()
        setup.engine.dispose()
    finally:
        cluster.stop()


def test_the_mark_keeps_no_password() -> None:
    assert SDB._source("postgresql://clearing:s3cret@db/loads") == \
        "postgresql://clearing:***@db/loads"
    assert "s3cret" not in SDB._source("not a url s3cret")


def test_two_runs_at_once_move_each_load_once(setup: Setup, tmp_path: Path) -> None:
    """Raced: two clearing processes' runs over the same load database and clearing database.
    One moves the loads; the other moves none of them or fails whole (its mark not moved)."""
    import threading

    db = Loads(tmp_path / "load.db")
    db.add(30)
    assert run(setup, db.url).loads_moved == 30   # both runs start from a mark
    db.add(20, amount=3)
    engines = [SDB.make_engine(f"sqlite:///{tmp_path / 'clearing.db'}") for _ in range(2)]
    start = threading.Barrier(2)
    outcomes: list[Any] = []

    def one(engine: Engine) -> None:
        start.wait()
        try:
            outcomes.append(CL.run_clearing(setup.config, setup.folder, engine,
                                            tmp_path / f"out{id(engine)}",
                                            load_db_urls=(db.url,)).total_loaded)
        except Exception as exc:   # the loser: rolled back whole
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=one, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    print("raced runs:", outcomes)
    assert sum(o for o in outcomes if isinstance(o, int)) == 60 and len(outcomes) == 2
    assert run(setup, db.url).loads_moved == 0
    db.add(1)
    assert run(setup, db.url).loads_moved == 1


def test_a_run_whose_mark_moved_meanwhile_fails_whole(setup: Setup, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The compare-and-set: a run that read the mark before another run moved it moves
    nothing (its transaction fails), and the next run moves each load once."""
    db = Loads(tmp_path / "load.db")
    db.add(4)
    assert run(setup, db.url).loads_moved == 4
    db.add(2)
    real, other = SDB.new_loads, []

    def stale(engine: Engine, urls: tuple[str, ...]) -> Any:
        got = real(engine, urls)
        if not other:   # another run, in between this one's read and its transaction
            other.append(-1)
            other[0] = run(setup, db.url).loads_moved
        return got

    monkeypatch.setattr(CL, "new_loads", stale)
    with pytest.raises(RuntimeError, match="another clearing run"):
        run(setup, db.url)
    assert other == [2]
    monkeypatch.setattr(CL, "new_loads", real)
    db.add(1)
    assert run(setup, db.url).loads_moved == 1


def test_too_many_open_ranges_leave_the_mark_where_it_was(setup: Setup, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Bounded: a run that would keep more than MAX_OPEN_RANGES open ranges does not move the
    mark (the next run reads from the old one again); each load is still moved once."""
    db = Loads(tmp_path / "load.db")
    db.add(3)
    assert run(setup, db.url).loads_moved == 3
    monkeypatch.setattr(SDB, "MAX_OPEN_RANGES", 0)
    db.add(1, state="authorized")
    db.add(2)
    assert run(setup, db.url).loads_moved == 2
    with setup.engine.connect() as conn:
        assert [r.mark for r in conn.execute(SDB.load_marks.select())] == [3]
    assert run(setup, db.url).loads_moved == 0
