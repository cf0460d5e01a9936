"""Seed 000, the purse pays (issue 12, point 2(a)): the fulfilment server's MAC'd record and
the PSAM's debit are ONE composite purchase (type 09) on the card, relayed by the device; the
order is paid only on the card's MAC2 matching the PSAM's; a purchase whose answer was lost
is settled from the card's proof at its next contact; nothing committed, nothing refunded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from svcard.card.storage import read_image
from svcard.host.goods import db as D
from svcard.host.goods.device import Device, FirstMessage
from svcard.host.goods.stack import GoodsStack, make_card, start_goods
from svcard.host.kit.db import first_row
from svcard.host.terminal.capp import read_goods
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import goods as G
from svcard.protocols import purse as P

SERIAL = 71_001
EP = 10_000


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[GoodsStack]:
    s = start_goods(tmp_path / "servers")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def ep(card: Path) -> int:
    return int(read_image(card)["app"]["ep"]["balance"])


def goods_on(card: Path) -> list[dict[str, object]]:
    with open_reader(f"virtual:{card}") as reader:
        return [G.parse(e.record) for e in read_goods(reader)]


def row(stack: GoodsStack, role: str, table: object, order: str) -> dict[str, object]:
    found = first_row(stack.engine(role), table, order_ref=order)
    assert found is not None
    return dict(found)


def first_for(stack: GoodsStack, http: httpx.Client, device: Device,
              sku: str = "ticket") -> FirstMessage:
    answer = stack.order(http, sku, device)
    assert answer.status_code == 200, answer.text
    order = answer.json()["order"]
    firsts = device.poll(wait=5)
    assert [f.order for f in firsts] == [order]
    return firsts[0]


def test_an_e_ticket_paid_by_the_purse_lands_with_its_debit(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    card = make_card(tmp_path, SERIAL, ep=EP)
    device = stack.device()
    first = first_for(stack, http, device)
    assert first.fields["terminal"]
    with open_reader(f"virtual:{card}") as reader:
        out = device.pay_with_purse(reader, first)
    assert out.paid and out.written, out
    assert device.round_trips == 2
    assert ep(card) == EP - 1250
    [good] = goods_on(card)
    assert good["kind"] == "ticket" and good["good_id"] == bytes.fromhex(first.order)[:8]
    with open_reader(f"virtual:{card}") as reader:
        from svcard.host.terminal.purse import read_log
        assert read_log(reader)[0].txn_type == P.TYPE_COMPOSITE_PURCHASE
    assert row(stack, "payment", D.payment_orders, first.order)["state"] == D.PURSE_PAID
    assert row(stack, "fulfil", D.purse_goods, first.order)["state"] == D.WRITTEN
    assert row(stack, "merchant", D.merchant_orders, first.order)["state"] == D.PURSE_PAID
    assert first_row(stack.engine("fulfil"), D.goods, order_ref=first.order) is None
