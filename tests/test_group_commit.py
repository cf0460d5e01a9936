"""Group commit (issue 16, point 3): the SQLite writer thread (kit/http.py ``SqlRunner``) runs
every step waiting in one transaction, each ``kit.db.step`` block in a SAVEPOINT, commits once,
and only then answers each step. A step that fails undoes only itself; a crash loses no
acknowledged step; PostgreSQL keeps a thread and a transaction per call."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pcsc_env import wait_for
from sqlalchemy import Engine, event, insert, select
from sqlalchemy.exc import OperationalError

from svcard.host.kit.db import DuplicateError, first_row, step
from svcard.host.kit.http import SqlRunner
from svcard.host.kit.serving import free_port
from svcard.host.pay.server import db as PD

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SVCARD = str(Path(sys.executable).parent / "svcard")


def draw(txn: int) -> dict[str, Any]:
    return {"merchant_id": "4d45524348303031", "txn_id": f"{txn:032x}", "variant": 6,
            "amount": 99, "currency_code": 156, "card_serial": f"{txn:020d}",
            "card_counter": txn, "draw_digest": "00" * 32}


def commits(engine: Engine) -> list[int]:
    """A list that grows by one at each COMMIT on ``engine``."""
    seen: list[int] = []
    event.listen(engine, "commit", lambda conn: seen.append(1))
    return seen


@pytest.fixture
def db(tmp_path: Path) -> Iterator[PD.PaymentDb]:
    engine = PD.make_engine(f"sqlite:///{tmp_path / 'payments.db'}")
    yield PD.PaymentDb(engine)
    engine.dispose()


def grouped(runner: SqlRunner, calls: list[tuple[Callable[..., Any], tuple[Any, ...]]],
            ) -> list[Any]:
    """Run ``calls`` through ``runner`` while its writer thread is held, so every one of them
    is waiting when it is let go; each call's result or exception, in order."""
    gate, started = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        gate.wait(30)

    async def main() -> list[Any]:
        held = asyncio.ensure_future(runner(hold))
        await asyncio.sleep(0)
        wait_for(started.is_set, "the writer thread to run the holding step", 10)
        tasks = [asyncio.ensure_future(runner(fn, *args)) for fn, args in calls]
        await asyncio.sleep(0)  # every call is in the queue now
        gate.set()
        await held
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    return asyncio.run(main())


def test_waiting_steps_commit_together(db: PD.PaymentDb) -> None:
    """50 waiting draws: one COMMIT (the writer had one transaction per step before)."""
    runner = SqlRunner(str(db.engine.url))
    seen = commits(db.engine)
    results = grouped(runner, [(db.insert_received, (draw(i),)) for i in range(50)])
    assert all(isinstance(r, int) for r in results), results
    assert len(seen) == 1, f"{len(seen)} commits for 50 waiting steps"
    assert db.counts() == {"received": 50}
    assert runner.executor is not None
    assert runner.executor.groups == 2 and runner.executor.steps == 51
    runner.executor.shutdown()


def test_a_step_reads_what_the_group_wrote_before_it(db: PD.PaymentDb) -> None:
    runner = SqlRunner(str(db.engine.url))
    merchant, txn = draw(7)["merchant_id"], draw(7)["txn_id"]
    row_id, row, advanced = grouped(runner, [
        (db.insert_received, (draw(7),)), (db.get, (merchant, txn)),
        (db.advance, (1, "received")),
    ])
    assert row_id == 1 and row is not None and row["state"] == "received" and advanced is True


def test_a_group_that_only_reads_takes_no_write_lock(db: PD.PaymentDb) -> None:
    """Reads before any write of the group go through a plain connection: nothing to commit,
    and a writer of another process is not held up by them."""
    db.insert_received(draw(1))
    seen = commits(db.engine)
    merchant, txn = draw(1)["merchant_id"], draw(1)["txn_id"]
    rows = grouped(SqlRunner(str(db.engine.url)), [(db.get, (merchant, txn))] * 10)
    assert all(r is not None and r["state"] == "received" for r in rows)
    assert seen == []


def test_a_failing_step_undoes_only_itself(db: PD.PaymentDb) -> None:
    """A duplicate draw (DuplicateError), a step raising inside its block (rolled back) and
    one raising after its block ended (the block stays, as its own commit did before): the
    other steps of the group are kept, and the group commits once."""
    engine = db.engine

    def fails_inside(values: dict[str, Any]) -> None:
        with step(engine) as conn:
            conn.execute(insert(PD.payments).values(
                state="received", created=1, updated=1, **values))
            raise ValueError("refused inside the block")

    def fails_after(values: dict[str, Any]) -> None:
        db.insert_received(values)
        raise ValueError("refused after the block")

    seen = commits(engine)
    out = grouped(SqlRunner(str(engine.url)), [
        (db.insert_received, (draw(1),)), (db.insert_received, (draw(1),)),
        (fails_inside, (draw(2),)), (db.insert_received, (draw(3),)),
        (fails_after, (draw(4),)), (db.insert_received, (draw(5),)),
    ])
    assert isinstance(out[0], int) and isinstance(out[3], int) and isinstance(out[5], int)
    assert isinstance(out[1], DuplicateError)
    assert isinstance(out[2], ValueError) and isinstance(out[4], ValueError)
    assert len(seen) == 1
    with engine.connect() as conn:
        txns = sorted(int(t, 16) for t in conn.execute(select(PD.payments.c.txn_id)).scalars())
    assert txns == [1, 3, 4, 5]


def test_a_database_error_reruns_the_other_steps_alone(db: PD.PaymentDb) -> None:
    """A step whose database error may have ended SQLite's transaction (a full disk, an I/O
    error) breaks the group: it is rolled back and every other step runs again on its own, so
    each gets the outcome it would have had without the group."""
    def disk_full() -> None:
        with step(db.engine):
            raise OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk "
                                                                          "is full"))

    seen = commits(db.engine)
    out = grouped(SqlRunner(str(db.engine.url)), [
        (db.insert_received, (draw(1),)), (disk_full, ()), (db.insert_received, (draw(2),)),
        (db.insert_received, (draw(1),)),
    ])
    assert isinstance(out[0], int) and isinstance(out[2], int)
    assert isinstance(out[1], OperationalError) and isinstance(out[3], DuplicateError)
    assert len(seen) == 3   # the three others again, each alone (the duplicate: nothing)
    assert db.counts() == {"received": 2}


def test_a_step_with_its_own_transaction_sees_the_group_before_it(db: PD.PaymentDb) -> None:
    """Code not converted to ``kit.db.step`` (its own ``engine.begin()``) on the writer thread:
    the group is committed before it (it sees those rows, and does not wait for the group's
    write lock) and right after it."""
    engine = db.engine

    def own_transaction() -> int:
        with engine.begin() as conn:
            conn.execute(insert(PD.payments).values(
                state="received", created=1, updated=1, **draw(9)))
            return len(conn.execute(select(PD.payments.c.id)).all())

    def nested() -> None:
        with step(engine), engine.begin():
            pass

    seen = commits(engine)
    started = time.monotonic()
    out = grouped(SqlRunner(str(engine.url)), [
        (db.insert_received, (draw(1),)), (own_transaction, ()), (db.insert_received, (draw(2),)),
        (nested, ()), (db.insert_received, (draw(3),)),
    ])
    assert out[1] == 2, "the step with its own transaction did not see the group's row"
    assert isinstance(out[3], RuntimeError), out[3]   # said at once, no 30 s busy wait
    assert time.monotonic() - started < 10
    assert db.counts() == {"received": 4}
    assert len(seen) == 3   # the group before it, itself, the rest


def test_off_the_writer_thread_a_step_is_its_own_transaction(db: PD.PaymentDb) -> None:
    seen = commits(db.engine)
    for i in range(3):
        db.insert_received(draw(i))
    with pytest.raises(DuplicateError):
        db.insert_received(draw(0))
    assert len(seen) == 3 and first_row(db.engine, PD.payments, id=3) is not None


# --- a crash loses no acknowledged step ------------------------------------------------------
def merchant(folder: Path, port: int) -> subprocess.Popen[bytes]:
    config = (FIXTURES / "merchant-demo.toml").read_text().replace(
        "http://127.0.0.1:8081", f"http://127.0.0.1:{port}").replace(
        "max_open_per_client = 100", "max_open_per_client = 100000")
    (folder / "merchant.toml").write_text(config)
    cmd = [SVCARD, "serve", "merchant", "--db", f"sqlite:///{folder / 'merchant.db'}",
           "--port", str(port), "--config", str(folder / "merchant.toml")]
    with (folder / "merchant.log").open("ab") as err:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)


def kill_while_ordering(folder: Path, rng: random.Random, acked: list[str]) -> None:
    """Start the merchant server, let 16 clients order, SIGKILL it after a random number of
    answers; the ids of the orders answered are added to ``acked``."""
    port = free_port()
    proc = merchant(folder, port)
    url = f"http://127.0.0.1:{port}/v1/checkout/song?variant=fig6"

    def up() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, "the merchant server to start", 60)
    stop, lock, before = threading.Event(), threading.Lock(), len(acked)

    def client() -> None:
        with httpx.Client(timeout=10, headers={"X-Svcard-Client": "1"}) as http:
            while not stop.is_set():
                try:
                    answer = http.post(url)
                except httpx.HTTPError:
                    return  # the server is gone
                if answer.status_code == 200:
                    with lock:
                        acked.append(answer.json()["txn_id"])

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    target = before + rng.randrange(20, 200)
    try:
        wait_for(lambda: len(acked) >= target, "answers before the kill", 60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stop.set()
        for t in threads:
            t.join(timeout=30)


def test_sigkill_loses_no_acknowledged_order(tmp_path: Path) -> None:
    """16 clients make orders (two steps each: sweep, insert) at a merchant server, which is
    SIGKILLed at a random moment, three times: every order a client got an answer for is in
    the database."""
    seed = int(os.environ.get("SVCARD_SEED", random.randrange(2**32)))
    print(f"seed {seed} (replay: SVCARD_SEED={seed})")
    rng = random.Random(seed)
    acked: list[str] = []
    for _ in range(3):
        kill_while_ordering(tmp_path, rng, acked)
    with sqlite3.connect(tmp_path / "merchant.db") as conn:
        stored = {t for (t,) in conn.execute("SELECT txn_id FROM orders")}
    lost = [t for t in acked if t not in stored]
    assert not lost, f"{len(lost)} acknowledged orders lost of {len(acked)} (seed {seed})"


# --- PostgreSQL: a thread and a transaction per call, as before -------------------------------
@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from pg_env import start_cluster

    c = start_cluster()
    yield c
    c.stop()


def test_postgresql_keeps_a_transaction_per_step(cluster: Any) -> None:
    engine = PD.make_engine(cluster.new_database())
    try:
        db = PD.PaymentDb(engine)
        runner = SqlRunner(str(engine.url.render_as_string(hide_password=False)))
        assert runner.executor is None
        seen = commits(engine)

        async def main() -> list[Any]:
            return list(await asyncio.gather(
                *(runner(db.insert_received, draw(i)) for i in range(20)),
                runner(db.insert_received, draw(0)), return_exceptions=True))

        out = asyncio.run(main())
        assert sum(isinstance(r, int) for r in out) == 20
        assert sum(isinstance(r, DuplicateError) for r in out) == 1
        assert len(seen) == 20 and db.counts() == {"received": 20}
    finally:
        engine.dispose()
