"""The SP's books on PostgreSQL (a private test cluster): the billability check and credit
reservation stay one step when every database call runs on its own thread, and an order is
paid, billed and logged end to end with the SP database (the purse pool's tables too) there."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pg_env import Cluster, start_cluster
from test_sp_books import check_concurrent_admissions, check_concurrent_replays

from svcard.host.demo.system import start_system
from svcard.host.sp import records
from svcard.host.sp.purses.pool import PursePoolConfig
from svcard.host.sp.stack import demo_config, purse_images, start_sp


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    yield c
    c.stop()


def test_concurrent_admissions_postgresql(cluster: Cluster) -> None:
    check_concurrent_admissions(cluster.new_database(), threads=24)


def test_concurrent_replays_postgresql(cluster: Cluster) -> None:
    check_concurrent_replays(cluster.new_database(), threads=16)


def test_order_billed_end_to_end_on_postgresql(cluster: Cluster, tmp_path: Path) -> None:
    system = start_system(tmp_path / "sys")
    try:
        system.load.account("sp-bank", 100_000, "sp-pw")
        purses = purse_images(tmp_path / "purses", 2, ep=20_000)
        url = cluster.new_database()
        config = demo_config(tmp_path / "sp", system.pay.merchant.url, db_url=url,
                             purses=PursePoolConfig(
                                 readers=[f"virtual:{p}" for p in purses],
                                 bank_url=system.load.bank_url, account="sp-bank",
                                 secret="sp-pw", currency_code=156))
        sp = start_sp(config)
        try:
            alice = sp.customer("alice", credit_limit=250)
            with httpx.Client(timeout=60) as http:
                answers = [sp.order(http, alice, "song") for _ in range(3)]
            assert [a.status_code for a in answers] == [200, 200, 402]
            assert [ln["billed"] for ln in records.bill_lines(url)] == [115, 115]
            assert [e["event"] for e in records.order_log(url)].count("billed") == 2
        finally:
            sp.close()
    finally:
        system.close()
