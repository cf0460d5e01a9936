"""50 concurrent orders over a pool of 4 purses: every order paid once, no purse used twice at
once (the recorded lease intervals of each purse never overlap), also with two pools (two SP
processes) sharing one database and journal folder."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import test_sp_purses as base
from pg_env import Cluster, start_cluster
from sqlalchemy import Engine, MetaData
from test_sp_purses import (
    TICKET,
    image_app,
    merchant_paid,
    pool_config,
    purse_image,
)

from svcard.host.demo.system import System
from svcard.host.kit.db import make_engine
from svcard.host.sp.purses.db import PurseBook
from svcard.host.sp.purses.pool import PoolPaymentOutcome, PursePool

engine, sp_system = base.engine, base.sp_system   # the fixtures
ORDERS = 50
PURSES = 4


def assert_no_overlap(intervals: list[dict[str, Any]]) -> dict[str, int]:
    """Each purse's leases, in order of acquisition, each given back before the next taken;
    the number of leases per purse."""
    by_purse: dict[str, list[tuple[int, int]]] = {}
    for lease in intervals:
        assert lease["released_us"] is not None, lease
        by_purse.setdefault(lease["purse_serial"], []).append(
            (lease["acquired_us"], lease["released_us"]))
    for serial, spans in by_purse.items():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, f"purse {serial} leased twice at once"
    return {serial: len(spans) for serial, spans in by_purse.items()}


def run_orders(pools: list[PursePool], url: str, seed: int) -> list[PoolPaymentOutcome]:
    rng = random.Random(seed)
    print(f"seed {seed}")
    order_pools = [rng.choice(pools) for _ in range(ORDERS)]

    def one(i: int) -> PoolPaymentOutcome:
        with httpx.Client(timeout=60) as http:
            return order_pools[i].pay(url, http=http, order_ref=f"order-{i:03d}",
                                      amount=TICKET if i % 2 else None)

    with ThreadPoolExecutor(max_workers=16) as ex:
        return list(ex.map(one, range(ORDERS)))


def check_books(pool: PursePool, specs: list[str], outcomes: list[PoolPaymentOutcome],
                system: System) -> None:
    assert len({o.txn_id for o in outcomes}) == ORDERS
    rows = pool.book.all_payments()
    assert len(rows) == ORDERS and all(r["state"] == "paid" for r in rows)
    counts = assert_no_overlap(pool.book.lease_intervals())
    assert len(counts) == PURSES and sum(counts.values()) == ORDERS
    assert len(merchant_paid(system)) == ORDERS
    # each purse's debits are what its card lost; (serial, counter) pairs are unique
    for spec, status in zip(specs, pool.status(), strict=True):
        debits = sum(r["amount"] for r in rows if r["purse_serial"] == status["serial"])
        assert status["opening_balance"] - debits == status["balance"] == \
            image_app(spec)["ep"]["balance"]
    assert len({(r["purse_serial"], r["counter"]) for r in rows}) == ORDERS
    [books] = pool.books().values()
    assert books["opening"] + books["loaded"] == books["debits"] + books["balances"]
    assert books["debits"] == ORDERS * TICKET and books["open_payments"] == 0


def test_50_concurrent_orders_over_4_purses(sp_system: System, engine: Engine,
                                            tmp_path: Path) -> None:
    specs = [purse_image(tmp_path, i, ep=40_000) for i in range(1, PURSES + 1)]
    pool = PursePool.open(pool_config(sp_system, specs, lease_timeout=60.0), engine,
                          journal_dir=tmp_path / "j")
    outcomes = run_orders([pool], sp_system.pay.checkout_url("ticket"), 13)
    check_books(pool, specs, outcomes, sp_system)


def test_two_sp_processes_share_the_pool(sp_system: System, engine: Engine,
                                         tmp_path: Path) -> None:
    specs = [purse_image(tmp_path, i, ep=40_000) for i in range(1, PURSES + 1)]
    config = pool_config(sp_system, specs, lease_timeout=60.0)
    first = PursePool.open(config, engine, journal_dir=tmp_path / "j")
    other_engine = make_engine(str(engine.url), MetaData())   # the other process's own
    try:
        second = PursePool.open(config, other_engine, journal_dir=tmp_path / "j")
        assert first.owner != second.owner
        outcomes = run_orders([first, second], sp_system.pay.checkout_url("ticket"), 1301)
    finally:
        other_engine.dispose()
    check_books(first, specs, outcomes, sp_system)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    yield c
    c.stop()


def test_50_concurrent_orders_with_the_pool_on_postgresql(sp_system: System, cluster: Cluster,
                                                          tmp_path: Path) -> None:
    """The leases' compare-and-set on PostgreSQL, two pools (two processes) on one database."""
    specs = [purse_image(tmp_path, i, ep=40_000) for i in range(1, PURSES + 1)]
    config = pool_config(sp_system, specs, lease_timeout=60.0)
    url = cluster.new_database()
    engines = [make_engine(url, MetaData()) for _ in range(2)]
    try:
        pools = [PursePool.open(config, e, journal_dir=tmp_path / "j") for e in engines]
        outcomes = run_orders(pools, sp_system.pay.checkout_url("ticket"), 2026)
        check_books(pools[0], specs, outcomes, sp_system)
    finally:
        for e in engines:
            e.dispose()


def test_an_expired_lease_is_taken_over_and_its_holder_locked_out(engine: Engine) -> None:
    """The lease is the row's compare-and-set: a held lease refuses a second taker; once it
    expires another takes it, and the first holder can neither renew nor give it back."""
    book = PurseBook(engine)
    book.register("00000000000000000001", "virtual:x.json", currency_code=156, balance=0,
                  limit=100_000, offline_counter=0, online_counter=0)
    [row] = book.candidates()
    first = book.lease(row, "host:1:a", "o1", ttl_ms=60_000)
    assert first is not None and book.lease(row, "host:2:b", "o2", ttl_ms=60_000) is None
    assert book.renew(row["serial"], "host:1:a", 1)   # now expiring within a millisecond
    deadline = time.monotonic() + 10
    second = None
    while second is None:
        assert time.monotonic() < deadline, "the expired lease was never taken over"
        second = book.lease(row, "host:2:b", "o2", ttl_ms=60_000)
    assert not book.renew(row["serial"], "host:1:a", 60_000)
    assert not book.release(row["serial"], "host:1:a", first, balance=999)
    assert book.purse(row["serial"])["lease_owner"] == "host:2:b"    # type: ignore[index]
    assert book.purse(row["serial"])["balance"] == 0                 # type: ignore[index]
    assert book.release(row["serial"], "host:2:b", second)
