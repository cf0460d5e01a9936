"""Seed 000 under attack: a good aimed at another card, a replayed write or authorisation, forged
first messages, authorisations and confirmations, another device's authorisation, truncated and
oversized bodies, racing authorisations, wrong PINs. Each is refused and changes nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from test_goods_flow import balance, goods_on, state

from svcard.host.goods import db as D
from svcard.host.goods import wire as W
from svcard.host.goods.device import Device, DeviceError, FirstMessage
from svcard.host.goods.server.auth import digest
from svcard.host.goods.server.common import REPLY
from svcard.host.goods.stack import GoodsStack, make_card, start_goods
from svcard.host.terminal import apdus
from svcard.host.terminal.purse import call, select_purse
from svcard.host.terminal.reader_specs import open_reader

A, B = 70_011, 70_012
SERIAL_A, SERIAL_B = f"{A:020d}", f"{B:020d}"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[GoodsStack]:
    s = start_goods(tmp_path / "servers")
    s.account("acc1", A, balance=10_000)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def cards(tmp_path: Path) -> tuple[Path, Path]:
    return make_card(tmp_path, A), make_card(tmp_path, B)


def offered(stack: GoodsStack, device: Device, sku: str = "ticket") -> FirstMessage:
    with httpx.Client() as http:
        assert stack.order(http, sku, device).status_code == 200
    [first] = device.poll(wait=5)
    return first


def authorisation(device: Device, msg: FirstMessage, card: str, challenge: str,
                  pin: str = "123456", **extra: Any) -> dict[str, Any]:
    return {"order": msg.order, "device": device.id, "approve": True, "card": card,
            "issuer": "1000000000000001", "first": digest(msg.text),
            "pin": W.seal_pin(bytes.fromhex(msg.fields["seal_key"]), pin, msg.order, card),
            "challenge": challenge, "created": int(time.time()), **extra}


def challenge_of(card_path: Path) -> tuple[Any, str]:
    reader = open_reader(f"virtual:{card_path}")
    reader.__enter__()
    select_purse(reader)
    return reader, call(reader, apdus.get_challenge(4), "GET CHALLENGE").hex().upper()


def payments(stack: GoodsStack) -> int:
    with stack.engine("bank").connect() as conn:
        return int(conn.execute(select(func.count()).select_from(D.bank_payments)).scalar_one())


def test_a_good_for_another_card_is_refused_by_that_card(stack: GoodsStack,
                                                         cards: tuple[Path, Path]) -> None:
    device = stack.device()
    first = offered(stack, device)
    reader_b, challenge_b = challenge_of(cards[1])
    try:   # paid with card A's identity, B's challenge: the write carries A's key's MAC
        answer = device._post("/v1/authorisations", W.AUTHORISATION,
                              authorisation(device, first, SERIAL_A, challenge_b))
        assert answer["paid"] is True
        assert reader_b.exchange(bytes.fromhex(answer["apdu"])).sw == 0x6988
    finally:
        reader_b.__exit__(None, None, None)
    assert goods_on(cards[1]) == []


def test_a_card_without_an_account_is_not_paid(stack: GoodsStack,
                                                cards: tuple[Path, Path]) -> None:
    device = stack.device()
    first = offered(stack, device)
    with open_reader(f"virtual:{cards[1]}") as reader:
        out = device.authorise(reader, first, "123456")
    assert not out.paid and "no account" in out.reason
    assert balance(stack) == 10_000 and goods_on(cards[1]) == []


def test_a_replayed_write_and_a_replayed_authorisation_write_nothing_more(
        stack: GoodsStack, cards: tuple[Path, Path]) -> None:
    device = stack.device()
    first = offered(stack, device)
    reader, challenge = challenge_of(cards[0])
    try:
        body = authorisation(device, first, SERIAL_A, challenge)
        answer = device._post("/v1/authorisations", W.AUTHORISATION, body)
        write = bytes.fromhex(answer["apdu"])
        assert reader.exchange(write).sw == 0x9000
        assert reader.exchange(write).sw == 0x6985                  # no challenge
        call(reader, apdus.get_challenge(4), "GET CHALLENGE")
        assert reader.exchange(write).sw == 0x6988                  # an old challenge
        again = device._post("/v1/authorisations", W.AUTHORISATION, body)
        assert again["paid"] is True and again["apdu"] is None      # issued: not again
    finally:
        reader.__exit__(None, None, None)
    assert len(goods_on(cards[0])) == 1
    assert balance(stack) == 10_000 - 1250 and payments(stack) == 1


def test_forged_first_messages_are_dropped(stack: GoodsStack) -> None:
    device = stack.device()
    first = offered(stack, device)
    forged = W.sign(W.new_key(), W.FIRST_MESSAGE, first.text.encode())
    assert device.check_first(first.text, forged) is None
    good = W.sign(stack.keys["auth"], W.FIRST_MESSAGE, first.text.encode())
    assert device.check_first(first.text, good) is not None
    altered = first.text.replace('"amount":1250', '"amount":1')
    assert device.check_first(altered, good) is None
    other = Device(device.auth_url, device.auth_id, device.auth_public, W.new_key())
    assert other.check_first(first.text, good) is None              # not its order


def test_authorisations_by_another_device_or_key_are_refused(
        stack: GoodsStack, cards: tuple[Path, Path]) -> None:
    device = stack.device()
    first = offered(stack, device)
    thief = stack.device()
    body = authorisation(thief, first, SERIAL_A, "00000000")
    with pytest.raises(DeviceError, match="404"):
        thief._post("/v1/authorisations", W.AUTHORISATION, body)
    stranger = Device(device.auth_url, device.auth_id, device.auth_public, W.new_key())
    with pytest.raises(DeviceError, match="403"):                   # never registered
        stranger._post("/v1/authorisations", W.AUTHORISATION,
                       authorisation(stranger, first, SERIAL_A, "00000000"))
    payload = authorisation(device, first, SERIAL_A, "00000000")
    text, headers = W.signed(thief.key, device.id, W.AUTHORISATION, payload)   # claims to be
    with httpx.Client() as http:                                               # the device
        got = http.post(f"{device.auth_url}/v1/authorisations", content=text, headers=headers)
    assert got.status_code == 401
    wrong_first = authorisation(device, first, SERIAL_A, "00000000", first="00" * 32)
    with pytest.raises(DeviceError, match="409"):
        device._post("/v1/authorisations", W.AUTHORISATION, wrong_first)
    assert state(stack, "auth", first.order) == "offered" and balance(stack) == 10_000


def test_forged_messages_between_servers_are_refused(stack: GoodsStack) -> None:
    device = stack.device()
    first = offered(stack, device)
    with httpx.Client() as http:
        # a digital order signed by an unknown key in the merchant's name
        body, headers = W.signed(W.new_key(), "merchant1", W.DIGITAL_ORDER, {"x": 1})
        assert http.post(f"{stack.url('payment')}/v1/orders", content=body,
                         headers=headers).status_code in (400, 401)
        # a paid good with a confirmation the institution never signed
        confirmation = W.canonical({"order": first.order, "paid": True, "amount": 1250,
                                    "currency": 156, "card": SERIAL_A, "bank_ref": "x"})
        row = stack.servers["payment"].engine.connect().execute(
            select(D.payment_orders).where(D.payment_orders.c.order_ref == first.order)).first()
        assert row is not None
        paid = {"order": first.order, "card": SERIAL_A, "device": device.id,
                "challenge": "00000000", "digital_order": row.digital_order,
                "merchant_signature": row.merchant_signature,
                "confirmation": confirmation.decode(),
                "confirmation_signature": W.sign(W.new_key(), REPLY + W.PAYMENT, confirmation),
                "created": int(time.time())}
        body, headers = W.signed(stack.keys["payment"], "pay1", W.PAID, paid)
        got = http.post(f"{stack.url('fulfil')}/v1/goods", content=body, headers=headers)
        assert got.status_code == 401 and "confirmation" in got.json()["reason"]
        # the right signature under another message's label
        body, headers = W.signed(stack.keys["payment"], "pay1", W.REFUND, paid)
        assert http.post(f"{stack.url('fulfil')}/v1/goods", content=body,
                         headers=headers).status_code in (400, 401)
        # a payment asked of the institution by anyone but the payment server
        body, headers = W.signed(stack.keys["auth"], "auth1", W.PAYMENT, {})
        assert http.post(f"{stack.url('bank')}/v1/payments", content=body,
                         headers=headers).status_code in (400, 403)
    from svcard.host.kit.db import first_row
    assert first_row(stack.engine("fulfil"), D.goods, order_ref=first.order) is None
    assert balance(stack) == 10_000


def test_truncated_and_oversized_bodies_change_nothing(stack: GoodsStack) -> None:
    device = stack.device()
    first = offered(stack, device)
    payload = authorisation(device, first, SERIAL_A, "00000000")
    body = W.canonical(payload)[:-7]
    headers = {W.SIGNER: device.id, W.SIGNATURE: W.sign(device.key, W.AUTHORISATION, body)}
    with httpx.Client() as http:
        url = f"{device.auth_url}/v1/authorisations"
        assert http.post(url, content=body, headers=headers).status_code == 400
        big = b'{"order":"' + b"a" * 9000 + b'"}'
        assert http.post(url, content=big, headers=headers).status_code == 413
        assert http.post(f"{stack.url('merchant')}/v1/orders",
                         content=b"{" * 5000).status_code in (400, 413)
        assert http.post(f"{stack.url('merchant')}/v1/orders",
                         json={"sku": "ticket"}).status_code == 400
    assert state(stack, "auth", first.order) == "offered" and balance(stack) == 10_000


def test_racing_authorisations_debit_once(stack: GoodsStack, cards: tuple[Path, Path]) -> None:
    device = stack.device()
    first = offered(stack, device)
    body = authorisation(device, first, SERIAL_A, "0000000A")

    def one(_: int) -> Any:
        with httpx.Client(timeout=30) as http:
            d = Device(device.auth_url, device.auth_id, device.auth_public, device.key,
                       http=http)
            try:
                return d._post("/v1/authorisations", W.AUTHORISATION, body)
            except DeviceError as exc:
                return str(exc)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert sum(isinstance(a, dict) and a.get("apdu") is not None for a in answers) == 1
    assert balance(stack) == 10_000 - 1250 and payments(stack) == 1


def test_wrong_pins(stack: GoodsStack, cards: tuple[Path, Path], tmp_path: Path) -> None:
    device = stack.device()
    first = offered(stack, device)
    with open_reader(f"virtual:{cards[0]}") as reader, pytest.raises(DeviceError,
                                                                     match="63C2"):
        device.authorise(reader, first, "999999")          # the card checks its PIN
    assert state(stack, "auth", first.order) == "offered"
    stack.account("acc2", B, pin="654321", balance=10_000)  # the bank's PIN is another
    for n in range(3):
        reader, challenge = challenge_of(cards[1])
        reader.__exit__(None, None, None)
        answer = device._post("/v1/authorisations", W.AUTHORISATION,
                              authorisation(device, first, SERIAL_B, challenge))
        assert answer["paid"] is False and "PIN" in answer["reason"], n
    assert state(stack, "payment", first.order) == "declined"
    assert balance(stack, "acc2") == 10_000 and payments(stack) == 0


def test_only_the_device_given_the_write_reports_it(stack: GoodsStack,
                                                     cards: tuple[Path, Path]) -> None:
    device = stack.device()
    first = offered(stack, device)
    reader, challenge = challenge_of(cards[0])
    reader.__exit__(None, None, None)     # the write is handed out, never sent to the card
    answer = device._post("/v1/authorisations", W.AUTHORISATION,
                          authorisation(device, first, SERIAL_A, challenge))
    assert answer["apdu"] is not None
    thief = stack.device()   # says the write landed, so the good would never be re-issued
    with pytest.raises(DeviceError, match="404"):
        thief._post("/v1/written", W.WRITTEN, {"order": first.order, "device": thief.id,
                                               "card": SERIAL_A, "sw": 0x9000,
                                               "created": int(time.time())})
    from svcard.host.kit.db import first_row
    row = first_row(stack.engine("fulfil"), D.goods, order_ref=first.order)
    assert row is not None and row["state"] == "issued"


def test_a_device_may_hold_only_a_few_polls_open(stack: GoodsStack) -> None:
    device = stack.device()

    def poll(_: int) -> str:
        with httpx.Client(timeout=30) as http:
            d = Device(device.auth_url, device.auth_id, device.auth_public, device.key,
                       http=http)
            try:
                d.poll(wait=3)
                return "ok"
            except DeviceError as exc:
                return str(exc)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(poll, range(8)))
    assert sum("429" in a for a in answers) >= 1


def test_another_device_picks_up_nothing_of_a_card_it_names(
        stack: GoodsStack, cards: tuple[Path, Path]) -> None:
    """A card's serial is public and anyone may register a device: a pick-up through another
    device than the one that bought the good gets no write of it (else it could report 9000
    and the good would be marked written without ever reaching the card)."""
    device = stack.device()
    first = offered(stack, device)
    reader, challenge = challenge_of(cards[0])
    reader.__exit__(None, None, None)
    answer = device._post("/v1/authorisations", W.AUTHORISATION,
                          authorisation(device, first, SERIAL_A, challenge))
    assert answer["apdu"] is not None   # handed out, never sent: waits for a pick-up
    from svcard.host.kit.db import first_row, update_row
    row = first_row(stack.engine("fulfil"), D.goods, order_ref=first.order)
    assert row is not None
    assert update_row(stack.engine("fulfil"), D.goods, row["id"], issued_at=None)   # lease out
    thief = stack.device()
    claim = thief._post("/v1/pickups", W.PICKUP, {
        "device": thief.id, "card": SERIAL_A, "issuer": "1000000000000001",
        "challenge": "00000000", "held": [], "created": int(time.time())})
    assert claim["apdu"] is None and claim["order"] is None
    with open_reader(f"virtual:{cards[0]}") as card:
        [out] = device.pickup(card)
    assert out.written and len(goods_on(cards[0])) == 1
