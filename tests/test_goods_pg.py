"""The goods system with every party's database on PostgreSQL (a private test cluster), where
each database call runs on its own thread: a good bought end to end, racing authorisations
debit once, racing pick-ups hand out one write."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from pg_env import Cluster, start_cluster
from test_goods_attack import authorisation, offered, payments
from test_goods_flow import balance, buy, goods_on

from svcard.host.goods import wire as W
from svcard.host.goods.config import ROLES
from svcard.host.goods.device import Device, DeviceError
from svcard.host.goods.stack import GoodsStack, make_card, start_goods

SERIAL = 70_031


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    yield c
    c.stop()


@pytest.fixture
def stack(cluster: Cluster, tmp_path: Path) -> Iterator[GoodsStack]:
    s = start_goods(tmp_path / "servers", db_urls={r: cluster.new_database() for r in ROLES})
    s.account("acc1", SERIAL, balance=10_000)
    try:
        yield s
    finally:
        s.close()


def race(device: Device, path: str, domain: bytes, body: dict[str, Any]) -> list[Any]:
    def one(_: int) -> Any:
        with httpx.Client(timeout=30) as http:
            d = Device(device.auth_url, device.auth_id, device.auth_public, device.key,
                       http=http)
            try:
                return d._post(path, domain, body)
            except DeviceError as exc:
                return str(exc)

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(8)))


def test_goods_on_postgresql(stack: GoodsStack, tmp_path: Path) -> None:
    card = make_card(tmp_path, SERIAL)
    device = stack.device()
    with httpx.Client(timeout=30) as http:
        buy(stack, http, device, card)
    assert device.round_trips == 2 and len(goods_on(card)) == 1
    first = offered(stack, device, "coupon")
    answers = race(device, "/v1/authorisations", W.AUTHORISATION,
                   authorisation(device, first, f"{SERIAL:020d}", "0000000B"))
    assert sum(isinstance(a, dict) and a.get("apdu") is not None for a in answers) == 1
    assert balance(stack) == 10_000 - 1250 - 100 and payments(stack) == 2
    pickups = race(device, "/v1/pickups", W.PICKUP, {
        "device": device.id, "card": f"{SERIAL:020d}", "issuer": "1000000000000001",
        "challenge": "0000000C", "held": [], "created": int(time.time())})
    assert sum(isinstance(a, dict) and a.get("apdu") is not None for a in pickups) == 0
