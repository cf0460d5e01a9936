"""R-goods2: the purse-paid goods path (issue 12, 2a) reviewed as an attacker. Each test is a
break found in the review and failed before its fix."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_goods_attack import authorisation
from test_goods_purse import (
    EP,
    counter_of,
    debit_message,
    ep,
    first_for,
    goods_on,
    init_capp,
    now,
    row,
)
from test_goods_purse_attack import post

from svcard.host.goods import db as D
from svcard.host.goods import wire as W
from svcard.host.goods.device import DeviceError
from svcard.host.goods.server.payment import PaymentServer
from svcard.host.goods.stack import GoodsStack, make_card, start_goods
from svcard.host.kit.db import first_row
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import purse as P

SERIAL = 73_001


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GoodsStack]:
    s = start_goods(tmp_path_factory.mktemp("purse-review2"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def alias(serial: str) -> str:
    """Another 10-byte serial with the same rightmost 8 bytes: the same card keys (PBOC
    diversifies by the rightmost 8 bytes), another row in the servers' books."""
    return "FFFF" + serial[4:]


def test_a_dear_record_cannot_ride_a_cheap_debit_under_a_serial_alias(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    """One card session (random, counter) given to two orders, once under the card's serial
    and once under an alias of it: the fulfilment server MACed the dear good's record for the
    very session the cheap order's DEBIT commits, and the card took the 50.00 voucher for
    1.00 (before the fix: ep 9900, the voucher on the card, the dear order left to expire)."""
    path = make_card(tmp_path, SERIAL, ep=EP)
    serial = f"{SERIAL:020d}"
    device = stack.device()
    dear = first_for(stack, http, device, "airtime")   # 50.00
    cheap = first_for(stack, http, device, "coupon")   # 1.00
    with open_reader(f"virtual:{path}") as reader:
        init = init_capp(reader, cheap)                 # the card's session, for 1.00
        for_dear = device._post("/v1/purse/debits", W.PURSE_DEBIT,
                                debit_message(device, dear, alias(serial), init))
        refused = None
        try:
            for_cheap = device._post("/v1/purse/debits", W.PURSE_DEBIT,
                                     debit_message(device, cheap, serial, init))
        except DeviceError as exc:
            refused = str(exc)
        if refused is None:
            assert reader.exchange(bytes.fromhex(for_dear["cache"])).sw == 0x9000
            debit = reader.exchange(bytes.fromhex(for_cheap["debit"])).sw
    assert refused is not None and "409" in refused, (
        f"the session got a second order's DEBIT: card {debit:04X}, purse {ep(path)}, "
        f"goods {[g['kind'] for g in goods_on(path)]}")
    assert ep(path) == EP and goods_on(path) == []
    assert row(stack, "payment", D.payment_orders, cheap.order)["state"] == D.ROUTED
    # the fulfilment server checks it on its own: no record for a session it MACed already
    digital = row(stack, "payment", D.payment_orders, cheap.order)
    again = post(stack, "fulfil", "/v1/purse/goods", stack.keys["payment"],
                 stack.system.peer("payment").id, W.PURSE_GOOD, {
                     "order": cheap.order, "card": serial, "device": device.id,
                     "counter": counter_of(init),
                     "random": P.InitForPurchaseAnswer.parse(init).random.hex().upper(),
                     "digital_order": digital["digital_order"],
                     "merchant_signature": digital["merchant_signature"], "created": now()})
    assert again.status_code == 409 and "record already" in again.text, again.text


def test_a_sessions_mac2_cannot_be_guessed(stack: GoodsStack, http: httpx.Client,
                                          tmp_path: Path) -> None:
    """The MAC2 is 4 bytes and a proof is matched against every session of (card, counter),
    any order's, any device's: with 8 sessions an order and orders at will (forged
    INITIALIZE answers need no card), wrong proofs were never counted - 80,000 sessions at
    one (card, counter) make a guess pay with odds 1 in 54,000, and the paid good is then
    written onto the card at pick-up, with no debit. Now a session takes at most
    MAX_WRONG_PROOFS wrong MAC2s from devices other than its order's, and as many from its
    own (so a stranger cannot lock the buyer out)."""
    from svcard.host.goods.server import purse_pay
    limit = getattr(purse_pay, "MAX_WRONG_PROOFS", 8)
    path = make_card(tmp_path, SERIAL + 1, ep=EP)
    serial = f"{SERIAL + 1:020d}"
    device, stranger = stack.device(), stack.device()
    first = first_for(stack, http, device)
    with open_reader(f"virtual:{path}") as reader:
        init = init_capp(reader, first)
        answer = device._post("/v1/purse/debits", W.PURSE_DEBIT,
                              debit_message(device, first, serial, init))
        assert reader.exchange(bytes.fromhex(answer["cache"])).sw == 0x9000
        done = reader.exchange(bytes.fromhex(answer["debit"]))
    assert done.ok
    proof = P.DebitForPurchaseAnswer.parse(done.data)
    right = proof.mac2.hex().upper()

    def prove(who: object, mac2: str) -> str:
        assert isinstance(who, type(device))
        try:
            out = who._post("/v1/purse/proofs", W.PURSE_PROOF, {
                "device": who.id, "card": serial, "counter": counter_of(init), "mac2": mac2,
                "tac": proof.tac.hex().upper(), "created": now()})
            return "paid" if out.get("paid") is True else "unpaid"
        except DeviceError as exc:
            return str(exc)

    wrong = [f"{(int(right, 16) + 1 + i) % 2**32:08X}" for i in range(limit)]
    for mac2 in wrong:
        assert "409" in prove(stranger, mac2)
    assert "409" in prove(stranger, right), "guessing went on past the limit"
    assert row(stack, "payment", D.payment_orders, first.order)["state"] == D.DEBITING
    assert prove(device, right) == "paid"   # the buyer's own device is not locked out
    assert row(stack, "payment", D.payment_orders, first.order)["state"] == D.PURSE_PAID


def test_a_bank_payment_racing_a_wrong_pin_leaves_the_purse_out(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    """Two bank authorisations of one order, the right PIN's slow at the institution, the
    wrong PIN's answered first: it put the order back (payment ``routed``, auth ``offered``)
    and the purse took it (``debiting``); the right PIN's debit then found no order to pay -
    the account debited 12.50, no good, no refund (before the fix). Now an order the bank was
    asked for is never the purse's."""
    path = make_card(tmp_path, SERIAL + 2, ep=EP)
    serial = f"{SERIAL + 2:020d}"
    stack.account(f"acc{serial}", serial, balance=10_000)
    device = stack.device()
    first = first_for(stack, http, device)
    payment = stack.servers["payment"]
    assert isinstance(payment, PaymentServer)
    original = payment.send_raw
    asked, release_ask, release_answer = threading.Event(), threading.Event(), threading.Event()
    calls: list[str] = []

    async def held(event: threading.Event) -> None:
        deadline = time.monotonic() + 30
        while not event.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def slow_bank(role: str, where: str, domain: bytes, payload: dict[str, object],
                        client: httpx.AsyncClient | None = None,
                        ) -> tuple[dict[str, object], str, str]:
        if role == "bank" and where == "/v1/payments" and not calls:
            calls.append("right")
            asked.set()
            await held(release_ask)
            out = await original(role, where, domain, payload, client)
            await held(release_answer)
            return out
        return await original(role, where, domain, payload, client)

    payment.send_raw = slow_bank  # type: ignore[method-assign]
    results: list[object] = []
    try:
        right = threading.Thread(target=lambda: results.append(device._post(
            "/v1/authorisations", W.AUTHORISATION,
            authorisation(device, first, serial, "00000000"))))
        right.start()
        assert asked.wait(30)
        wrong = device._post("/v1/authorisations", W.AUTHORISATION,
                             authorisation(device, first, serial, "00000000", pin="999999"))
        assert wrong["paid"] is False
        release_ask.set()
        deadline = time.monotonic() + 30
        while first_row(stack.engine("bank"), D.bank_payments, order_ref=first.order) is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        purse: str = "opened"
        with open_reader(f"virtual:{path}") as reader:
            init = init_capp(reader, first)
            try:
                device._post("/v1/purse/debits", W.PURSE_DEBIT,
                             debit_message(device, first, serial, init))
            except DeviceError as exc:
                purse = str(exc)
        release_answer.set()
        right.join(30)
    finally:
        release_ask.set()
        release_answer.set()
        payment.send_raw = original  # type: ignore[method-assign]
    assert first_row(stack.engine("bank"), D.bank_payments, order_ref=first.order) is not None
    assert "409" in purse, "the purse opened an order the bank was paying"
    assert row(stack, "payment", D.payment_orders, first.order)["state"] == D.PAID
    assert results and isinstance(results[0], dict) and results[0]["paid"] is True


def test_another_terminals_composite_purchase_does_not_block_the_next(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    """The card's last transaction a composite purchase of another terminal (a validator's
    ride is one): the device proves it first, the payment server knows no such purchase
    (409, relayed by the authentication server as 502 'payment answered 409'), and the device
    took that for a server still to answer - no purse purchase on the card at all until its
    last transaction changed (before the fix)."""
    from svcard.host.goods.stack import psam_images
    from svcard.host.terminal.capp import capp_purchase

    path = make_card(tmp_path, SERIAL + 3, ep=EP)
    [psam] = psam_images(tmp_path / "elsewhere", 1)
    with open_reader(f"virtual:{path}") as card, open_reader(f"virtual:{psam}") as sam:
        capp_purchase(card, sam, 10, [])
    device = stack.device()
    first = first_for(stack, http, device)
    with open_reader(f"virtual:{path}") as reader:
        out = device.pay_with_purse(reader, first)
    assert out.paid and out.written
    assert ep(path) == EP - 10 - 1250 and len(goods_on(path)) == 1
