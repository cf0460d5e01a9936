"""R-16: group commit (kit/http.py GroupWriter, kit/db.py StepGroup) under failures: a group
whose transaction SQLite ended while a step swallowed the error, a writer whose own
bookkeeping fails, a step given while the writer shuts down. Never an answer for a step that
is not committed, never a caller left waiting."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

import pytest
from pcsc_env import wait_for
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from test_group_commit import db, draw, grouped  # noqa: F401  (db: the fixture)

from svcard.host.kit import db as kitdb
from svcard.host.kit.db import step
from svcard.host.kit.http import GroupWriter, SqlRunner
from svcard.host.pay.server import db as PD


def _stored(database: PD.PaymentDb) -> list[int]:
    with database.engine.connect() as conn:
        return sorted(int(t, 16) for t in conn.execute(select(PD.payments.c.txn_id)).scalars())


def test_a_step_that_swallows_the_end_of_the_group_transaction(db: PD.PaymentDb) -> None:  # noqa: F811
    """SQLite ends a transaction by itself on some errors (a full disk, an I/O error, no
    memory); a step that catches that error and answers anyway must not let the group go on
    as if its transaction were alive: before, the first draw was answered as stored while
    SQLite had rolled it back, and the third was committed on its own by its SAVEPOINT."""
    engine = db.engine

    def swallows() -> str:
        try:
            with step(engine) as conn:
                conn.exec_driver_sql("ROLLBACK")  # what SQLite does on SQLITE_FULL at times
                raise OperationalError("INSERT", {}, Exception("database or disk is full"))
        except OperationalError:
            return "told the client to retry"

    out = grouped(SqlRunner(str(engine.url)), [
        (db.insert_received, (draw(1),)), (swallows, ()), (db.insert_received, (draw(3),)),
    ])
    assert out[1] == "told the client to retry"
    answered = [n for n, r in zip((1, 3), (out[0], out[2]), strict=True) if isinstance(r, int)]
    stored = _stored(db)
    assert set(answered) <= set(stored), f"answered {answered}, stored {stored}"
    assert stored == [1, 3]


def test_a_failing_rollback_leaves_no_caller_waiting(db: PD.PaymentDb,  # noqa: F811
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's own ROLLBACK of a broken group fails: every step of the group still gets
    an outcome, and the writer goes on with the next steps (before: the writer thread died,
    its callers and every later step waited forever)."""
    real_end = kitdb.StepGroup.end
    failures = [1]

    def end(self: kitdb.StepGroup, commit: bool = True) -> None:
        if not commit and failures:
            failures.pop()
            real_end(self, commit=False)
            raise OperationalError("ROLLBACK", {}, Exception("disk I/O error"))
        real_end(self, commit)

    monkeypatch.setattr(kitdb.StepGroup, "end", end)

    def breaks() -> None:
        with step(db.engine):
            raise OperationalError("INSERT", {}, Exception("disk I/O error"))

    runner = SqlRunner(str(db.engine.url))
    assert runner.executor is not None
    done = threading.Event()
    outcome: list[Any] = []

    def run() -> None:
        outcome.extend(grouped(runner, [(db.insert_received, (draw(1),)), (breaks, ()),
                                        (db.insert_received, (draw(2),))]))
        done.set()

    threading.Thread(target=run, daemon=True).start()
    wait_for(done.is_set, "every step of the group to get its outcome", 20)
    assert all(isinstance(r, (int, Exception)) for r in outcome), outcome
    later = runner.executor.submit(db.insert_received, draw(3))
    assert isinstance(later.result(timeout=20), int)
    stored = _stored(db)
    assert [n for n, r in zip((1, 2), (outcome[0], outcome[2]), strict=True)
            if isinstance(r, int)] == [n for n in stored if n in (1, 2)]
    assert 3 in stored


def test_a_step_given_as_the_writer_shuts_down_is_not_left_waiting() -> None:
    """A step that passed submit's check just as shutdown() queued the end (another thread):
    it is run or refused, never left in the queue forever."""
    writer = GroupWriter()
    writer._writer.queue.put(None)      # shutdown's end mark, put between check and put
    late: Future[int] = writer.submit(lambda: 7)
    try:
        assert late.result(timeout=20) == 7
    except RuntimeError as exc:
        assert "shut down" in str(exc)
    writer.shutdown()


def test_shutdown_runs_every_step_already_given() -> None:
    gate = threading.Event()
    writer = GroupWriter()
    first = writer.submit(gate.wait, 20)
    rest = [writer.submit(lambda n=n: n) for n in range(300)]   # more than one group of 256
    stopper = threading.Thread(target=writer.shutdown)
    stopper.start()
    gate.set()
    stopper.join(30)
    assert first.result(timeout=1) is True
    assert [f.result(timeout=1) for f in rest] == list(range(300))
    with pytest.raises(RuntimeError, match="shut down"):
        writer.submit(lambda: 0)


def test_a_cancelled_caller_leaves_its_step_run_or_not_run(db: PD.PaymentDb) -> None:  # noqa: F811
    """The event loop cancels the awaiting coroutine: a step still queued never runs, one
    already running runs to its end and is committed (never half)."""
    runner = SqlRunner(str(db.engine.url))
    gate, started = threading.Event(), threading.Event()

    def held_insert() -> int:
        started.set()
        gate.wait(20)
        return db.insert_received(draw(1))

    async def main() -> None:
        running = asyncio.ensure_future(runner(held_insert))
        await asyncio.sleep(0)
        wait_for(started.is_set, "the step to run", 10)
        queued = asyncio.ensure_future(runner(db.insert_received, draw(2)))
        await asyncio.sleep(0)
        running.cancel()
        queued.cancel()
        gate.set()
        await asyncio.gather(running, queued, return_exceptions=True)
        await runner(lambda: None)   # the writer has finished with both

    asyncio.run(main())
    assert _stored(db) == [1]


def test_a_group_waits_for_another_process_writing_and_then_commits(
        db: PD.PaymentDb) -> None:  # noqa: F811
    """Another process (an svcard tool) holds SQLite's write lock as a group begins: the
    group's BEGIN IMMEDIATE waits in SQLite's busy handler (up to 30 s), then every step of
    the group commits together, the tool's row too."""
    import sqlite3

    path = db.engine.url.database
    assert path
    tool = sqlite3.connect(path, isolation_level=None, timeout=30)
    tool.execute("BEGIN IMMEDIATE")
    tool.execute("UPDATE payments SET reason = 'tool' WHERE 0")
    about_to_write = threading.Event()

    def first() -> int:
        about_to_write.set()
        return db.insert_received(draw(1))

    results: list[Any] = []
    runner = SqlRunner(str(db.engine.url))
    worker = threading.Thread(target=lambda: results.extend(grouped(runner, [
        (first, ()), (db.insert_received, (draw(2),)), (db.insert_received, (draw(3),))])))
    worker.start()
    wait_for(about_to_write.is_set, "the group's first write", 10)
    tool.execute("COMMIT")
    tool.close()
    worker.join(30)
    assert all(isinstance(r, int) for r in results), results
    assert _stored(db) == [1, 2, 3]


@pytest.mark.parametrize("error", [KeyboardInterrupt, asyncio.CancelledError, SystemExit])
def test_a_step_raising_a_base_exception_undoes_only_itself(
        db: PD.PaymentDb, error: type[BaseException]) -> None:  # noqa: F811
    """A BaseException inside a step's block (not an Exception): its SAVEPOINT is rolled
    back, the other steps of the group commit, and its caller gets that exception, as from a
    thread pool; the writer goes on."""
    engine = db.engine

    def interrupted() -> None:
        with step(engine) as conn:
            conn.execute(PD.payments.insert().values(
                state="received", created=1, updated=1, reason="", proof_handed=0, **draw(2)))
            raise error()

    writer = GroupWriter()
    gate, started = threading.Event(), threading.Event()
    held = writer.submit(lambda: (started.set(), gate.wait(20)))
    wait_for(started.is_set, "the writer to be held", 10)
    futures = [writer.submit(db.insert_received, draw(1)), writer.submit(interrupted),
               writer.submit(db.insert_received, draw(3))]
    gate.set()
    held.result(timeout=20)
    assert isinstance(futures[0].result(timeout=20), int)
    assert isinstance(futures[1].exception(timeout=20), error)
    assert isinstance(futures[2].result(timeout=20), int)
    assert _stored(db) == [1, 3]
    assert writer.groups == 2
    writer.shutdown()
