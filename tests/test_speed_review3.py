"""Review (R-speed) of this session's speed changes: breaks found, each with its test.

1. kit/reader_pool.py ``handed_back``: results finished together are delivered to the loop in one
   batch (``_Inbox.deliver``). An asyncio Future refuses a StopIteration (TypeError), and that
   TypeError ended the batch: every other waiter of the same wake-up (other draws' DB steps, in
   a writer group) then waited forever, their PSAMs never given back to the pool.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from svcard.host.kit.reader_pool import Worker, handed_back, one_wake
from svcard.host.terminal.journal import Journal


def test_a_stopiteration_in_a_batch_does_not_strand_the_other_waiters() -> None:
    async def main() -> tuple[BaseException | None, int]:
        bad: Future[int] = Future()
        good: Future[int] = Future()
        first, second = handed_back(bad), handed_back(good)
        with one_wake():   # as the SQLite writer sets a whole group's results
            bad.set_exception(StopIteration())
            good.set_result(42)
        value = await asyncio.wait_for(second, 5)
        try:
            await asyncio.wait_for(first, 5)
        except TimeoutError:
            raise
        except Exception as exc:   # the error the caller gets instead
            return exc, value
        return None, value

    error, value = asyncio.run(main())
    assert value == 42
    assert isinstance(error, RuntimeError) and "StopIteration" in str(error)


def test_a_worker_call_raising_stopiteration_reaches_its_caller() -> None:
    worker = Worker("review3")

    def stops() -> int:
        raise StopIteration

    async def main() -> None:
        with pytest.raises(RuntimeError, match="StopIteration"):
            await asyncio.wait_for(handed_back(worker.submit(stops)), 5)
        assert await asyncio.wait_for(handed_back(worker.submit(lambda: 7)), 5) == 7

    try:
        asyncio.run(main())
    finally:
        worker.shutdown()


def _finished(n: int) -> str:
    txn = f"old{n:05d}"
    return "".join(json.dumps({"txn_id": txn, **step}) + "\n" for step in (
        {"state": "draw", "card_serial": "C1", "pad": "x" * 60}, {"state": "done"}))


def _open_txns(j: Journal) -> list[str]:
    return [e["txn_id"] for e in j.unfinished("C1")]


def test_a_journal_cut_and_rewritten_in_place_is_read_anew(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_text("".join(_finished(n) for n in range(300))
                    + json.dumps({"txn_id": "A", "state": "draw", "card_serial": "C1"}) + "\n")
    live = Journal(path)
    live.checkpoint_every = 1    # it writes a checkpoint at each read
    assert _open_txns(live) == ["A"]
    (tmp_path / "journal.jsonl.1").write_bytes(path.read_bytes())   # copytruncate
    with path.open("r+b") as fh:
        fh.truncate(0)
    writer = Journal(path)
    writer.write("C", "debit-sent", card_serial="C1")   # opened after the rotation
    n = 0
    while path.stat().st_size < live._offset + 200:
        writer.write(f"new{n}", "draw", card_serial="C1", pad="y" * 50)
        writer.write(f"new{n}", "done")
        n += 1
    writer.write("B", "draw", card_serial="C1")
    assert _open_txns(live) == ["C", "B"]          # the live reader: read anew
    assert _open_txns(Journal(path)) == ["C", "B"]  # a new process: no stale checkpoint
    assert "A" not in Journal(path) and Journal(path).is_open("C")


def test_cached_keys_and_ciphers_never_cross_merchants_or_cards_in_threads() -> None:
    """Guard (no break found): the DK/AES-GCM LRU caches and the per-thread ECB encryptors,
    used by many threads at once for two merchants and many transactions, give each exactly
    what a fresh computation gives; a blob sealed for one never opens for the other."""
    import threading

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from svcard.protocols import crypto, secure

    shared = {b"M1" * 4: bytes(range(32)), b"M2" * 4: bytes(range(1, 33))}
    des_keys = [bytes([k]) * 16 for k in range(1, 9)]
    errors: list[str] = []

    def worker(seed: int) -> None:
        for n in range(300):
            txn = (seed * 1000 + n % 40).to_bytes(16, "big")
            pair = list(shared.items())
            mine, other = pair[(seed + n) % 2], pair[(seed + n + 1) % 2]
            dk = secure.derive_key(mine[1], mine[0], txn)
            if dk != secure._derive(mine[1], mine[0], txn):
                errors.append(f"wrong DK for {mine[0]!r}")
            blob = secure.seal(dk, b"amount 100", mine[0] + txn)
            try:
                secure.open_sealed(secure.derive_key(other[1], other[0], txn), blob,
                                   mine[0] + txn, "x")
                errors.append("opened with the other merchant's DK")
            except secure.SealError:
                pass
            if secure.open_sealed(dk, blob, mine[0] + txn, "x") != b"amount 100":
                errors.append("did not open with its own DK")
            key = des_keys[(seed + n) % len(des_keys)]
            block = n.to_bytes(8, "big") * 2
            fresh = Cipher(algorithms.TripleDES(key), modes.ECB()).encryptor()
            if crypto.encrypt_ecb(key, block) != fresh.update(block) + fresh.finalize():
                errors.append("ECB block differs from a fresh encryptor's")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    info = repr(secure._derive_cached.cache_info()) + repr(secure._cipher_cached.cache_info())
    assert all(k.hex() not in info for k in shared.values())


@pytest.mark.parametrize("variant", ["fig7", "fig8"])
def test_a_failed_commit_of_the_psam_threads_step_sends_no_command(
        stack: Any, card: Path, http: Any, tmp_path: Path, variant: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard (no break found): the draw's step given by the PSAM's thread to the writer fails
    (a full disk): the client gets 503, never the debit command; the card is not debited."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from svcard.card.storage import read_image
    from svcard.host.pay import client as C
    from svcard.host.terminal.online import PaymentRefused
    from svcard.host.terminal.reader_specs import open_reader

    server = stack.payment_server
    advance = server.db.advance
    failed: list[dict[str, Any]] = []

    def full(row_id: int, from_state: str, fence: Any = None, **values: Any) -> bool:
        if values.get("state") == "released":
            failed.append(values)
            raise OperationalError("UPDATE payments", {}, sqlite3.OperationalError(
                "database or disk is full"))
        return bool(advance(row_id, from_state, fence, **values))

    monkeypatch.setattr(server.db, "advance", full)
    before = read_image(card)["app"]["ep"]["balance"]
    with open_reader(f"virtual:{card}") as reader, pytest.raises(PaymentRefused) as refused:
        C.pay(stack.checkout_url("ticket", variant), reader,
              journal=Journal(tmp_path / "journal.jsonl"), http=http)
    assert failed and getattr(refused.value, "status", None) == 503, refused.value
    assert read_image(card)["app"]["ep"]["balance"] == before
    monkeypatch.undo()   # the disk has room again: the PSAM was given back, the next one pays
    with open_reader(f"virtual:{card}") as reader:
        C.pay(stack.checkout_url("ticket", variant), reader,
              journal=Journal(tmp_path / "journal.jsonl"), http=http)
    assert read_image(card)["app"]["ep"]["balance"] < before


def test_sigkill_while_drawing_keeps_every_answered_command_and_voids_the_rest(
        tmp_path: Path) -> None:
    """Guard (no break found) for 84f4cf8: the payment server (SQLite, 2 PSAMs) is SIGKILLed
    while 4 clients draw FIG. 7 payments: every debit command a client received is in its row
    (the answer left after the commit); started again, the server voids every draw it never
    answered (no row left "received"). SVCARD_REVIEW3_KILLS (default 1) repeats it."""
    import os
    import random
    import signal
    import sqlite3
    import subprocess
    import sys
    import threading
    import time

    import httpx
    from test_attack_pay import Honest, own_order

    from svcard.fixtures import fixture_path
    from svcard.host.demo.system import card_image
    from svcard.host.kit.serving import free_port, wait_http
    from svcard.host.pay.stack import psam_images
    from svcard.host.terminal.reader_specs import open_reader
    from svcard.protocols import messages as M

    seed = int(os.environ.get("SVCARD_SEED") or random.randrange(2**32))
    print(f"seed {seed} (replay: SVCARD_SEED={seed})")
    rng = random.Random(seed)
    psams = psam_images(tmp_path, 2)
    config = tmp_path / "payment.toml"
    config.write_text(fixture_path("payment-demo.toml").read_text().replace(
        'concentration_dir = "concentration"',
        f'concentration_dir = "{tmp_path / "concentration"}"'))
    db = tmp_path / "payments.db"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).parent / "svcard"), "serve", "payment", "--config",
               str(config), "--db", f"sqlite:///{db}", "--port", str(port),
               *[a for p in psams for a in ("--psam", f"virtual:{p}")]]
    cards = [card_image(tmp_path, f"card{i}.json") for i in range(4)]
    answered: dict[str, bytes] = {}
    for _ in range(int(os.environ.get("SVCARD_REVIEW3_KILLS") or 1)):
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            wait_http(url + "/v1/health")
            stop = threading.Event()

            def client(card: Path, stop: threading.Event) -> None:
                with httpx.Client(timeout=10) as http, open_reader(f"virtual:{card}") as r:
                    while not stop.is_set():
                        params = own_order(url, "fig7")
                        try:
                            cmd = Honest(None, http, r, params=params).draw()
                        except (httpx.HTTPError, AssertionError):
                            return   # the server is gone (or refused): stop
                        answered[params["txn_id"]] = M.build(M.DebitCommand, dict(cmd))

            threads = [threading.Thread(target=client, args=(c, stop)) for c in cards]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.5, 2.0))   # a random moment of the work, not a wait
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=30)
            stop.set()
            for t in threads:
                t.join(30)
        finally:
            server.kill()
            server.wait(timeout=30)
        with sqlite3.connect(db) as conn:
            rows = {t: (s, c) for t, s, c in conn.execute(
                "SELECT txn_id, state, debit_command FROM payments")}
        assert answered, "no draw was answered before the kill"
        for txn, cmd in answered.items():
            assert txn in rows and rows[txn] == ("released", cmd), (txn, rows.get(txn))
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(url + "/v1/health")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    with sqlite3.connect(db) as conn:
        states = dict(conn.execute("SELECT state, count(*) FROM payments GROUP BY state"))
    assert "received" not in states and "busy" not in states, states
    assert states.get("released", 0) >= len(answered), states
    print(f"{len(answered)} draws answered; states after the restart {states}")


def test_a_load_committed_more_than_gap_ms_after_its_id_was_seen_missing_is_moved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """b1003b8 moves a load server's loads past a mark and keeps unseen ids open GAP_MS (10
    min) only. On PostgreSQL an id is taken before its commit: a load server node frozen (a
    SIGSTOP, a VM pause, a lock wait) between its INSERT and its COMMIT for longer than that
    commits a ``loaded`` row that no later run ever reads: the bank's debit and the card's load
    never reach the settlement (before b1003b8 every run read every row). Fixed in 68d7ce1: on
    PostgreSQL a missing id is given up only once every transaction running when it was first
    missed has ended."""
    from pg_env import start_cluster
    from sqlalchemy import insert
    from test_clearing_growth import Setup
    from test_clearing_growth2 import Loads, run

    from svcard.host.load.server import db as LDB
    from svcard.host.settle import db as SDB

    cluster = start_cluster()
    try:
        setup = Setup(tmp_path, cluster.new_database())
        url = cluster.new_database()
        loads = Loads.__new__(Loads)
        loads.url, loads.engine, loads.count = url, LDB.make_engine(url), 0
        loads.add(2)
        assert run(setup, url).loads_moved == 2
        late = loads.engine.connect()
        slow = late.begin()
        late.execute(insert(LDB.loads).values(
            bank_id="0000000000000B01", txn_id="FROZEN", state="loaded", amount=9,
            currency_code=156, issuer_id="0102030405060708", card_serial="F" * 16,
            s1="AAAAAAAA", online_counter=1, created=1, updated=1))
        loads.add(1, amount=5)           # a later id, committed first
        assert run(setup, url).total_loaded == 5
        real = SDB.time.time
        monkeypatch.setattr(SDB.time, "time", lambda: real() + 11 * 60)   # 11 minutes on
        assert run(setup, url).loads_moved == 0   # the id is still missing: dropped
        slow.commit()                    # the frozen node goes on
        late.close()
        moved = sum(run(setup, url).total_loaded for _ in range(2))
        loads.engine.dispose()
        setup.engine.dispose()
        assert moved == 9, "the frozen node's load is never moved to clearing"
    finally:
        cluster.stop()
