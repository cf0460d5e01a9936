"""Trading sessions on PostgreSQL (a private test cluster): the account manager's credit check
stays one step with every call on its own thread, and a session opens, buys, terminates and
clears end to end with all four servers' databases there."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pg_env import Cluster, start_cluster
from test_trade_books import check_concurrent_reservations

from svcard.host.kit.db import first_row
from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade import records
from svcard.host.trade.stack import start_trade


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    yield c
    c.stop()


def test_concurrent_reservations_postgresql(cluster: Cluster) -> None:
    check_concurrent_reservations(cluster.new_database(), threads=50)


def test_session_end_to_end_on_postgresql(cluster: Cluster, tmp_path: Path) -> None:
    urls = {pid: cluster.new_database() for pid in ("am1", "acq1", "shop", "mam1")}
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
        # FIG. 3 on PostgreSQL: the records compared, cleared once, the reservation released
        s.account_url = stack.am.url
        with httpx.Client(timeout=60) as http:
            c = C.close(http, s)["clearing"]
            assert (c["outcome"], c["paid"]) == ("agreed", 3)
            assert C.close(http, s)["taken"] == "same"
        deadline = time.monotonic() + 30
        while not (first_row(stack.acquirer.engine, D.acq_clearings, session=s.session)
                   or {}).get("mam_done"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        row = first_row(stack.account.engine, D.am_customers, id="ann")
        assert row is not None and row["reserved"] == 0
        assert records.books([stack.acquirer.engine], [stack.account.engine],
                             [stack.merchant_account.engine]).problems == []
    finally:
        stack.close()
