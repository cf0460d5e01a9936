"""FIG. 4's fair exchange on PostgreSQL (a private test cluster): a product ordered without its
link and an ordinary purchase of an earlier link, raced in one session, are never both taken
(the pending product bumps the session row the ordinary purchase's compare-and-set names).
Both taken, the later link would have paid the product before its K2 was released and the
merchant's list would have held more than its link proves. ``SVCARD_TRADE_FAIR_RACES``
rounds (default 8)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pg_env import Cluster, start_cluster

from svcard.host.trade import customer as C
from svcard.host.trade import signing as S
from svcard.host.trade.payword import link_at, order_payload
from svcard.host.trade.stack import start_trade


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    yield c
    c.stop()


def message(s: C.Session, index: int, item: str, units: int, paid: bool) -> dict[str, object]:
    order = order_payload(s.session, index, item, units)
    return {"session": s.session, "index": index, "order": order,
            "link": link_at(s.seed, s.length, index).hex() if paid else "",
            "signature": S.sign(s.session_key, S.ORDER, S.canonical(order))}


def race(url: str, bodies: list[dict[str, object]]) -> list[int]:
    """Both bodies posted at once (a barrier); their status codes."""
    codes = [0] * len(bodies)
    go = threading.Barrier(len(bodies))

    def send(i: int) -> None:
        with httpx.Client(timeout=60) as c:
            go.wait()
            codes[i] = c.post(url, json=bodies[i]).status_code
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return codes


def test_a_pending_product_and_an_earlier_link_raced(cluster: Cluster,
                                                     tmp_path: Path) -> None:
    urls = {pid: cluster.new_database() for pid in ("am1", "acq1", "shop", "mam1")}
    stack = start_trade(tmp_path / "t", db_urls=urls)
    (tmp_path / "song.bin").write_bytes(b"song" * 100)
    stack.merchants["shop"].config.products = {"song": (tmp_path / "song.bin", "A song")}
    both = 0
    try:
        with httpx.Client(timeout=60) as http:
            who = stack.customer("ann", 1_000_00)
            for _ in range(int(os.environ.get("SVCARD_TRADE_FAIR_RACES", "8"))):
                s = stack.open(http, who, 1_00, unit=1)
                url = f"{s.merchant_url}/v1/sessions/{s.session}/purchases"
                codes = race(url, [message(s, 2, "song", 2, False),
                                   message(s, 1, "tea", 1, True)])
                assert sorted(codes) == [200, 409] or codes == [200, 200], codes
                both += codes == [200, 200]
    finally:
        stack.close()
    assert both == 0, f"{both} rounds took both"
