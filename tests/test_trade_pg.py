"""Trading sessions on PostgreSQL (a private test cluster): the account manager's credit check
stays one step with every call on its own thread, and a session opens, buys and terminates end
to end with all three servers' databases there."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pg_env import Cluster, start_cluster
from test_trade_books import check_concurrent_reservations

from svcard.host.kit.db import first_row
from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade.stack import start_trade


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    yield c
    c.stop()


def test_concurrent_reservations_postgresql(cluster: Cluster) -> None:
    check_concurrent_reservations(cluster.new_database(), threads=50)


def test_session_end_to_end_on_postgresql(cluster: Cluster, tmp_path: Path) -> None:
    urls = {pid: cluster.new_database() for pid in ("am1", "acq1", "shop")}
    stack = start_trade(tmp_path / "t", db_urls=urls)
    try:
        ann = stack.customer("ann", 5_00)
        with httpx.Client(timeout=60) as http:
            s = stack.open(http, ann, 4_00)
            assert C.buy(http, s, "song", 3)["index"] == 3
            assert C.terminate(http, s)["state"] == D.TERMINATED
            with pytest.raises(C.TradeError, match="402"):
                stack.open(http, ann, 2_00)          # 4.00 reserved of 5.00
        row = first_row(stack.account.engine, D.am_customers, id="ann")
        assert row is not None and row["reserved"] == 4_00
    finally:
        stack.close()
