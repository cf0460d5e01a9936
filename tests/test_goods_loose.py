"""Issue 12's loose ends in the goods servers (G4): each test failed before its fix."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from test_goods_purse import EP, debit_message, ep, first_for, init_capp, now

from svcard.host.goods import db as D
from svcard.host.goods import wire as W
from svcard.host.goods.device import Device, DeviceError, FirstMessage
from svcard.host.goods.server.auth import MAX_OFFERED
from svcard.host.goods.stack import GoodsStack, make_card, start_goods
from svcard.host.kit.db import first_row
from svcard.host.kit.serving import ServerThread
from svcard.host.terminal.reader_specs import open_reader

SERIAL = 74_001


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GoodsStack]:
    s = start_goods(tmp_path_factory.mktemp("goods-loose"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


# --- 1. a peer's definite refusal is passed on with its status -------------------------------
def test_a_proof_nobody_asked_for_is_a_409_at_the_device_not_a_502(stack: GoodsStack) -> None:
    """The payment server's 409 (no purchase of this card at this counter answered with that
    MAC2) reached the device as the authentication server's 502 "payment answered 409": a
    device took a final refusal for a server still to answer."""
    device = stack.device()
    with pytest.raises(DeviceError) as refused:
        device._prove(f"{SERIAL:020d}", 7, b"\x00" * 4, b"\x00" * 4)
    assert getattr(refused.value, "status", None) == 409, str(refused.value)
    assert "no purchase" in str(refused.value) and "502" not in str(refused.value)
    assert refused.value.final


def test_a_purse_debit_for_an_order_declined_elsewhere_is_final(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    """A purse debit the payment server refuses (the INITIALIZE answer says the balance is
    below the amount): the device hears 409 with the payment server's reason."""
    path = make_card(tmp_path, SERIAL + 1, ep=EP)
    device = stack.device()
    first = first_for(stack, http, device)
    with open_reader(f"virtual:{path}") as reader:
        init = bytes(4) + init_capp(reader, first)[4:]   # the balance field: 0
    from svcard.host.goods.server.auth import digest
    with pytest.raises(DeviceError) as refused:
        device._post("/v1/purse/debits", W.PURSE_DEBIT, {
            "order": first.order, "device": device.id, "card": f"{SERIAL + 1:020d}",
            "issuer": "0102030405060708", "first": digest(first.text),
            "init": init.hex().upper(), "uid": "", "created": now()})
    assert getattr(refused.value, "status", None) == 409, str(refused.value)
    assert "balance" in str(refused.value)


# --- 2 and 3: offers expire; routing retried, then declined ----------------------------------
OFFER_S, ROUTE_S = 120, 60


@pytest.fixture(scope="module")
def timed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GoodsStack, list[float]]]:
    """A stack whose servers' clock the test moves (``offset[0]`` seconds ahead)."""
    offset = [0.0]
    s = start_goods(tmp_path_factory.mktemp("goods-loose-timed"),
                    clock=lambda: time.time() + offset[0], offer_seconds=OFFER_S,
                    route_seconds=ROUTE_S)
    try:
        yield s, offset
    finally:
        s.close()


def merchant_state(stack: GoodsStack, http: httpx.Client, order: str) -> str:
    return str(http.get(f"{stack.url('merchant')}/v1/orders/{order}").json()["state"])


def payment_state(stack: GoodsStack, order: str) -> str:
    found = first_row(stack.engine("payment"), D.payment_orders, order_ref=order)
    assert found is not None
    return str(found["state"])


def test_a_new_offer_is_seen_past_sixteen_unanswered_ones_and_offers_expire(
        timed: tuple[GoodsStack, list[float]], http: httpx.Client) -> None:
    """A device's poll showed its 16 oldest offered first messages and offers never expired:
    with 16 unanswered orders a device never saw a new one."""
    stack, offset = timed
    device = stack.device()
    orders = []
    for _ in range(MAX_OFFERED + 1):
        answer = stack.order(http, "coupon", device)
        assert answer.status_code == 200, answer.text
        orders.append(answer.json()["order"])
    shown = [f.order for f in device.poll(wait=0)]
    assert len(shown) == MAX_OFFERED and orders[-1] in shown, "the newest offer is hidden"
    offset[0] += OFFER_S + 1
    try:
        assert device.poll(wait=0) == []                  # expired offers are not shown
        asyncio.run(stack.servers["payment"].recover())   # the payment server's clock
        for order in (orders[0], orders[-1]):
            assert payment_state(stack, order) == D.EXPIRED
            assert merchant_state(stack, http, order) == D.EXPIRED
        fresh = stack.order(http, "coupon", device).json()["order"]
        assert [f.order for f in device.poll(wait=0)] == [fresh]
    finally:
        offset[0] -= OFFER_S + 1


def test_an_expired_order_cannot_be_authorised(
        timed: tuple[GoodsStack, list[float]], http: httpx.Client, tmp_path: Path) -> None:
    stack, offset = timed
    path = make_card(tmp_path, SERIAL + 2, ep=EP)
    stack.account(f"acct-{SERIAL + 2}", SERIAL + 2)
    device = stack.device()
    first = first_for(stack, http, device, "coupon")
    offset[0] += OFFER_S + 1
    try:
        asyncio.run(stack.servers["payment"].recover())
        assert payment_state(stack, first.order) == D.EXPIRED
        with open_reader(f"virtual:{path}") as reader, pytest.raises(DeviceError) as refused:
            device.authorise(reader, first, "123456")
    finally:
        offset[0] -= OFFER_S + 1
    assert refused.value.status == 410 and "expired" in str(refused.value), str(refused.value)
    assert payment_state(stack, first.order) == D.EXPIRED


def test_an_order_routed_while_the_authentication_server_was_down_is_routed_later(
        timed: tuple[GoodsStack, list[float]], http: httpx.Client) -> None:
    """Orders whose routing failed stayed ``routed`` forever at the merchant and the payment
    server, never offered."""
    stack, _ = timed
    device = stack.device()
    auth_down(stack)
    try:
        answer = stack.order(http, "coupon", device)
    finally:
        auth_up(stack)
    assert answer.status_code == 502, answer.text
    [order] = [r.order_ref for r in rows_of(stack, device.id)]
    asyncio.run(stack.servers["payment"].recover())
    assert [f.order for f in device.poll(wait=0)] == [order]
    assert payment_state(stack, order) == D.ROUTED


def test_an_order_never_routed_is_declined_after_route_seconds(
        timed: tuple[GoodsStack, list[float]], http: httpx.Client) -> None:
    stack, offset = timed
    device = stack.device()
    auth_down(stack)
    try:
        assert stack.order(http, "coupon", device).status_code == 502
        [order] = [r.order_ref for r in rows_of(stack, device.id)]
        asyncio.run(stack.servers["payment"].recover())      # still down: still routed
        assert payment_state(stack, order) == D.ROUTED
        offset[0] += ROUTE_S + 1
        try:
            asyncio.run(stack.servers["payment"].recover())
        finally:
            offset[0] -= ROUTE_S + 1
    finally:
        auth_up(stack)
    assert payment_state(stack, order) == D.DECLINED
    assert merchant_state(stack, http, order) == D.DECLINED
    assert device.poll(wait=0) == []


def auth_down(stack: GoodsStack) -> None:
    stack.threads["auth"].stop()


def auth_up(stack: GoodsStack) -> None:
    port = stack.threads["auth"].port
    stack.threads["auth"] = ServerThread(stack.servers["auth"].app(), port=port).start()


def rows_of(stack: GoodsStack, device: str) -> list[Any]:
    t = D.payment_orders
    with stack.engine("payment").connect() as conn:
        return list(conn.execute(select(t.c.order_ref).where(t.c.device == device)).all())


# --- 4. one open purse session per device ----------------------------------------------------
def open_debit(device: Device, first: FirstMessage, path: Path, serial: int) -> dict[str, Any]:
    """INITIALIZE FOR CAPP on the card at ``path`` and its answer relayed (a session opened at
    the payment server, its PSAM record made); nothing sent to the card after."""
    with open_reader(f"virtual:{path}") as reader:
        init = init_capp(reader, first)
    return device._post("/v1/purse/debits", W.PURSE_DEBIT,
                        debit_message(device, first, f"{serial:020d}", init))


def test_a_device_holds_one_open_purse_session_at_a_time(
        timed: tuple[GoodsStack, list[float]], http: httpx.Client, tmp_path: Path) -> None:
    """INITIALIZE answers need no card: a device opened 8 PSAM sessions per order for as many
    orders as it liked (600 a minute). Now a second open session is 429 until the first is
    proved or abandoned; a retry of the same order supersedes its own."""
    stack, offset = timed
    one, two = make_card(tmp_path, SERIAL + 3, ep=EP), make_card(tmp_path, SERIAL + 4, ep=EP)
    device = stack.device()
    first_a = first_for(stack, http, device)
    first_b = first_for(stack, http, device)
    open_debit(device, first_a, one, SERIAL + 3)
    open_debit(device, first_a, one, SERIAL + 3)         # a retry: the same order, card, counter
    with pytest.raises(DeviceError) as refused:
        open_debit(device, first_b, two, SERIAL + 4)
    assert refused.value.status == 429, str(refused.value)
    assert payment_state(stack, first_b.order) == D.ROUTED   # nothing changed
    other = stack.device()                                  # another device is not held up
    out = open_debit(other, first_for(stack, http, other), two, SERIAL + 4)
    assert out["debit"]
    offset[0] += 31                                          # the first one abandoned
    try:
        with open_reader(f"virtual:{two}") as reader:
            paid = device.pay_with_purse(reader, first_b)
    finally:
        offset[0] -= 31
    assert paid.paid and paid.written, paid
    assert payment_state(stack, first_b.order) == D.PURSE_PAID


def test_a_proved_purchase_frees_the_device_at_once(
        timed: tuple[GoodsStack, list[float]], http: httpx.Client, tmp_path: Path) -> None:
    stack, _ = timed
    card = make_card(tmp_path, SERIAL + 5, ep=EP)
    device = stack.device()
    first_a, first_b = first_for(stack, http, device), first_for(stack, http, device)
    with open_reader(f"virtual:{card}") as reader:
        assert device.pay_with_purse(reader, first_a).written
        assert device.pay_with_purse(reader, first_b).written
    assert ep(card) == EP - 2 * 1250


def test_racing_opens_of_one_device_open_one_session(
        timed: tuple[GoodsStack, list[float]], http: httpx.Client, tmp_path: Path) -> None:
    """Four orders' sessions opened at once by one device: the bound is checked in the step
    that opens a session, so exactly one opens."""
    from concurrent.futures import ThreadPoolExecutor
    stack, _ = timed
    device = stack.device()
    firsts = [first_for(stack, http, device) for _ in range(4)]
    cards = [make_card(tmp_path, SERIAL + 10 + i, ep=EP) for i in range(4)]
    inits = []
    for first, path in zip(firsts, cards, strict=True):
        with open_reader(f"virtual:{path}") as reader:
            inits.append(init_capp(reader, first))

    def one(i: int) -> int:
        try:
            device._post("/v1/purse/debits", W.PURSE_DEBIT,
                         debit_message(device, firsts[i], f"{SERIAL + 10 + i:020d}", inits[i]))
        except DeviceError as exc:
            return exc.status
        return 200

    with ThreadPoolExecutor(4) as pool:
        codes = sorted(pool.map(one, range(4)))
    assert codes == [200, 429, 429, 429], codes
    s = D.purse_sessions
    with stack.engine("payment").connect() as conn:
        opened = conn.execute(select(s.c.order_ref).where(
            s.c.order_ref.in_([f.order for f in firsts]), s.c.state == D.OPEN)).all()
    assert len(opened) == 1


# --- 5. pick-up names every good the card holds ----------------------------------------------
def test_a_pickup_names_more_than_64_held_goods(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    """``held`` was capped at 64 keys while a card holds up to 4 x 254 goods: a card with
    more got goods it held written again. Now the keys go as one string, up to MAX_HELD."""
    import secrets

    from svcard.host.goods.device import Outcome
    serial = SERIAL + 20
    path = make_card(tmp_path, serial, ep=EP)
    stack.account(f"acct-{serial}", serial)
    device = stack.device()
    first = first_for(stack, http, device, "coupon")
    device._write = lambda card, order, _serial, apdu: Outcome(order, True)  # type: ignore
    with open_reader(f"virtual:{path}") as reader:
        assert device.authorise(reader, first, "123456").paid     # paid, the write not sent
    mine = str(first.fields["record"])[4:36]
    others = [secrets.token_hex(16).upper() for _ in range(W.MAX_HELD - 1)]
    held = "".join(sorted([*others, mine]))
    answer = device._post("/v1/pickups", W.PICKUP, {
        "device": device.id, "card": f"{serial:020d}", "issuer": "0102030405060708",
        "challenge": "00000000", "held": held, "created": now()})
    assert answer["held"] == 1 and answer.get("apdu") is None, answer
    good = first_row(stack.engine("fulfil"), D.goods, order_ref=first.order)
    assert good is not None and good["state"] == D.WRITTEN
    with pytest.raises(DeviceError) as refused:                   # one key too many
        device._post("/v1/pickups", W.PICKUP, {
            "device": device.id, "card": f"{serial:020d}", "issuer": "0102030405060708",
            "challenge": "00000000", "held": held + mine, "created": now()})
    assert refused.value.status in (400, 413), str(refused.value)


# --- 6. the fulfilment server's file holds the goods key only ----------------------------------
def test_the_fulfilment_server_reads_a_file_of_the_goods_key_only(tmp_path: Path) -> None:
    """It loaded the whole demo issuer file (purchase, load and TAC master keys) to use its
    [goods_key]; now `svcard goods init` writes goods-key.toml, goods.toml names it, and an
    issuer file is still taken, only its [goods_key] read and kept."""
    import stat

    from svcard.card.personalise import load_issuer
    from svcard.host.goods.config import goods_config
    from svcard.host.goods.server.fulfil import FulfilServer, key_service
    from svcard.host.goods.stack import write_system
    from svcard.host.terminal.goods_key import GoodsKeyService
    path = write_system(tmp_path / "sys")
    config = goods_config(path, "fulfil")
    assert config.goods_issuer == tmp_path / "sys" / "goods-key.toml"
    text = config.goods_issuer.read_text()
    issuer = load_issuer(tmp_path / "sys" / "goods-issuer.toml")
    assert "goods_key" in text and "purchase_keys" not in text and "tac" not in text
    assert issuer.tac.hex().upper() not in text.upper()
    assert stat.S_IMODE(config.goods_issuer.stat().st_mode) == 0o600
    serial, challenge, record = bytes(range(10)), b"\x01\x02\x03\x04", bytes(40)
    want = GoodsKeyService.from_issuer(issuer).mac(serial, challenge, 0xDC, 1, 0x8C, record)
    for source in (config.goods_issuer, tmp_path / "sys" / "goods-issuer.toml"):
        assert key_service(source).mac(serial, challenge, 0xDC, 1, 0x8C, record) == want
    server = FulfilServer(config)
    try:
        assert server.keys.mac(serial, challenge, 0xDC, 1, 0x8C, record) == want
    finally:
        server.close()
    bad = tmp_path / "no-key.toml"
    bad.write_text('issuer_id = "0102030405060708"\n')
    with pytest.raises(ValueError, match=r"no-key\.toml: goods_key"):
        key_service(bad)
