"""Seed 000, the purse pays (issue 12, point 2(a)): the fulfilment server's MAC'd record and
the PSAM's debit are ONE composite purchase (type 09) on the card, relayed by the device; the
order is paid only on the card's MAC2 matching the PSAM's; a purchase whose answer was lost
is settled from the card's proof at its next contact; nothing committed, nothing refunded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from svcard.card.storage import read_image
from svcard.host.goods import db as D
from svcard.host.goods import wire as W
from svcard.host.goods.device import Device, DeviceError, FirstMessage
from svcard.host.goods.server.auth import digest
from svcard.host.goods.stack import GoodsStack, make_card, start_goods
from svcard.host.kit.db import first_row
from svcard.host.terminal import apdus
from svcard.host.terminal.capp import read_goods
from svcard.host.terminal.purse import call, read_log, select_purse
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import goods as G
from svcard.protocols import purse as P
from svcard.reader.base import CardRemovedError, Reader

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
    mine = [f for f in device.poll(wait=5) if f.order == order]
    assert len(mine) == 1
    return mine[0]


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
        assert read_log(reader)[0].txn_type == P.TYPE_COMPOSITE_PURCHASE
    assert row(stack, "payment", D.payment_orders, first.order)["state"] == D.PURSE_PAID
    assert row(stack, "fulfil", D.purse_goods, first.order)["state"] == D.WRITTEN
    assert row(stack, "merchant", D.merchant_orders, first.order)["state"] == D.PURSE_PAID
    assert first_row(stack.engine("fulfil"), D.goods, order_ref=first.order) is None


# --- helpers for the steps one at a time --------------------------------------------------------
def init_capp(reader: Reader, first: FirstMessage) -> bytes:
    select_purse(reader)
    return call(reader, apdus.initialize(G.INIT_CAPP_PURCHASE, P.PURSE_EP, 1,
                                         int(first.fields["amount"]),
                                         bytes.fromhex(str(first.fields["terminal"]))),
                "INITIALIZE FOR CAPP PURCHASE")


def debit_message(device: Device, first: FirstMessage, serial: str, init: bytes,
                  order: str | None = None) -> dict[str, object]:
    return {"order": order or first.order, "device": device.id, "card": serial,
            "issuer": ISSUER, "first": digest(first.text), "init": init.hex().upper(),
            "uid": "", "created": now()}


def now() -> int:
    return int(time.time())


ISSUER = "0102030405060708"


def serial_of(n: int) -> str:
    return f"{n:020d}"


def counter_of(init: bytes) -> int:
    return int(P.InitForPurchaseAnswer.parse(init).offline_counter)


def test_a_purchase_whose_answer_was_lost_is_settled_at_the_next_contact_once(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    card = make_card(tmp_path, SERIAL, ep=EP)
    device = stack.device()
    first = first_for(stack, http, device)

    class LostAnswer:   # the card takes the DEBIT, its answer never reaches the device
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def exchange(self, apdu: bytes) -> object:
            answer = self.inner.exchange(apdu)  # type: ignore[attr-defined]
            if apdu[:2] == b"\x80\x54":
                raise CardRemovedError("the card was pulled")
            return answer

    with open_reader(f"virtual:{card}") as reader, pytest.raises(CardRemovedError):
        device.pay_with_purse(LostAnswer(reader), first)  # type: ignore[arg-type]
    assert ep(card) == EP - 1250 and len(goods_on(card)) == 1     # both, on the card
    assert row(stack, "payment", D.payment_orders, first.order)["state"] == D.DEBITING
    assert row(stack, "fulfil", D.purse_goods, first.order)["state"] == D.CAPP
    # the order cannot be paid again before it is settled: the card's counter moved
    with open_reader(f"virtual:{card}") as reader:
        init = init_capp(reader, first)
        with pytest.raises(DeviceError, match=r"409.*counter moved"):
            device._post("/v1/purse/debits", W.PURSE_DEBIT,
                         debit_message(device, first, serial_of(SERIAL), init))
    with open_reader(f"virtual:{card}") as reader:
        outs = device.pickup(reader)
    assert [(o.order, o.paid) for o in outs] == [(first.order, True)]
    assert row(stack, "payment", D.payment_orders, first.order)["state"] == D.PURSE_PAID
    assert row(stack, "fulfil", D.purse_goods, first.order)["state"] == D.WRITTEN
    assert row(stack, "merchant", D.merchant_orders, first.order)["state"] == D.PURSE_PAID
    with open_reader(f"virtual:{card}") as reader:   # again: the same proof, paid once
        outs = device.pickup(reader)
    assert [(o.order, o.paid) for o in outs] == [(first.order, True)]
    assert ep(card) == EP - 1250 and len(goods_on(card)) == 1


def test_a_session_abandoned_before_debit_can_be_retried_at_the_same_counter(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    card = make_card(tmp_path, SERIAL, ep=EP)
    device = stack.device()
    first = first_for(stack, http, device)
    with open_reader(f"virtual:{card}") as reader:   # INITIALIZE, the answer, no DEBIT
        init = init_capp(reader, first)
        answer = device._post("/v1/purse/debits", W.PURSE_DEBIT,
                              debit_message(device, first, serial_of(SERIAL), init))
        assert answer["cache"][:4] == "84DE"
    with open_reader(f"virtual:{card}") as reader:
        out = device.pay_with_purse(reader, first)
    assert out.paid and out.written
    assert ep(card) == EP - 1250 and len(goods_on(card)) == 1
    # the first session's DEBIT can never be sent now: the card's session is gone
    with open_reader(f"virtual:{card}") as reader:
        select_purse(reader)
        assert reader.exchange(bytes.fromhex(answer["cache"])).sw != 0x9000
        assert reader.exchange(bytes.fromhex(answer["debit"])).sw != 0x9000
    assert ep(card) == EP - 1250


def test_a_purse_order_never_committed_expires_with_nothing_to_refund(
        tmp_path: Path, http: httpx.Client) -> None:
    offset = [0.0]
    stack = start_goods(tmp_path / "servers", clock=lambda: time.time() + offset[0],
                        pickup_seconds=60)
    try:
        card = make_card(tmp_path, SERIAL, ep=EP)
        device = stack.device()
        first = first_for(stack, http, device)
        with open_reader(f"virtual:{card}") as reader:
            init = init_capp(reader, first)
            device._post("/v1/purse/debits", W.PURSE_DEBIT,
                         debit_message(device, first, serial_of(SERIAL), init))
        offset[0] += 120
        asyncio.run(stack.servers["fulfil"].recover())
        asyncio.run(stack.servers["payment"].recover())
        assert row(stack, "fulfil", D.purse_goods, first.order)["state"] == D.EXPIRED
        assert row(stack, "payment", D.payment_orders, first.order)["state"] == D.EXPIRED
        assert row(stack, "merchant", D.merchant_orders, first.order)["state"] == D.EXPIRED
        assert first_row(stack.engine("bank"), D.bank_payments, order_ref=first.order) is None
        assert ep(card) == EP and goods_on(card) == []
    finally:
        stack.close()


def test_the_fulfilment_server_down_misses_nothing(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    from svcard.host.kit.serving import ServerThread
    card = make_card(tmp_path, SERIAL, ep=EP)
    device = stack.device()
    first = first_for(stack, http, device)

    def fulfil_up() -> None:
        port = stack.threads["fulfil"].port
        stack.threads["fulfil"] = ServerThread(stack.servers["fulfil"].app(), port=port).start()

    stack.threads["fulfil"].stop()      # no record for the session: nothing to send the card
    with open_reader(f"virtual:{card}") as reader, pytest.raises(DeviceError, match="502"):
        device.pay_with_purse(reader, first)
    s = first_row(stack.engine("payment"), D.purse_sessions, order_ref=first.order)
    assert s is not None and s["state"] == D.FAILED and ep(card) == EP
    fulfil_up()

    class FulfilDownAtDebit:   # the fulfilment server stops just before the card's proof
        def __init__(self, inner: Reader) -> None:
            self.inner = inner

        def exchange(self, apdu: bytes) -> object:
            if apdu[:2] == b"\x80\x54":
                stack.threads["fulfil"].stop()
            return self.inner.exchange(apdu)

    with open_reader(f"virtual:{card}") as reader:   # the same counter: a new session
        out = device.pay_with_purse(FulfilDownAtDebit(reader), first)  # type: ignore[arg-type]
    assert out.paid        # the payment server decides on the card's MAC2 alone
    assert row(stack, "payment", D.payment_orders, first.order)["state"] == D.PURSE_PAID
    assert row(stack, "fulfil", D.purse_goods, first.order)["state"] == D.CAPP
    fulfil_up()
    asyncio.run(stack.servers["payment"].recover())   # its clock tells the fulfilment server
    assert row(stack, "fulfil", D.purse_goods, first.order)["state"] == D.WRITTEN
    assert ep(card) == EP - 1250 and len(goods_on(card)) == 1


def test_a_lost_answer_is_proved_before_the_cards_next_purse_purchase(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    """GET TRANSACTION PROVE answers for the card's last transaction only: the device proves
    an unproved composite purchase before it opens the next one (found by G2's run)."""
    card = make_card(tmp_path, SERIAL, ep=EP)
    device = stack.device()
    lost, second = first_for(stack, http, device), first_for(stack, http, device, "coupon")

    class LostDebitAnswer:
        def __init__(self, inner: Reader) -> None:
            self.inner = inner

        def exchange(self, apdu: bytes) -> object:
            answer = self.inner.exchange(apdu)
            if apdu[:2] == b"\x80\x54":
                raise CardRemovedError("the card was pulled")
            return answer

    with open_reader(f"virtual:{card}") as reader, pytest.raises(CardRemovedError):
        device.pay_with_purse(LostDebitAnswer(reader), lost)  # type: ignore[arg-type]
    trips = device.round_trips
    with open_reader(f"virtual:{card}") as reader:
        assert device.pay_with_purse(reader, second).written
    assert device.round_trips - trips == 3           # the proof of the lost one, then 2
    for order in (lost.order, second.order):
        assert row(stack, "payment", D.payment_orders, order)["state"] == D.PURSE_PAID
    assert ep(card) == EP - 1250 - 100 and len(goods_on(card)) == 2
    trips = device.round_trips
    third = first_for(stack, http, device, "coupon")
    with open_reader(f"virtual:{card}") as reader:   # proved already: no extra round trip
        assert device.pay_with_purse(reader, third).written
    assert device.round_trips - trips == 2
