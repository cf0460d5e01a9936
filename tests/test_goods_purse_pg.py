"""The purse-paid goods path with every party's database on PostgreSQL (a private test
cluster; each database call on its own thread): a ticket paid by the purse end to end, eight
racing copies of one session's debit open it once, eight racing proofs pay the order once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pg_env import Cluster, start_cluster
from test_goods_pg import race
from test_goods_purse import EP, counter_of, debit_message, ep, first_for, goods_on, init_capp
from test_goods_purse_attack import sessions

from svcard.host.goods import db as D
from svcard.host.goods import wire as W
from svcard.host.goods.config import ROLES
from svcard.host.goods.stack import GoodsStack, make_card, start_goods
from svcard.host.kit.db import first_row
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import purse as P

SERIAL = 74_001


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    yield c
    c.stop()


@pytest.fixture
def stack(cluster: Cluster, tmp_path: Path) -> Iterator[GoodsStack]:
    s = start_goods(tmp_path / "servers", db_urls={r: cluster.new_database() for r in ROLES})
    try:
        yield s
    finally:
        s.close()


def test_the_purse_pays_on_postgresql_and_races_change_nothing_twice(
        stack: GoodsStack, tmp_path: Path) -> None:
    card = make_card(tmp_path, SERIAL, ep=EP)
    serial = f"{SERIAL:020d}"
    device = stack.device()
    with httpx.Client(timeout=30) as http:
        first = first_for(stack, http, device)
        with open_reader(f"virtual:{card}") as reader:
            assert device.pay_with_purse(reader, first).written
        second = first_for(stack, http, device, "coupon")
    with open_reader(f"virtual:{card}") as reader:
        init = init_capp(reader, second)
        answers = race(device, "/v1/purse/debits", W.PURSE_DEBIT,
                       debit_message(device, second, serial, init))
        opened = [a for a in answers if isinstance(a, dict)]
        assert len(opened) == 1 and sessions(stack, second.order) == 1, answers
        assert reader.exchange(bytes.fromhex(opened[0]["cache"])).sw == 0x9000
        done = reader.exchange(bytes.fromhex(opened[0]["debit"]))
    proof = P.DebitForPurchaseAnswer.parse(done.data)
    paid = race(device, "/v1/purse/proofs", W.PURSE_PROOF, {
        "device": device.id, "card": serial, "counter": counter_of(init),
        "mac2": proof.mac2.hex().upper(), "tac": proof.tac.hex().upper(),
        "created": int(time.time())})
    assert all(isinstance(a, dict) and a["order"] == second.order for a in paid), paid
    row = first_row(stack.engine("payment"), D.payment_orders, order_ref=second.order)
    assert row is not None and row["state"] == D.PURSE_PAID
    good = first_row(stack.engine("fulfil"), D.purse_goods, order_ref=second.order)
    assert good is not None and good["state"] == D.WRITTEN
    assert ep(card) == EP - 1250 - 100 and len(goods_on(card)) == 2
