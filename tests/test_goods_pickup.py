"""Seed 000 pick-up and refund: a good paid for but not on the card stays at the fulfilment
server; the card's next contact writes it (never a second record); past its deadline a good no
write was ever handed out for is refunded to the account, once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from test_goods_flow import balance, goods_on, state

from svcard.card.image import open_card
from svcard.card.storage import WRITE_STEPS, PowerCut
from svcard.host.goods import db as D
from svcard.host.goods import wire as W
from svcard.host.goods.device import Device, DeviceError
from svcard.host.goods.stack import GoodsStack, make_card, start_goods
from svcard.host.kit.db import first_row
from svcard.host.kit.serving import ServerThread
from svcard.host.terminal.reader_specs import open_reader
from svcard.reader.base import CardRemovedError, Reader
from svcard.reader.virtual import VirtualReader

SERIAL = 70_002
DAY_MS = 86_400_000


class LinkCut:
    """A reader whose link fails at the goods write: ``after`` True, the card took the write
    and its answer was lost; False, the write never reached the card."""

    def __init__(self, inner: Reader, after: bool) -> None:
        self.inner, self.after = inner, after

    def exchange(self, apdu: bytes) -> Any:
        if apdu[:2] == b"\x04\xdc":
            if self.after:
                self.inner.exchange(apdu)
            raise CardRemovedError("the card was pulled")
        return self.inner.exchange(apdu)


@pytest.fixture
def offset() -> list[float]:
    return [0.0]


@pytest.fixture
def stack(tmp_path: Path, offset: list[float]) -> Iterator[GoodsStack]:
    s = start_goods(tmp_path / "servers", clock=lambda: time.time() + offset[0])
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def card(tmp_path: Path, stack: GoodsStack) -> Path:
    stack.account("acc1", SERIAL, balance=10_000)
    return make_card(tmp_path, SERIAL)


def ordered(stack: GoodsStack, device: Device, sku: str = "ticket") -> Any:
    with httpx.Client() as http:
        assert stack.order(http, sku, device).status_code == 200
    [first] = device.poll(wait=5)
    return first


def good_row(stack: GoodsStack, order: str) -> dict[str, Any]:
    row = first_row(stack.engine("fulfil"), D.goods, order_ref=order)
    assert row is not None
    return row


def pickup(device: Device, card: Path) -> list[Any]:
    with open_reader(f"virtual:{card}") as reader:
        return device.pickup(reader)


def paid_while_fulfilment_was_down(stack: GoodsStack, device: Device, card: Path) -> str:
    first = ordered(stack, device)
    stack.threads["fulfil"].stop()
    with open_reader(f"virtual:{card}") as reader, pytest.raises(DeviceError, match="502"):
        device.authorise(reader, first, "123456")
    assert state(stack, "payment", first.order) == "paid"
    assert first_row(stack.engine("fulfil"), D.goods, order_ref=first.order) is None
    port = stack.threads["fulfil"].port
    stack.threads["fulfil"] = ServerThread(stack.servers["fulfil"].app(), port=port).start()
    stack.restart("payment")   # its recovery tells the fulfilment server now
    assert good_row(stack, first.order)["state"] == "pending"
    return first.order


def test_answer_lost_after_the_card_wrote_is_completed_without_a_second_write(
        stack: GoodsStack, card: Path) -> None:
    device = stack.device()
    first = ordered(stack, device)
    with open_reader(f"virtual:{card}") as reader, pytest.raises(CardRemovedError):
        device.authorise(cast(Reader, LinkCut(reader, after=True)), first, "123456")
    assert good_row(stack, first.order)["state"] == "issued"
    assert pickup(device, card) == []              # the card holds it: marked, not written
    row = good_row(stack, first.order)
    assert row["state"] == "written" and row["writes"] == 1
    assert len(goods_on(card)) == 1 and balance(stack) == 10_000 - 1250


def test_a_write_that_never_reached_the_card_is_handed_out_again_after_the_lease(
        stack: GoodsStack, card: Path, offset: list[float]) -> None:
    device = stack.device()
    first = ordered(stack, device)
    with open_reader(f"virtual:{card}") as reader, pytest.raises(CardRemovedError):
        device.authorise(cast(Reader, LinkCut(reader, after=False)), first, "123456")
    assert pickup(device, card) == []              # within the lease: no second write out
    assert good_row(stack, first.order)["writes"] == 1 and goods_on(card) == []
    offset[0] = stack.system.issue_lease + 1
    [out] = pickup(device, card)
    assert out.written and out.order == first.order
    row = good_row(stack, first.order)
    assert row["state"] == "written" and row["writes"] == 2
    assert len(goods_on(card)) == 1
    assert pickup(device, card) == []               # written: never again


def test_a_good_paid_while_the_fulfilment_server_was_down_is_picked_up(
        stack: GoodsStack, card: Path) -> None:
    device = stack.device()
    order = paid_while_fulfilment_was_down(stack, device, card)
    [out] = pickup(device, card)
    assert out.written and out.order == order
    assert good_row(stack, order)["state"] == "written" and len(goods_on(card)) == 1


def test_a_pending_good_past_its_deadline_is_refunded_once(stack: GoodsStack,
                                                            card: Path) -> None:
    device = stack.device()
    order = paid_while_fulfilment_was_down(stack, device, card)
    assert balance(stack) == 10_000 - 1250
    fulfil = stack.fulfil
    assert asyncio.run(fulfil.refund_due()) == 0                 # not yet due
    later = fulfil.now_ms() + 8 * DAY_MS
    assert asyncio.run(fulfil.refund_due(at_ms=later)) == 1
    assert asyncio.run(fulfil.refund_due(at_ms=later)) == 0
    assert balance(stack) == 10_000
    for role in ("fulfil", "payment", "merchant"):
        assert state(stack, role, order) == "refunded", role
    bank = first_row(stack.engine("bank"), D.bank_payments, order_ref=order)
    assert bank is not None and bank["state"] == "refunded"
    assert pickup(device, card) == [] and goods_on(card) == []   # refunded: never written


def test_an_issued_good_is_never_refunded(stack: GoodsStack, card: Path) -> None:
    device = stack.device()
    first = ordered(stack, device)
    with open_reader(f"virtual:{card}") as reader, pytest.raises(CardRemovedError):
        device.authorise(cast(Reader, LinkCut(reader, after=True)), first, "123456")
    later = stack.fulfil.now_ms() + 30 * DAY_MS
    assert asyncio.run(stack.fulfil.refund_due(at_ms=later)) == 0
    assert good_row(stack, first.order)["state"] == "issued"
    assert balance(stack) == 10_000 - 1250


def test_racing_pickups_hand_out_one_write(stack: GoodsStack, card: Path) -> None:
    device = stack.device()
    order = paid_while_fulfilment_was_down(stack, device, card)
    serial = f"{SERIAL:020d}"

    def one(n: int) -> Any:
        with httpx.Client(timeout=30) as http:
            d = Device(device.auth_url, device.auth_id, device.auth_public, device.key,
                       http=http)
            return d._post("/v1/pickups", W.PICKUP, {
                "device": d.id, "card": serial, "issuer": "1000000000000001",
                "challenge": f"{n:08X}", "held": [], "created": int(time.time())})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert sum(a["apdu"] is not None for a in answers) == 1
    assert good_row(stack, order)["writes"] == 1


def test_a_merchant_that_was_down_is_told_at_the_payment_servers_recovery(
        stack: GoodsStack, card: Path) -> None:
    device = stack.device()
    first = ordered(stack, device)
    stack.threads["merchant"].stop()
    with open_reader(f"virtual:{card}") as reader:
        assert device.authorise(reader, first, "123456").written
    port = stack.threads["merchant"].port
    stack.threads["merchant"] = ServerThread(stack.servers["merchant"].app(), port=port).start()
    assert state(stack, "merchant", first.order) == "routed"
    stack.restart("payment")
    assert state(stack, "merchant", first.order) == "paid"


class Tear:
    """Cuts the power at the card image's write step ``cut_at`` once armed."""

    def __init__(self, cut_at: int) -> None:
        self.cut_at, self.armed, self.steps = cut_at, False, 0

    def __call__(self, step: str) -> None:
        if self.armed:
            self.steps += 1
            if self.steps - 1 == self.cut_at:
                raise PowerCut(step)


class ArmAtWrite:
    def __init__(self, inner: Reader, tear: Tear) -> None:
        self.inner, self.tear = inner, tear

    def exchange(self, apdu: bytes) -> Any:
        if apdu[:2] == b"\x04\xdc":
            self.tear.armed = True
        return self.inner.exchange(apdu)


def test_a_power_cut_at_every_step_of_the_cards_write_is_completed_once(
        stack: GoodsStack, tmp_path: Path, offset: list[float]) -> None:
    device = stack.device()
    landed = set()
    for cut in range(len(WRITE_STEPS)):
        serial = SERIAL + 100 + cut
        path = make_card(tmp_path / f"cut{cut}", serial)
        stack.account(f"cut{cut}", serial, balance=10_000)
        first = ordered(stack, device)
        tear = Tear(cut)
        card = open_card(path, tear=tear)
        reader = VirtualReader(card)
        try:
            reader.connect()
            with pytest.raises(PowerCut):
                device.authorise(cast(Reader, ArmAtWrite(reader, tear)), first, "123456")
        finally:
            card.close()
        on_card = goods_on(path)
        landed.add(len(on_card))
        assert len(on_card) in (0, 1)                   # the old file or the new record
        assert good_row(stack, first.order)["state"] == "issued"
        offset[0] += stack.system.issue_lease + 1       # the card comes back later
        pickup(device, path)
        assert len(goods_on(path)) == 1, cut
        row = good_row(stack, first.order)
        assert row["state"] == "written" and row["writes"] == 2 - len(on_card), cut
    assert landed == {0, 1}                            # both sides of the commit were cut


def test_a_device_retries_its_authorisation_after_the_bank_was_down(
        stack: GoodsStack, card: Path) -> None:
    device = stack.device()
    first = ordered(stack, device)
    stack.threads["bank"].stop()
    with open_reader(f"virtual:{card}") as reader, pytest.raises(DeviceError, match="502"):
        device.authorise(reader, first, "123456")
    assert state(stack, "payment", first.order) == "authorising"
    port = stack.threads["bank"].port
    stack.threads["bank"] = ServerThread(stack.servers["bank"].app(), port=port).start()
    with open_reader(f"virtual:{card}") as reader:   # a new challenge, the PIN sealed again
        out = device.authorise(reader, first, "123456")
    assert out.written and balance(stack) == 10_000 - 1250 and len(goods_on(card)) == 1
