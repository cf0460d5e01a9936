"""Issue 12's randomised run (seed 000): goods bought through the five goods servers as
processes, with SIGKILLs of the fulfilment, authentication and payment servers, card tears at
random steps of the card's writes, cards pulled, device links cut, declines, wrong PINs and
pick-ups that expire into refunds (tests/goods_sim.py), each good paid from a bank account
(the secure write) or by the card's purse (the composite purchase); then every card's next
contact and the goods audit (``svcard audit --goods-db ...``, and the cards' goods read):
0 goods without payment, 0 payments without a good or a refund, no good twice on a card,
every account, every purse and the books to the minor unit.

``SVCARD_GOODS_SIM_RUNS`` goods (default 24), ``SVCARD_GOODS_SIM_KILLS`` kills (default 3),
``SVCARD_GOODS_SIM_PURSE`` (default 1; 0: the bank pays every good, and the command-line
audit also reads every ``--card``), ``SVCARD_GOODS_SIM_SETTLE_FIRST`` (default 0: the device's own
proof of the card's last purse purchase before the next, since ef9f12d; 1: the run's too),
``SVCARD_GOODS_SIM_DEVICES`` device threads (default 2), ``SVCARD_GOODS_SIM_PICKUP`` the
pick-up deadline in s (default 20), ``SVCARD_GOODS_SIM_SEED`` (default 20261123); the seed is
printed, and each good's fate and each kill's moment replay from it (the pytest options
``--goods-sim-runs`` ... set the same)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import goods_sim as S
import httpx
import pytest
from test_capp import CappHost
from test_goods_processes import run

from svcard.card.image import open_card
from svcard.card.storage import read_image
from svcard.host.goods import db as D
from svcard.host.goods.config import ROLES
from svcard.host.goods.stack import make_card, start_goods
from svcard.host.kit.db import first_row
from svcard.host.settle.audit import audit
from svcard.host.settle.goods_books import card_goods
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import purse as P
from svcard.reader.base import CardRemovedError, Reader

RUNS = int(os.environ.get("SVCARD_GOODS_SIM_RUNS", "24"))
KILLS = int(os.environ.get("SVCARD_GOODS_SIM_KILLS", "3"))
DEVICES = int(os.environ.get("SVCARD_GOODS_SIM_DEVICES", "2"))
PICKUP = int(os.environ.get("SVCARD_GOODS_SIM_PICKUP", "20"))
SEED = int(os.environ.get("SVCARD_GOODS_SIM_SEED", "20261123"))
PURSE = os.environ.get("SVCARD_GOODS_SIM_PURSE", "1") != "0"
SETTLE_FIRST = os.environ.get("SVCARD_GOODS_SIM_SETTLE_FIRST", "0") != "0"


@pytest.fixture
def system(tmp_path: Path) -> Iterator[S.System]:
    s = S.System(tmp_path, PICKUP, purse=PURSE, settle_first=SETTLE_FIRST)
    try:
        s.start()
        yield s
    finally:
        s.stop()


def test_random_goods_with_kills_tears_and_cuts_end_in_a_clean_goods_audit(
        system: S.System) -> None:
    print(f"\ngoods randomised run: SVCARD_GOODS_SIM_RUNS={RUNS} SVCARD_GOODS_SIM_KILLS={KILLS} "
          f"SVCARD_GOODS_SIM_DEVICES={DEVICES} SVCARD_GOODS_SIM_PICKUP={PICKUP} "
          f"SVCARD_GOODS_SIM_PURSE={int(PURSE)} SVCARD_GOODS_SIM_SEED={SEED}")
    began = time.monotonic()
    figures = S.Figures()
    buyers = S.buy_goods(system, SEED, RUNS, KILLS, DEVICES, figures)
    bought = time.monotonic()
    S.settle(system, buyers, SEED, figures)
    found = S.check(system)
    args = ["audit"]
    for role in ROLES:
        args += ["--goods-db", system.db(role)]
    if not PURSE:   # the purse's debits are not yet purchases to svcard audit's card check
        for path in system.cards.values():
            args += ["--card", str(path)]
    out = run(*args, check=False)
    assert out.returncode == 0 and "clean" in out.stdout, out.stdout + out.stderr
    on_cards: dict[str, list[bytes]] = {}
    for path in system.cards.values():
        with S.card_at(path) as reader:
            on_cards.update(card_goods([reader], P.DEFAULT_IEP_AID))
    report = audit({}, goods_dbs=tuple(system.db(r) for r in ROLES), card_goods=on_cards)
    assert report.clean and report.goods_pending == [], report.discrepancies
    f = {k.removeprefix("goods 156: "): v for k, v in report.figures.items()}
    assert f["goods open"] == 0 and f["paid, in transit"] == 0
    assert f["bank debits"] == found["debited"] == f["goods written"] + f["goods refunded"]
    assert f["goods written"] == found["kept"]
    assert f["purse debits"] == f["purse goods written"] == found["purse debited"]
    print(f"  fates: {dict(sorted(figures.fates.items()))}; to pay: {dict(figures.ways)}")
    print(f"  events: {dict(sorted(figures.events.items()))}")
    print(f"  kills: {len(figures.kills)} {dict(sorted(_count(figures.kills).items()))}")
    print(f"  books: {found}; audit: debits {f['bank debits']} = written "
          f"{f['goods written']} + refunded {f['goods refunded']}")
    print(f"  wall: {bought - began:.1f} s buying, {time.monotonic() - bought:.1f} s "
          "settling and auditing")
    assert len(figures.kills) == KILLS
    assert sum(figures.fates.values()) == sum(figures.ways.values()) == RUNS


def _count(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def test_a_lost_debit_answer_followed_by_another_purse_purchase_is_still_settled(
        tmp_path: Path) -> None:
    """Found by the randomised run's purse path: the card pulled after DEBIT FOR CAPP PURCHASE
    (the card committed the good and the debit, the device never saw the answer), then the
    next good on the same card paid by the purse before the card's pick-up."""
    stack = start_goods(tmp_path / "servers")
    try:
        card = make_card(tmp_path, 70_401, ep=50_000)
        device = stack.device()
        with httpx.Client(timeout=30) as http:
            firsts = []
            for sku in ("ticket", "coupon"):
                assert stack.order(http, sku, device).status_code == 200
                firsts += [f for f in device.poll(wait=5) if f not in firsts]
        lost, second = firsts
        with open_reader(f"virtual:{card}") as reader, pytest.raises(CardRemovedError):
            device.pay_with_purse(cast(Reader, S.CutAt(reader, S.CAPP_DEBIT, after=True)),
                                  lost)
        with open_reader(f"virtual:{card}") as reader:
            assert device.pay_with_purse(reader, second).written
            device.pickup(reader)
        assert int(read_image(card)["app"]["ep"]["balance"]) == 50_000 - 1250 - 100
        found = first_row(stack.engine("payment"), D.payment_orders, order_ref=lost.order)
        assert found is not None and found["state"] == D.PURSE_PAID, found
    finally:
        stack.close()


def test_a_purse_purchase_after_another_terminals_composite_purchase(tmp_path: Path) -> None:
    """A validator's composite purchase (type 09, another terminal) is the card's last
    transaction; the device's proof of it is refused (nobody's order): the purse still pays."""
    stack = start_goods(tmp_path / "servers")
    try:
        serial = 70_402
        card = make_card(tmp_path, serial, ep=50_000)
        opened = open_card(card)
        try:
            host = CappHost(opened, serial=bytes.fromhex(f"{serial:020d}")[-8:])
            host.select()
            host.capp(400, [])
        finally:
            opened.close()
        device = stack.device()
        with httpx.Client(timeout=30) as http:
            assert stack.order(http, "ticket", device).status_code == 200
        [first] = device.poll(wait=5)
        with open_reader(f"virtual:{card}") as reader:
            assert device.pay_with_purse(reader, first).written
        assert int(read_image(card)["app"]["ep"]["balance"]) == 50_000 - 400 - 1250
    finally:
        stack.close()
