"""The account manager's credit check over all of a customer's open sessions is ONE database
step: 50 initiations reserving at once (each on its own thread, its own connection) never
reserve past the limit, on SQLite here and on PostgreSQL in test_trade_pg.py."""

from __future__ import annotations

import secrets
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import select

from svcard.host.trade import db as D
from svcard.host.trade.server.account import add_customer, reserve


def initiation(customer: str, deposit: int) -> dict[str, Any]:
    return {"customer": customer, "txn": secrets.token_hex(16), "merchant": "shop",
            "operator": "op1", "deposit": deposit, "currency": "EUR",
            "order": {"item": "x", "price": 0},
            "registration": {"session_key": "00" * 32, "agent": "t"}}


def check_concurrent_reservations(url: str, threads: int = 50, fits: int = 17,
                                  deposit: int = 300) -> None:
    engine = D.am_engine(url)
    try:
        add_customer(engine, "zoe", b"\x01" * 32, "EUR", fits * deposit + deposit - 1)
        results: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(threads)

        def one() -> None:
            data = initiation("zoe", deposit)
            barrier.wait()
            got = reserve(engine, "am1", data, "d" * 64, "p" + secrets.token_hex(4),
                          2**40, 10_000, 1)
            with lock:
                results.append(got["state"])

        workers = [threading.Thread(target=one) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        assert sorted(results) == sorted([D.INITIATING] * fits + ["limit"] * (threads - fits))
        with engine.connect() as conn:
            reserved = conn.execute(select(D.am_customers.c.reserved)).scalar_one()
            sessions = conn.execute(select(D.am_sessions.c.session)).scalars().all()
        assert reserved == fits * deposit
        assert sorted(sessions) == sorted(set(sessions)) and len(sessions) == fits
    finally:
        engine.dispose()


def test_concurrent_reservations_sqlite(tmp_path: Path) -> None:
    check_concurrent_reservations(f"sqlite:///{tmp_path / 'am.db'}")


def test_replayed_txn_finds_its_session(tmp_path: Path) -> None:
    engine = D.am_engine(f"sqlite:///{tmp_path / 'am.db'}")
    try:
        add_customer(engine, "zoe", b"\x01" * 32, "EUR", 1_000)
        data = initiation("zoe", 400)
        first = reserve(engine, "am1", data, "d" * 64, "p1", 2**40, 10, 1)
        again = reserve(engine, "am1", data, "d" * 64, "p2", 2**40, 10, 1)
        assert again == {"state": "replay", "session": first["session"], "was": D.INITIATING}
        with engine.connect() as conn:
            assert conn.execute(select(D.am_customers.c.reserved)).scalar_one() == 400
    finally:
        engine.dispose()


def test_open_sessions_per_customer_bounded(tmp_path: Path) -> None:
    engine = D.am_engine(f"sqlite:///{tmp_path / 'am.db'}")
    try:
        add_customer(engine, "zoe", b"\x01" * 32, "EUR", 10_000)
        got = [reserve(engine, "am1", initiation("zoe", 1), "d" * 64, "p", 2**40, 3, 1)["state"]
               for _ in range(4)]
        assert got == [D.INITIATING] * 3 + ["limit"]
    finally:
        engine.dispose()
