"""Review (R-money, session 14): clearing's load marks and open ranges, attacked as a whole.

A randomised run of load databases and clearing runs: loads logged loaded or open, open ones
decided later (loaded, not loaded, refused), ids committed out of order (a gap filled later),
the load database restored from an older backup (its ids reused by new loads), a small
MAX_OPEN_RANGES (the mark then stays). Whatever happens, clearing moves a load only if it was
``loaded`` and at most once, never a refused / not loaded one, and at the end every load that
is ``loaded`` in the database has been moved. Replay a failure with SVCARD_SEED=<seed>.
"""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import select
from test_clearing_growth import Setup
from test_clearing_growth2 import Loads, run

from svcard.host.load.server import db as LDB
from svcard.host.settle import clearing as CL
from svcard.host.settle import db as SDB


def _moved(setup: Setup) -> list[tuple[str, str, int]]:
    with setup.engine.connect() as conn:
        return [(r.bank_id, r.txn_id, r.amount) for r in conn.execute(
            select(SDB.moved_loads.c.bank_id, SDB.moved_loads.c.txn_id,
                   SDB.moved_loads.c.amount))]


def _states(db: Loads) -> dict[tuple[str, str], tuple[int, str, int]]:
    with db.engine.connect() as conn:
        return {(r.bank_id, r.txn_id): (r.id, r.state, r.amount)
                for r in conn.execute(select(LDB.loads))}


def _copy(src: Path, dst: Path) -> None:
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    a.close()
    b.close()


@pytest.mark.parametrize("case", range(int(os.environ.get("SVCARD_MONEY_CASES", "6"))))
def test_every_loaded_load_is_moved_once_whatever_happens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: int) -> None:
    seed = int(os.environ.get("SVCARD_SEED", random.randrange(1 << 30)))
    print(f"seed {seed} (replay: SVCARD_SEED={seed})")
    rnd = random.Random(seed)
    monkeypatch.setattr(CL, "FRESH_NS", 0, raising=False)
    setup = Setup(tmp_path)
    path = tmp_path / "load.db"
    db = Loads(path)
    ever_loaded: set[tuple[str, str]] = set()
    open_ids: list[int] = []
    gaps: list[int] = []                    # ids skipped, to be committed "late"
    backup: Path | None = None
    top = 0

    def add(state: str, row_id: int | None = None) -> int:
        nonlocal top
        (got,) = db.add(1, state=state, row_id=row_id, amount=rnd.randrange(1, 1000))
        top = max(top, got)
        return got

    # a load decided once is decided so again (a database restored to before the decision
    # gets the same outcome: the card did load it or did not)
    fate: dict[tuple[str, str], str] = {}

    def decide(row_id: int, state: str) -> None:
        key = next(k for k, (i, _, _) in _states(db).items() if i == row_id)
        state = fate.setdefault(key, state)
        db.set_state(row_id, state)

    for _ in range(60):
        op = rnd.random()
        cap = rnd.choice([0, 1, 3, 100_000])
        monkeypatch.setattr(SDB, "MAX_OPEN_RANGES", cap)
        if os.environ.get("SVCARD_TRACE"):
            with setup.engine.connect() as conn:
                print(f"op={op:.2f} cap={cap} top={top} open={open_ids} gaps={gaps}",
                      list(conn.execute(select(SDB.load_marks))),
                      list(conn.execute(select(SDB.open_loads.c.lo, SDB.open_loads.c.hi))),
                      sorted((i, s) for i, s, _ in _states(db).values()))
        if op < 0.25:
            add("loaded")
        elif op < 0.4:
            open_ids.append(add(rnd.choice(["received", "authorized"])))
        elif op < 0.55 and open_ids:
            decide(open_ids.pop(rnd.randrange(len(open_ids))),
                   rnd.choice(["loaded", "not_loaded", "refused"]))
        elif op < 0.65:   # an id taken, committed after a later one (two nodes)
            gaps.append(top + 1)
            add("loaded", row_id=top + 2)
        elif op < 0.72 and gaps:
            add(rnd.choice(["loaded", "refused"]), row_id=gaps.pop(rnd.randrange(len(gaps))))
        elif op < 0.77:
            backup = tmp_path / "backup.db"
            _copy(path, backup)
        elif op < 0.82 and backup is not None:   # restored: later rows lost, ids reused
            db.engine.dispose()
            _copy(backup, path)
            states = _states(db)
            open_ids = [i for _, (i, s, _) in states.items() if s not in LDB.FINAL]
            gaps = []
            top = max([i for i, _, _ in states.values()], default=0)
        else:
            run(setup, db.url)
        ever_loaded |= {k for k, (_, s, _) in _states(db).items() if s == "loaded"}
        moved = _moved(setup)
        assert len(moved) == len({(b, t) for b, t, _ in moved}), "a load moved twice"
        assert not {(b, t) for b, t, _ in moved} - ever_loaded, "a load moved not loaded"
    for row_id in open_ids:
        decide(row_id, "loaded")
    for row_id in gaps:
        add("loaded", row_id=row_id)
    monkeypatch.setattr(SDB, "MAX_OPEN_RANGES", 100_000)
    run(setup, db.url)
    run(setup, db.url)
    states = _states(db)
    moved = {(b, t): a for b, t, a in _moved(setup)}
    loaded_now = {k: a for k, (_, s, a) in states.items() if s == "loaded"}
    missing = set(loaded_now) - set(moved)
    assert not missing, f"loaded but never moved: {sorted(missing)} (seed {seed})"
    assert all(moved[k] == a for k, a in loaded_now.items())
    refused_now = {k for k, (_, s, _) in states.items() if s != "loaded"}
    assert not refused_now & set(moved), "a refused / not loaded load was moved"


def test_postgresql_late_commits_rollbacks_and_clock_jumps_lose_no_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same on PostgreSQL with real transactions held open across runs (two load-server
    nodes: an id taken, committed after later ones, or rolled back) and clearing's clock jumping
    past GAP_MS: a held insert that commits late is still moved, once."""
    from pg_env import start_cluster
    from sqlalchemy import insert

    seed = int(os.environ.get("SVCARD_SEED", random.randrange(1 << 30)))
    print(f"seed {seed} (replay: SVCARD_SEED={seed})")
    rnd = random.Random(seed)
    monkeypatch.setattr(CL, "FRESH_NS", 0, raising=False)
    real, offset = SDB.time.time, [0.0]
    monkeypatch.setattr(SDB.time, "time", lambda: real() + offset[0])
    cluster = start_cluster()
    held: list[tuple[object, object]] = []
    try:
        setup = Setup(tmp_path, cluster.new_database())
        url = cluster.new_database()
        db = Loads.__new__(Loads)
        db.url, db.engine, db.count = url, LDB.make_engine(url), 0
        open_ids: list[int] = []
        for _ in range(int(os.environ.get("SVCARD_MONEY_STEPS", "40"))):
            op = rnd.random()
            monkeypatch.setattr(SDB, "MAX_OPEN_RANGES", rnd.choice([0, 2, 100_000]))
            if op < 0.2:
                db.add(1)
            elif op < 0.3:
                open_ids += db.add(1, state="authorized")
            elif op < 0.4 and open_ids:
                db.set_state(open_ids.pop(rnd.randrange(len(open_ids))),
                             rnd.choice(["loaded", "not_loaded"]))
            elif op < 0.55:   # a node's insert, not committed yet
                db.count += 1
                conn = db.engine.connect()
                txn = conn.begin()
                conn.execute(insert(LDB.loads).values(
                    bank_id="0000000000000B01", txn_id=f"H{db.count:08d}", state="loaded",
                    amount=rnd.randrange(1, 1000), currency_code=156,
                    issuer_id="0102030405060708", card_serial=f"{db.count:016X}",
                    s1="AAAAAAAA", online_counter=db.count, created=1, updated=1))
                held.append((conn, txn))
            elif op < 0.7 and held:
                conn, txn = held.pop(rnd.randrange(len(held)))
                (txn.commit if rnd.random() < 0.7 else txn.rollback)()   # type: ignore[attr-defined]
                conn.close()   # type: ignore[attr-defined]
            elif op < 0.75:
                offset[0] += 11 * 60   # clearing's clock: past GAP_MS
            else:
                run(setup, url)
            moved = _moved(setup)
            assert len(moved) == len({(b, t) for b, t, _ in moved}), "a load moved twice"
        for conn, txn in held:
            txn.commit()   # type: ignore[attr-defined]
            conn.close()   # type: ignore[attr-defined]
        held = []
        for row_id in open_ids:
            db.set_state(row_id, "loaded")
        monkeypatch.setattr(SDB, "MAX_OPEN_RANGES", 100_000)
        offset[0] += 11 * 60
        run(setup, url)
        run(setup, url)
        states = _states(db)
        moved_now = {(b, t): a for b, t, a in _moved(setup)}
        loaded_now = {k: a for k, (_, s, a) in states.items() if s == "loaded"}
        missing = set(loaded_now) - set(moved_now)
        assert not missing, f"loaded but never moved: {sorted(missing)} (seed {seed})"
        assert all(moved_now[k] == a for k, a in loaded_now.items())
        assert not {k for k, (_, s, _) in states.items() if s != "loaded"} & set(moved_now)
        db.engine.dispose()
        setup.engine.dispose()
    finally:
        for conn, _txn in held:
            conn.close()   # type: ignore[attr-defined]
        cluster.stop()


def test_postgresql_bank_races_register_once_and_lock_out(tmp_path: Path) -> None:
    """C3's bank steps on PostgreSQL (prebuilt statements, UPDATE ... RETURNING): confirmations
    of one load raced (some "loaded", some "not loaded", some for another card or amount)
    register it once and refund at most once; a replayed one changes nothing; wrong secrets
    tried in parallel are each counted and the limit locks the account."""
    from concurrent.futures import ThreadPoolExecutor

    from pg_env import start_cluster

    from svcard.host.load.bank import db as bank_db
    from svcard.host.load.bank import steps as bank_steps

    cluster = start_cluster()
    try:
        bank = bank_db.BankDb(bank_db.make_engine(cluster.new_database()))
        bank.create_account("alice", "Alice", 156, balance=1_000, secret="pw")

        def balance() -> int:
            with bank.engine.connect() as conn:
                return int(conn.exec_driver_sql(
                    "SELECT balance FROM accounts WHERE account_id = 'alice'").scalar_one())

        for round_ in range(6):
            txn = f"{round_:02x}" * 16
            bank.debit_for_load("alice", txn, 100, "1234", f"r{round_}", "")
            calls = [(100, "1234", i % 2 == 0) for i in range(8)] + [
                (101, "1234", False), (100, "9999", False)]
            with ThreadPoolExecutor(10) as pool:
                got = list(pool.map(lambda c, t=txn: bank_steps.register_confirmed(
                    bank, t, c[0], c[1], c[2], "raced"), calls))
            assert [g.outcome for g in got[8:]] == ["mismatch", "mismatch"]
            won = [g for g in got[:8] if g.outcome == "registered"]
            assert len(won) == 1 and all(g.outcome == "already" for g in got[:8]
                                         if g is not won[0])
            state = bank.load(txn)["state"]   # type: ignore[index]
            assert balance() == 1_000 - 100 * (round_ + 1) + (
                100 * sum(1 for r in range(round_ + 1)
                          if bank.load(f"{r:02x}" * 16)["state"] == "refunded"))   # type: ignore[index]
            again = bank_steps.register_confirmed(bank, txn, 100, "1234", False, "replayed")
            assert (again.outcome, again.state) == ("already", state)
        before = balance()
        assert bank_steps.register_confirmed(bank, "ee" * 16, 100, "1234", False, "x").outcome \
            == "missing" and balance() == before

        policy = bank_db.SecretPolicy(max_failures=5, base_delay=60.0)
        now = 1_000_000

        def attempt(_: int) -> str:
            try:
                bank.claim_attempt("alice", policy, now)
                return "counted"
            except bank_db.SecretLocked:
                return "locked"

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(attempt, range(40)))
        assert outcomes.count("counted") == 5, outcomes   # the 5th locks out the rest
        view = bank_steps.start_view(bank, "alice", None)
        assert not view.clean
        assert bank.remembered_secret_ok("alice", now + 1) > 0
        bank.engine.dispose()
    finally:
        cluster.stop()


def test_more_open_ranges_than_the_cap_still_move_the_mark(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loads left open for good (a client that never finished: ``authorized`` forever) pile up
    over the years. Past MAX_OPEN_RANGES the mark used to stay where it was for every later
    run (nothing saved, so nothing ever aged out): each run read every load since, the growth
    issue 16 removed, back for good. Now the ranges are merged down to the cap (a merged range
    only re-reads rows, whose loads are moved once by key) and the mark moves."""
    monkeypatch.setattr(CL, "FRESH_NS", 0, raising=False)
    monkeypatch.setattr(SDB, "MAX_OPEN_RANGES", 2)
    setup = Setup(tmp_path)
    db = Loads(tmp_path / "load.db")
    db.add(3)
    assert run(setup, db.url).loads_moved == 3
    abandoned = []
    for _ in range(5):
        abandoned += db.add(1, state="authorized")
        db.add(2)
    assert run(setup, db.url).loads_moved == 10
    for n in (4, 6):
        db.add(n)
        assert run(setup, db.url).loads_moved == n
        with setup.engine.connect() as conn:
            marks = [r.mark for r in conn.execute(select(SDB.load_marks))]
            kept = list(conn.execute(select(SDB.open_loads)))
        assert marks == [max(i for i, _, _ in _states(db).values())], marks
        assert 1 <= len(kept) <= 2
    db.set_state(abandoned[2], "loaded")   # a late one decided after all: moved, once
    second = run(setup, db.url)
    assert (second.loads_moved, run(setup, db.url).loads_moved) == (1, 0)


def test_a_proofs_file_of_many_batches_asks_few_statements(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A late proofs file may hold 100,000 proofs, each of another batch: looking the held
    records up one batch at a time made 100,000 statements (12 s CPU on SQLite, a round trip
    each on PostgreSQL) from one file anyone who delivers files can write. Now a few hundred
    proofs a statement, whatever their batches; a proof still finds only its own record."""
    from sqlalchemy import Engine, event, insert
    from test_clearing_growth import PSAM, TERMINAL

    from svcard.host.settle.proofs import ProofsVerdict, apply_proofs

    monkeypatch.setattr(CL, "FRESH_NS", 0, raising=False)
    setup = Setup(tmp_path)
    with setup.engine.begin() as conn:   # held records: batch b, TTN b + 1, for a few b
        for b in (3, 40, 1999):
            conn.execute(insert(SDB.uncleared).values(
                run_number=1, created=1, updated=1, terminal_id=TERMINAL.hex().upper(),
                psam_id=PSAM, batch_number=b, record_index=0, ttn=b + 1,
                card_serial="0" * 16, card_counter=b, amount=1, record="00" * 64,
                state="held", reason=""))
    statements: list[str] = []

    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        if "FROM uncleared_records" in statement:
            statements.append(statement)

    proofs = [(b, b + 1 if b in (3, 1999) else b + 2, b"\0" * 4) for b in range(2000)]
    pv = ProofsVerdict("proofs-many.json", "processed", "", digest="e" * 64,
                       terminal_id=TERMINAL.hex().upper(), psam_id=PSAM, proofs=proofs)
    event.listen(Engine, "before_cursor_execute", seen)
    try:
        with setup.engine.begin() as conn:
            apply_proofs(conn, setup.config, pv, 99, set(), lambda *a: None)
    finally:
        event.remove(Engine, "before_cursor_execute", seen)
    print("statements:", len(statements))
    assert len(statements) <= 10   # before: 2,000 (one per batch)
    found = [(o["batch_number"], o["state"]) for o in pv.outcomes if o["state"] != "not held"]
    assert sorted(b for b, _ in found) == [3, 1999]   # 40's proof names TTN 42, not 41
