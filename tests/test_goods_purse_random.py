"""Goods paid by the purse, at random (issue 12, point 2(a)): purchases through the five
servers on loopback with the card pulled before the record, at the record, after the DEBIT
(answer lost), the proof lost, or the power cut at a random write of the card's DEBIT; then a
retry or the card's next contact (pick-up), in random order. At the end, for every card: its
purse paid exactly the orders the servers hold paid, it holds exactly their goods, each once,
and no order has two committed purchases.

``SVCARD_GOODS_PURSE_RUNS`` purchases (default 12), ``SVCARD_GOODS_PURSE_SEED`` (default: a
fresh one, printed; replay with it)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from sqlalchemy import select
from test_goods_purse import ep, first_for, goods_on
from test_goods_purse_attack import ArmAtDebit, Tear

from svcard.card.image import open_card
from svcard.card.storage import PowerCut
from svcard.host.goods import db as D
from svcard.host.goods.device import Device, DeviceError
from svcard.host.goods.stack import GoodsStack, make_card, start_goods
from svcard.host.kit.db import reading
from svcard.host.terminal.reader_specs import open_reader
from svcard.reader.base import CardRemovedError, Reader
from svcard.reader.virtual import VirtualReader

RUNS = int(os.environ.get("SVCARD_GOODS_PURSE_RUNS", "12"))
SEED = int(os.environ.get("SVCARD_GOODS_PURSE_SEED", str(random.SystemRandom().randrange(10**9))))
PRICES = {"ticket": 1250, "coupon": 100, "airtime": 5000, "rides10": 2000}
FAULTS = ("none", "before-record", "at-record", "after-debit", "proof-lost", "tear")
BIG = 1_000_000


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[GoodsStack]:
    s = start_goods(tmp_path / "servers")
    try:
        yield s
    finally:
        s.close()


class Cut:
    """The card pulled at the first APDU starting with ``at`` (``after``: the card took it)."""

    def __init__(self, inner: Reader, at: bytes, after: bool) -> None:
        self.inner, self.at, self.after = inner, at, after

    def exchange(self, apdu: bytes) -> Any:
        if apdu.startswith(self.at):
            if self.after:
                self.inner.exchange(apdu)
            raise CardRemovedError("the card was pulled")
        return self.inner.exchange(apdu)


class NoProof(Device):
    def _prove(self, serial: str, counter: int, mac2: bytes, tac: bytes) -> dict[str, Any]:
        raise DeviceError("the link was cut before the proof")


def attempt(rng: random.Random, device: Device, first: Any, path: Path) -> None:
    fault = rng.choice(FAULTS)
    if fault == "tear":
        card = open_card(path, tear=(tear := Tear(rng.randrange(8))))
        reader = VirtualReader(card)
        try:
            reader.connect()
            device.pay_with_purse(cast(Reader, ArmAtDebit(reader, tear)), first)
        except (PowerCut, DeviceError):
            pass
        finally:
            card.close()
        return
    with open_reader(f"virtual:{path}") as reader:
        try:
            if fault == "none":
                device.pay_with_purse(reader, first)
            elif fault == "proof-lost":
                NoProof(device.auth_url, device.auth_id, device.auth_public, device.key,
                        http=device.http).pay_with_purse(reader, first)
            else:
                at, after = {"before-record": (b"\x84\xde", False),
                             "at-record": (b"\x84\xde", True),
                             "after-debit": (b"\x80\x54", True)}[fault]
                device.pay_with_purse(cast(Reader, Cut(reader, at, after)), first)
        except (CardRemovedError, DeviceError):
            pass


def wide(card: Path) -> Path:
    """The card's goods files widened to 254 records: a long run never fills them (a full
    file refuses the record, 6A84, and that purchase is simply never paid)."""
    image = json.loads(card.read_text())
    for f in image["app"]["goods"]["files"]:
        f["records"] = 254
    card.write_text(json.dumps(image))
    return card


def test_random_purse_purchases_with_faults_keep_goods_and_money_together(
        stack: GoodsStack) -> None:
    print(f"SVCARD_GOODS_PURSE_RUNS={RUNS} SVCARD_GOODS_PURSE_SEED={SEED}")
    rng = random.Random(SEED)
    folder = stack.folder / "cards"
    cards = [(wide(make_card(folder, 75_001 + i, ep=BIG)), stack.device()) for i in range(3)]
    orders: dict[str, tuple[int, str]] = {}   # order -> (card index, sku)
    with httpx.Client(timeout=30) as client:
        for _ in range(RUNS):
            i = rng.randrange(len(cards))
            path, device = cards[i]
            sku = rng.choice(tuple(PRICES))
            first = first_for(stack, client, device, sku)
            orders[first.order] = (i, sku)
            attempt(rng, device, first, path)
            for _ in range(rng.randrange(3)):      # retries and next contacts, in any order
                if rng.random() < 0.5:
                    with open_reader(f"virtual:{path}") as reader:
                        device.pickup(reader)
                else:
                    attempt(rng, device, first, path)
            with open_reader(f"virtual:{path}") as reader:   # the card's next contact
                device.pickup(reader)
    with reading(stack.engine("payment")) as conn:
        paid = {r.order_ref for r in conn.execute(select(D.payment_orders.c.order_ref).where(
            D.payment_orders.c.state == D.PURSE_PAID))}
        committed = [r.order_ref for r in conn.execute(
            select(D.purse_sessions.c.order_ref).where(
                D.purse_sessions.c.state == D.COMMITTED))]
    assert sorted(committed) == sorted(paid), "an order with two committed purchases"
    for i, (path, _) in enumerate(cards):
        mine = {o for o, (c, _) in orders.items() if c == i and o in paid}
        assert ep(path) == BIG - sum(PRICES[orders[o][1]] for o in mine), (SEED, i)
        held = [bytes(g["good_id"]).hex() for g in goods_on(path)]   # type: ignore[arg-type]
        assert sorted(held) == sorted(o[:16] for o in mine), (SEED, i)
    with reading(stack.engine("fulfil")) as conn:
        written = {r.order_ref for r in conn.execute(select(D.purse_goods.c.order_ref).where(
            D.purse_goods.c.state == D.WRITTEN))}
    assert written == paid
    print(f"{len(orders)} orders, {len(paid)} paid by the purse, the rest never committed")
