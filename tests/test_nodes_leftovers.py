"""What issue 16 left over at the nodes (each test failed on the code before its fix): one home
for the node code the payment and load nodes shared, two images of one PSAM serial never both
served, the SQLite writer's last steps committed at shutdown, and no second late-proofs file
after a failed group."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from svcard.host.kit.db import step
from svcard.host.kit.serving import ServerThread, free_port


def test_the_node_code_of_payment_and_load_nodes_has_one_home() -> None:
    """The on-demand reader, the lease slot's name and the node process were written twice
    (host/pay/nodes.py and host/load/nodes.py); now once, in terminal/reader_specs.py and
    kit/serving.py."""
    from svcard.host.kit.serving import NodeProcess
    from svcard.host.load import nodes as LN
    from svcard.host.pay import nodes as PN
    from svcard.host.terminal import reader_specs as R

    assert PN.OnDemandReader is LN.OnDemandReader is R.OnDemandReader
    assert PN.slot_name is LN.slot_name is R.slot_name
    assert PN.node_readers is R.node_readers
    assert issubclass(PN.Node, NodeProcess) and issubclass(LN.LoadNode, NodeProcess)


# --- two images of one PSAM ------------------------------------------------------------------

def test_two_images_of_one_psam_serial_are_never_both_served(tmp_path: Path) -> None:
    """Two nodes, each given both slots; the second slot holds a copy of the first PSAM (one
    serial). Before: each node served one of them, and both wrote batches of one name and
    TTNs from two counters. Now the serial is bound to the slot that opened it first; the
    copy is refused before it serves, its lease given back, and not taken again."""
    from svcard.host.pay.server import leases as L
    from svcard.host.pay.server.db import make_engine
    from svcard.host.pay.stack import psam_images
    from svcard.host.terminal.reader_specs import OnDemandReader

    (first,) = psam_images(tmp_path, 1)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(first, copy / "psam1.json")   # the same serial, another slot
    specs = [f"virtual:{first}", f"virtual:{copy / 'psam1.json'}"]
    store = L.LeaseStore(make_engine(f"sqlite:///{tmp_path / 'pay.db'}"))

    async def sql(fn: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    pools = [L.LeasedPsamPool([OnDemandReader(s) for s in specs]) for _ in range(2)]

    async def run() -> list[set[str]]:
        keepers = [L.LeaseKeeper(store, pool, name, 60.0, sql, lambda alive: 0)
                   for pool, name in zip(pools, ("a", "b"), strict=True)]
        for pool in pools:
            await pool.start()
        await keepers[0].start()     # alone: takes both slots, refuses the copy
        await keepers[1].start()     # takes what is free: the copy again, refused
        await keepers[0].tick()
        await keepers[1].tick()
        served = [{m.reader.name for m in pool.psams} for pool in pools]
        for keeper in keepers:
            await keeper.stop()
        return served

    served = asyncio.run(run())
    assert sorted(len(s) for s in served) == [0, 1], served   # one image of the PSAM served
    (kept,) = served[0] | served[1]
    (refused,) = set(specs) - {kept}
    slots = [h["slot"] for h in store.history()]
    assert slots.count(refused) == 2, "each node took the other image's lease once, gave it back"
    assert all(h["ended"] is not None for h in store.history() if h["slot"] == refused)
    assert store.claim_serial(refused, "00" * 10) is None   # another serial: its own
    for pool in pools:
        pool.close()
    store.engine.dispose()


# --- the writer drained at exit --------------------------------------------------------------

def _slow_write(engine: Any, started: threading.Event) -> None:
    """A step still running when the server is told to stop."""
    started.set()
    time.sleep(1.0)
    with step(engine) as conn:
        conn.execute(text("INSERT INTO drain_probe VALUES (1)"))


def _committed(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM drain_probe")).scalar_one())
    finally:
        engine.dispose()


def _stop_with_a_step_in_flight(server: Any, url: str) -> None:
    with server.db.engine.begin() as conn:
        conn.execute(text("CREATE TABLE drain_probe (x INTEGER)"))
    thread = ServerThread(server.app(), port=free_port()).start()
    started = threading.Event()
    future = server.sql.executor.submit(_slow_write, server.db.engine, started)
    assert started.wait(10)
    thread.stop()
    # before: the lifespan ended at once and the step's group was still open (a process
    # exiting then lost it: the writer thread is a daemon)
    assert future.done() and future.exception() is None
    assert _committed(url) == 1


def test_the_payment_server_commits_its_writers_last_group_at_shutdown(tmp_path: Path) -> None:
    from svcard.host.pay.server.app import MerchantAccount, PaymentConfig, PaymentServer
    from svcard.host.pay.stack import DEMO_MERCHANT_ID, psam_images
    from svcard.host.terminal.reader_specs import open_reader

    (psam,) = psam_images(tmp_path, 1)
    url = f"sqlite:///{tmp_path / 'pay.db'}"
    server = PaymentServer(PaymentConfig(
        {DEMO_MERCHANT_ID: MerchantAccount(DEMO_MERCHANT_ID, bytes(32))}, db_url=url),
        [open_reader(f"virtual:{psam}")])
    _stop_with_a_step_in_flight(server, url)
    server.db.engine.dispose()


def test_the_load_server_commits_its_writers_last_group_at_shutdown(tmp_path: Path) -> None:
    from svcard.host.load.server.app import BankAccount, LoadConfig, LoadServer
    from svcard.host.load.stack import DEMO_BANK_ID, hsm_image
    from svcard.host.terminal.reader_specs import open_reader

    url = f"sqlite:///{tmp_path / 'load.db'}"
    server = LoadServer(LoadConfig({DEMO_BANK_ID: BankAccount(DEMO_BANK_ID, bytes(32))},
                                   bytes(6), db_url=url),
                        [open_reader(f"virtual:{hsm_image(tmp_path)}")])
    _stop_with_a_step_in_flight(server, url)
    server.db.engine.dispose()


# --- late proofs after a failed group --------------------------------------------------------

def test_a_failed_group_does_not_write_a_second_late_proofs_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The late-proofs step wrote its file and marked its rows in a group that another step
    then broke (a database error): the group was rolled back and the step ran again alone,
    writing the same proofs in a second file (its name carried the time). Now the file is
    named by its content: the step run again rewrites the same file."""
    from svcard.host.pay.server.app import MerchantAccount, PaymentConfig, PaymentServer
    from svcard.host.pay.server.batches import _write_late_proofs
    from svcard.host.pay.stack import DEMO_MERCHANT_ID, psam_images
    from svcard.host.terminal.reader_specs import open_reader

    (psam,) = psam_images(tmp_path, 1)
    folder = tmp_path / "concentration"
    server = PaymentServer(PaymentConfig(
        {DEMO_MERCHANT_ID: MerchantAccount(DEMO_MERCHANT_ID, bytes(32))},
        db_url=f"sqlite:///{tmp_path / 'pay.db'}", concentration_dir=str(folder)),
        [open_reader(f"virtual:{psam}")])
    rows = [{"id": 1, "psam_id": "00" * 10, "batch_number": 3, "ttn": 7, "tac": "0a0b0c0d"}]
    monkeypatch.setattr(server.db, "late_proofs", lambda: rows)   # unhanded until marked

    def breaks() -> None:
        with step(server.db.engine):
            raise OperationalError("UPDATE", {}, Exception("disk I/O error"))

    gate, started = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        gate.wait(30)

    async def main() -> list[Any]:
        held = asyncio.ensure_future(server.sql(hold))
        await asyncio.sleep(0)
        assert await asyncio.to_thread(started.wait, 10)
        calls = [asyncio.ensure_future(server.sql(_write_late_proofs, server)),
                 asyncio.ensure_future(server.sql(breaks))]
        await asyncio.sleep(0.1)   # both queued behind the held step: one group
        gate.set()
        await held
        return list(await asyncio.gather(*calls, return_exceptions=True))

    written, broke = asyncio.run(main())
    assert isinstance(broke, OperationalError)
    files = sorted(folder.glob("proofs-*.json"))
    assert len(files) == 1, [f.name for f in files]
    assert written == [str(files[0])]
    doc = json.loads(files[0].read_text())
    assert doc["proofs"] == [{"batch_number": 3, "terminal_txn_number": 7, "tac": "0A0B0C0D"}]
    server.db.engine.dispose()


# --- a client's address is its connection's ----------------------------------------------------

def _echo_client_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def who(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.client.host if request.client else "?")

    return Starlette(routes=[Route("/who", who)])


def test_a_forwarded_for_header_does_not_choose_the_client_address(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn trusted X-Forwarded-For from loopback: a local client, or any client behind a
    local nginx (which passes the header on), named the address its FIG. 5 holds per client
    and the bank's lockouts per address were counted under. Now the connection's address."""
    import httpx
    import uvicorn

    from svcard.host.kit import serving

    with ServerThread(_echo_client_app()) as thread:
        answer = httpx.get(thread.url + "/who", headers={"X-Forwarded-For": "203.0.113.9"})
    assert answer.text == "127.0.0.1"
    seen: list[uvicorn.Config] = []
    monkeypatch.setattr(serving._DrainingServer, "run", lambda self: seen.append(self.config))
    serving.serve(_echo_client_app(), host="127.0.0.1", port=free_port(), log_level="warning")
    assert seen and seen[0].proxy_headers is False


# --- the cost of a step --------------------------------------------------------------------

def test_a_grouped_step_is_a_bare_savepoint(tmp_path: Path) -> None:
    """A step on the SQLite writer was SQLAlchemy's begin_nested(): ~50 us of CPU more than
    the SAVEPOINT it sends (77 against 30 us for a step of one INSERT, measured). The step is
    now a SAVEPOINT on the driver's connection: SQLAlchemy sends no savepoint of its own, and
    a failing step still undoes only itself."""
    from sqlalchemy import event

    from svcard.host.kit.http import SqlRunner

    url = f"sqlite:///{tmp_path / 'x.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    sent: list[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: sent.append(statement))

    def good(i: int) -> None:
        with step(engine) as conn:
            conn.execute(text("INSERT INTO t VALUES (:x)"), {"x": i})

    def bad() -> None:
        with step(engine) as conn:
            conn.execute(text("INSERT INTO t VALUES (99)"))
            raise ValueError("undone alone")

    runner = SqlRunner(url)

    async def main() -> list[Any]:
        calls = [runner(good, 1), runner(bad), runner(good, 2)]
        return list(await asyncio.gather(*calls, return_exceptions=True))

    results = asyncio.run(main())
    assert results[0] is None and isinstance(results[1], ValueError) and results[2] is None
    assert not [s for s in sent if "SAVEPOINT" in s.upper()], sent
    with engine.connect() as conn:
        assert [r[0] for r in conn.execute(text("SELECT x FROM t ORDER BY x"))] == [1, 2]
    assert runner.executor is not None
    runner.executor.shutdown()
    engine.dispose()
