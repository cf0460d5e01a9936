"""The purse-paid goods path as an attacker sees it (issue 12, point 2(a)): forged, replayed,
raced, truncated and reordered messages, a MAC'd record moved to another order, session or
card, one cent paid for a good, "committed" claimed without the card's MAC2, and a power cut
at every persistent write of the card during the composite purchase. Real servers on
loopback (host/goods/stack.py), real card images; each refusal changes nothing."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from sqlalchemy import func, select
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
    serial_of,
)

from svcard.card.image import open_card
from svcard.card.storage import PowerCut
from svcard.host.goods import db as D
from svcard.host.goods import wire as W
from svcard.host.goods.device import Device, DeviceError
from svcard.host.goods.stack import GoodsStack, make_card, start_goods
from svcard.host.kit.db import reading
from svcard.host.terminal import apdus
from svcard.host.terminal.purse import call, select_purse
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import goods as G
from svcard.protocols import purse as P
from svcard.reader.base import Reader
from svcard.reader.virtual import VirtualReader

SERIAL = 72_001


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GoodsStack]:
    s = start_goods(tmp_path_factory.mktemp("purse-attack"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


_serials = iter(range(SERIAL, SERIAL + 10_000))


@pytest.fixture
def card(tmp_path: Path) -> tuple[Path, str]:
    n = next(_serials)
    return make_card(tmp_path, n, ep=EP), serial_of(n)


def sessions(stack: GoodsStack, order: str) -> int:
    s = D.purse_sessions
    with reading(stack.engine("payment")) as conn:
        return int(conn.execute(select(func.count()).select_from(s)
                                .where(s.c.order_ref == order)).scalar_one())


def post(stack: GoodsStack, role: str, path: str, key: bytes, signer: str, domain: bytes,
         payload: dict[str, Any]) -> httpx.Response:
    body, headers = W.signed(key, signer, domain, payload)
    return httpx.post(f"{stack.url(role)}{path}", content=body, headers=headers, timeout=30)


def opened(stack: GoodsStack, device: Device, reader: Reader, first: Any, serial: str,
           order: str | None = None) -> tuple[bytes, dict[str, Any]]:
    init = init_capp(reader, first)
    answer = device._post("/v1/purse/debits", W.PURSE_DEBIT,
                          debit_message(device, first, serial, init, order))
    return init, answer


def unchanged(stack: GoodsStack, order: str, state: str = D.DEBITING) -> None:
    assert row(stack, "payment", D.payment_orders, order)["state"] == state
    assert row(stack, "merchant", D.merchant_orders, order)["state"] == D.ROUTED


# --- forged ---------------------------------------------------------------------------------
def test_forged_purse_messages_are_refused(stack: GoodsStack, http: httpx.Client,
                                           card: tuple[Path, str]) -> None:
    path, serial = card
    device = stack.device()
    first = first_for(stack, http, device)
    with open_reader(f"virtual:{path}") as reader:
        init = init_capp(reader, first)
    message = debit_message(device, first, serial, init)
    # signed by another key in the device's name
    forged = post(stack, "auth", "/v1/purse/debits", W.new_key(), device.id, W.PURSE_DEBIT,
                  message)
    assert forged.status_code == 401
    # the device straight to the payment server, or the authentication server's label misused
    relayed = {k: v for k, v in message.items() if k != "first"}
    direct = post(stack, "payment", "/v1/purse/debits", device.key, device.id,
                  W.RELAYED_PURSE_DEBIT, relayed)
    assert direct.status_code == 403
    wrong_label = post(stack, "payment", "/v1/purse/debits", stack.keys["auth"],
                       stack.system.peer("auth").id, W.PURSE_DEBIT, relayed)
    assert wrong_label.status_code == 401
    # the authentication server cannot ask the fulfilment server for a record
    good = post(stack, "fulfil", "/v1/purse/goods", stack.keys["auth"],
                stack.system.peer("auth").id, W.PURSE_GOOD, {
                    "order": first.order, "card": serial, "device": device.id, "counter": 0,
                    "random": "00000000", "digital_order": "{}", "merchant_signature": "0" * 128,
                    "created": now()})
    assert good.status_code == 403
    assert row(stack, "payment", D.payment_orders, first.order)["state"] == D.ROUTED
    assert sessions(stack, first.order) == 0


def test_committed_claimed_without_the_cards_mac2_pays_nothing(
        stack: GoodsStack, http: httpx.Client, card: tuple[Path, str]) -> None:
    path, serial = card
    device = stack.device()
    first = first_for(stack, http, device)
    with open_reader(f"virtual:{path}") as reader:
        init, _ = opened(stack, device, reader, first, serial)
    for mac2 in ("00000000", "DEADBEEF"):
        with pytest.raises(DeviceError, match="409"):
            device._post("/v1/purse/proofs", W.PURSE_PROOF, {
                "device": device.id, "card": serial, "counter": counter_of(init),
                "mac2": mac2, "tac": "12345678", "created": now()})
    unchanged(stack, first.order)
    assert row(stack, "fulfil", D.purse_goods, first.order)["state"] == D.CAPP
    assert ep(path) == EP and goods_on(path) == []


# --- replayed, reordered, truncated ----------------------------------------------------------
def test_a_session_serves_one_order_once(stack: GoodsStack, http: httpx.Client,
                                         card: tuple[Path, str]) -> None:
    path, serial = card
    device = stack.device()
    first = first_for(stack, http, device)
    second = first_for(stack, http, device, "coupon")
    with open_reader(f"virtual:{path}") as reader:
        init, _ = opened(stack, device, reader, first, serial)
    message = debit_message(device, first, serial, init)
    with pytest.raises(DeviceError, match=r"409.*used already"):   # the same session again
        device._post("/v1/purse/debits", W.PURSE_DEBIT, message)
    # the same session for another order: its record would be MAC'd for this session
    with pytest.raises(DeviceError, match=r"409.*used already"):
        device._post("/v1/purse/debits", W.PURSE_DEBIT,
                     debit_message(device, second, serial, init))
    assert sessions(stack, first.order) == 1 and sessions(stack, second.order) == 0
    assert row(stack, "payment", D.payment_orders, second.order)["state"] == D.ROUTED
    # the fulfilment server checks it too, on its own: the session had a record already
    digital = row(stack, "payment", D.payment_orders, second.order)
    again = post(stack, "fulfil", "/v1/purse/goods", stack.keys["payment"],
                 stack.system.peer("payment").id, W.PURSE_GOOD, {
                     "order": second.order, "card": serial, "device": device.id,
                     "counter": counter_of(init),
                     "random": P.InitForPurchaseAnswer.parse(init).random.hex().upper(),
                     "digital_order": digital["digital_order"],
                     "merchant_signature": digital["merchant_signature"], "created": now()})
    assert again.status_code == 409 and "record already" in again.text
    assert ep(path) == EP and goods_on(path) == []


def test_a_proof_before_any_purchase_and_a_truncated_message_change_nothing(
        stack: GoodsStack, http: httpx.Client, card: tuple[Path, str]) -> None:
    path, serial = card
    device = stack.device()
    first = first_for(stack, http, device)
    with pytest.raises(DeviceError, match="409"):
        device._post("/v1/purse/proofs", W.PURSE_PROOF, {
            "device": device.id, "card": serial, "counter": 0, "mac2": "00000000",
            "tac": "00000000", "created": now()})
    with open_reader(f"virtual:{path}") as reader:
        init = init_capp(reader, first)
    body, headers = W.signed(device.key, device.id, W.PURSE_DEBIT,
                             debit_message(device, first, serial, init))
    cut = httpx.post(f"{stack.url('auth')}/v1/purse/debits", content=body[:-9],
                     headers=headers, timeout=30)
    assert cut.status_code == 400
    assert row(stack, "payment", D.payment_orders, first.order)["state"] == D.ROUTED
    assert sessions(stack, first.order) == 0


def test_a_proof_replayed_pays_once(stack: GoodsStack, http: httpx.Client,
                                    card: tuple[Path, str]) -> None:
    path, serial = card
    device = stack.device()
    first = first_for(stack, http, device)
    with open_reader(f"virtual:{path}") as reader:
        init, answer = opened(stack, device, reader, first, serial)
        assert reader.exchange(bytes.fromhex(answer["cache"])).sw == 0x9000
        done = reader.exchange(bytes.fromhex(answer["debit"]))
    assert done.ok
    proof = P.DebitForPurchaseAnswer.parse(done.data)
    message = {"device": device.id, "card": serial, "counter": counter_of(init),
               "mac2": proof.mac2.hex().upper(), "tac": proof.tac.hex().upper()}
    for _ in range(3):
        paid = device._post("/v1/purse/proofs", W.PURSE_PROOF, {**message, "created": now()})
        assert paid["order"] == first.order and paid["paid"] is True
    with pytest.raises(DeviceError, match="409"):   # the same MAC2 with another TAC
        device._post("/v1/purse/proofs", W.PURSE_PROOF,
                     {**message, "tac": "00000000", "created": now()})
    assert row(stack, "payment", D.payment_orders, first.order)["state"] == D.PURSE_PAID
    assert ep(path) == EP - 1250 and len(goods_on(path)) == 1
    with open_reader(f"virtual:{path}") as reader, pytest.raises(DeviceError, match="409"):
        opened(stack, device, reader, first, serial)     # paid: no second purchase


# --- a record moved, one cent paid, another card ------------------------------------------------
def test_a_record_from_another_session_or_order_is_refused_by_the_card(
        stack: GoodsStack, http: httpx.Client, card: tuple[Path, str]) -> None:
    path, serial = card
    device = stack.device()
    dear = first_for(stack, http, device, "airtime")     # 50.00
    cheap = first_for(stack, http, device, "coupon")     # 1.00
    with open_reader(f"virtual:{path}") as reader:
        _, for_dear = opened(stack, device, reader, dear, serial)
        _, for_cheap = opened(stack, device, reader, cheap, serial)   # a new session
        # the dear good's record with the cheap debit: MAC'd for the first session
        assert reader.exchange(bytes.fromhex(for_dear["cache"])).sw == 0x6988
        assert reader.exchange(bytes.fromhex(for_cheap["debit"])).sw != 0x9000
    assert ep(path) == EP and goods_on(path) == []
    with open_reader(f"virtual:{path}") as reader:   # the cheap record, the dear debit
        _, for_cheap = opened(stack, device, reader, cheap, serial)
        assert reader.exchange(bytes.fromhex(for_cheap["cache"])).sw == 0x9000
        assert reader.exchange(bytes.fromhex(for_dear["debit"])).sw != 0x9000
    assert ep(path) == EP and goods_on(path) == []
    assert row(stack, "payment", D.payment_orders, dear.order)["state"] == D.DEBITING


def test_one_cent_for_the_good_is_refused_by_the_card(
        stack: GoodsStack, http: httpx.Client, card: tuple[Path, str]) -> None:
    path, serial = card
    device = stack.device()
    first = first_for(stack, http, device)
    with open_reader(f"virtual:{path}") as reader:
        select_purse(reader)
        init = call(reader, apdus.initialize(G.INIT_CAPP_PURCHASE, P.PURSE_EP, 1, 1,
                                             bytes.fromhex(str(first.fields["terminal"]))),
                    "INITIALIZE FOR CAPP PURCHASE")
        answer = device._post("/v1/purse/debits", W.PURSE_DEBIT,
                              debit_message(device, first, serial, init))
        assert reader.exchange(bytes.fromhex(answer["cache"])).sw == 0x9000
        assert reader.exchange(bytes.fromhex(answer["debit"])).sw != 0x9000   # MAC1: 1250
    assert ep(path) == EP and goods_on(path) == []
    assert row(stack, "payment", D.payment_orders, first.order)["state"] == D.DEBITING


def test_a_good_for_another_card_or_another_device(stack: GoodsStack, http: httpx.Client,
                                                   card: tuple[Path, str],
                                                   tmp_path: Path) -> None:
    path, serial = card
    other_serial = serial_of(next(_serials))
    device = stack.device()
    first = first_for(stack, http, device)
    with open_reader(f"virtual:{path}") as reader:    # this card's session, another's serial
        _, answer = opened(stack, device, reader, first, other_serial)
        assert reader.exchange(bytes.fromhex(answer["cache"])).sw == 0x6988
        assert reader.exchange(bytes.fromhex(answer["debit"])).sw != 0x9000
    assert ep(path) == EP and goods_on(path) == []
    stranger = stack.device()                          # another device: not its order
    second = first_for(stack, http, device, "coupon")
    with open_reader(f"virtual:{path}") as reader, pytest.raises(DeviceError, match="404"):
        opened(stack, stranger, reader, second, serial)
    assert row(stack, "payment", D.payment_orders, second.order)["state"] == D.ROUTED


def test_the_bank_and_the_purse_cannot_both_pay_an_order(
        stack: GoodsStack, http: httpx.Client, card: tuple[Path, str]) -> None:
    path, serial = card
    stack.account(f"acc{serial}", serial, balance=10_000)
    device = stack.device()
    first = first_for(stack, http, device)
    with open_reader(f"virtual:{path}") as reader:
        opened(stack, device, reader, first, serial)
        with pytest.raises(DeviceError, match="409"):
            device.authorise(reader, first, "123456")
    assert first_row_none(stack, first.order)
    second = first_for(stack, http, device, "coupon")
    with open_reader(f"virtual:{path}") as reader:
        assert device.authorise(reader, second, "123456").paid
        with pytest.raises(DeviceError, match="409"):
            opened(stack, device, reader, second, serial)
    assert sessions(stack, second.order) == 0
    assert ep(path) == EP


def first_row_none(stack: GoodsStack, order: str) -> bool:
    from svcard.host.kit.db import first_row
    return first_row(stack.engine("bank"), D.bank_payments, order_ref=order) is None


def test_an_order_opens_at_most_eight_purchases(stack: GoodsStack, http: httpx.Client,
                                                card: tuple[Path, str]) -> None:
    path, serial = card
    device = stack.device()
    first = first_for(stack, http, device)
    with open_reader(f"virtual:{path}") as reader:
        for _ in range(8):       # each a PSAM record: bounded per order
            opened(stack, device, reader, first, serial)
        with pytest.raises(DeviceError, match=r"429.*8 purchases"):
            opened(stack, device, reader, first, serial)
    assert sessions(stack, first.order) == 8


# --- raced ----------------------------------------------------------------------------------
def test_racing_debits_of_one_session_open_it_once(
        stack: GoodsStack, http: httpx.Client, card: tuple[Path, str]) -> None:
    path, serial = card
    device = stack.device()
    first = first_for(stack, http, device)
    with open_reader(f"virtual:{path}") as reader:
        init = init_capp(reader, first)
    body, headers = W.signed(device.key, device.id, W.PURSE_DEBIT,
                             debit_message(device, first, serial, init))

    def send(_: int) -> int:
        answer = httpx.post(f"{stack.url('auth')}/v1/purse/debits", content=body,
                            headers=headers, timeout=30)
        # the payment server's refusal reaches the device as the relay's 502 naming it
        return 409 if answer.status_code == 502 and "409" in answer.text \
            else answer.status_code

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = sorted(pool.map(send, range(6)))
    assert codes.count(200) == 1 and set(codes) <= {200, 409}, codes
    assert sessions(stack, first.order) == 1


# --- a power cut at every persistent write of the card ---------------------------------------
class Tear:
    def __init__(self, cut_at: int | None) -> None:
        self.cut_at, self.armed, self.steps = cut_at, False, 0

    def __call__(self, step: str) -> None:
        if self.armed:
            self.steps += 1
            if self.steps - 1 == self.cut_at:
                raise PowerCut(step)


class ArmAtDebit:
    def __init__(self, inner: Reader, tear: Tear) -> None:
        self.inner, self.tear = inner, tear

    def exchange(self, apdu: bytes) -> Any:
        if apdu[:2] == b"\x80\x54":
            self.tear.armed = True
        return self.inner.exchange(apdu)


def torn_purchase(device: Device, first: Any, path: Path, tear: Tear) -> None:
    card = open_card(path, tear=tear)
    reader = VirtualReader(card)
    try:
        reader.connect()
        device.pay_with_purse(cast(Reader, ArmAtDebit(reader, tear)), first)
    finally:
        card.close()


def test_a_power_cut_at_every_write_of_the_composite_purchase(
        tmp_path: Path, http: httpx.Client) -> None:
    stack = start_goods(tmp_path / "servers")
    try:
        device = stack.device()
        dry = Tear(None)
        torn_purchase(device, first_for(stack, http, device), make_card(
            tmp_path / "dry", next(_serials), ep=EP), dry)
        assert dry.steps >= 4
        committed = set()
        for cut in range(dry.steps):
            path = make_card(tmp_path / f"cut{cut}", next(_serials), ep=EP)
            first = first_for(stack, http, device)
            with pytest.raises(PowerCut):
                torn_purchase(device, first, path, Tear(cut))
            moved, held = ep(path) != EP, len(goods_on(path))   # power back: both or neither
            assert (moved, held) in ((True, 1), (False, 0)), cut
            committed.add(moved)
            with open_reader(f"virtual:{path}") as reader:    # the next contact
                outs = device.pickup(reader)
            if moved:
                assert [(o.order, o.paid) for o in outs] == [(first.order, True)], cut
            else:
                assert outs == [], cut
                assert row(stack, "payment", D.payment_orders, first.order)["state"] == \
                    D.DEBITING
                with open_reader(f"virtual:{path}") as reader:   # the same counter: again
                    assert device.pay_with_purse(reader, first).paid
            assert ep(path) == EP - 1250 and len(goods_on(path)) == 1, cut
            assert row(stack, "payment", D.payment_orders, first.order)["state"] == \
                D.PURSE_PAID
            assert row(stack, "fulfil", D.purse_goods, first.order)["state"] == D.WRITTEN
        assert committed == {True, False}    # both sides of the card's commit were cut
    finally:
        stack.close()


def test_a_debit_sent_without_its_record_is_completed_at_pick_up(
        stack: GoodsStack, http: httpx.Client, card: tuple[Path, str]) -> None:
    path, serial = card
    device = stack.device()
    first = first_for(stack, http, device)
    with open_reader(f"virtual:{path}") as reader:   # the DEBIT alone: paid, no good
        init, answer = opened(stack, device, reader, first, serial)
        done = reader.exchange(bytes.fromhex(answer["debit"]))
    assert done.ok and ep(path) == EP - 1250 and goods_on(path) == []
    proof = P.DebitForPurchaseAnswer.parse(done.data)
    assert device._post("/v1/purse/proofs", W.PURSE_PROOF, {
        "device": device.id, "card": serial, "counter": counter_of(init),
        "mac2": proof.mac2.hex().upper(), "tac": proof.tac.hex().upper(),
        "created": now()})["paid"] is True
    stranger = stack.device()                   # another device gets no write of it
    with open_reader(f"virtual:{path}") as reader:
        stranger.pickup(reader)     # (it may prove the card's purchase: the same answer)
    assert goods_on(path) == []
    with open_reader(f"virtual:{path}") as reader:
        outs = device.pickup(reader)
    assert [(o.order, o.written) for o in outs][-1:] == [(first.order, True)]
    [good] = goods_on(path)
    assert good["good_id"] == bytes.fromhex(first.order)[:8]
    with open_reader(f"virtual:{path}") as reader:     # held now: nothing more
        assert [o for o in device.pickup(reader) if o.written and o.sw != 0x9000] == []
        # a device hiding it from "held" gets a write by its tag: the card keeps one record
        select_purse(reader)
        challenge = call(reader, apdus.get_challenge(4), "GET CHALLENGE")
        again = device._post("/v1/pickups", W.PICKUP, {
            "device": device.id, "card": serial, "issuer": "0102030405060708",
            "challenge": challenge.hex().upper(), "held": [], "created": now()})
        assert reader.exchange(bytes.fromhex(again["apdu"])).sw == 0x9000
    assert len(goods_on(path)) == 1 and ep(path) == EP - 1250
