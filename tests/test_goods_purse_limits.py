"""Rate limits of the goods servers (issue 12's known limits, docs/goods.md): the merchant
takes at most ``orders_per_device`` orders naming one device a minute, the authentication
server at most ``registrations_per_address`` new devices from one client address a minute;
each check and count is one database step, and a refused request changes nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from svcard.host.goods import db as D
from svcard.host.goods import wire as W
from svcard.host.goods.device import DeviceError
from svcard.host.goods.stack import GoodsStack, start_goods
from svcard.host.kit.db import reading


@pytest.fixture
def offset() -> list[float]:
    return [0.0]


@pytest.fixture
def stack(tmp_path: Path, offset: list[float]) -> Iterator[GoodsStack]:
    s = start_goods(tmp_path / "servers", clock=lambda: time.time() + offset[0], psams=0,
                    orders_per_device=3, registrations_per_address=2)
    try:
        yield s
    finally:
        s.close()


def count(stack: GoodsStack, role: str, table: object) -> int:
    with reading(stack.engine(role)) as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]


def test_orders_naming_one_device_are_limited_per_minute(
        stack: GoodsStack, offset: list[float]) -> None:
    device = stack.device()
    with httpx.Client(timeout=30) as http:
        codes = [stack.order(http, "coupon", device).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        assert count(stack, "merchant", D.merchant_orders) == 3
        assert stack.order(http, "coupon", "0" * 32).status_code == 409   # another device
        offset[0] += 61
        assert stack.order(http, "coupon", device).status_code == 200
    assert count(stack, "merchant", D.merchant_orders) == 5


def test_new_devices_from_one_address_are_limited_per_minute(
        stack: GoodsStack, offset: list[float]) -> None:
    first = stack.device()
    stack.device()                                      # the quota's second
    first.register()                                    # the same key again: not counted
    with pytest.raises(DeviceError, match="429"):
        stack.device(W.new_key())
    assert count(stack, "auth", D.devices) == 2
    offset[0] += 61
    stack.device()
    assert count(stack, "auth", D.devices) == 3
