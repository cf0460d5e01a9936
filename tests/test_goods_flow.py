"""Seed 000, paid by a bank account: the five goods servers on loopback, a registered device,
real card images; the good is written onto the card by secure messaging in 2 round trips."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from svcard.host.goods import db as D
from svcard.host.goods.device import Device
from svcard.host.goods.stack import GoodsStack, make_card, start_goods
from svcard.host.kit.db import first_row
from svcard.host.terminal.capp import read_goods
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import goods as G

SERIAL = 70_001


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


def balance(stack: GoodsStack, account: str = "acc1") -> int:
    row = first_row(stack.engine("bank"), D.accounts, account=account)
    assert row is not None
    return int(row["balance"])


def state(stack: GoodsStack, role: str, order: str) -> str:
    table = {"merchant": D.merchant_orders, "payment": D.payment_orders,
             "auth": D.auth_orders, "fulfil": D.goods}[role]
    row = first_row(stack.engine(role), table, order_ref=order)
    assert row is not None
    return str(row["state"])


def goods_on(card_path: Path) -> list[dict[str, object]]:
    with open_reader(f"virtual:{card_path}") as card:
        return [G.parse(e.record) for e in read_goods(card)]


def buy(stack: GoodsStack, http: httpx.Client, device: Device, card_path: Path,
        sku: str = "ticket", pin: str = "123456") -> str:
    answer = stack.order(http, sku, device)
    assert answer.status_code == 200, answer.text
    order = str(answer.json()["order"])
    firsts = device.poll(wait=5)
    assert [f.order for f in firsts] == [order]
    with open_reader(f"virtual:{card_path}") as card:
        out = device.authorise(card, firsts[0], pin)
    assert out.paid and out.written and out.sw == 0x9000, out
    return order


def test_a_ticket_paid_by_the_bank_is_written_in_two_round_trips(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    card = make_card(tmp_path, SERIAL)
    stack.account("acc1", SERIAL, balance=10_000)
    device = stack.device()
    order = buy(stack, http, device, card)
    assert device.round_trips == 2
    [good] = goods_on(card)
    assert good["kind"] == "ticket" and good["status_name"] == "valid"
    assert good["good_id"] == bytes.fromhex(order)[:8] and good["value"] == 1250
    assert balance(stack) == 10_000 - 1250
    for role, want in (("merchant", "paid"), ("payment", "paid"), ("auth", "paid"),
                       ("fulfil", "written")):
        assert state(stack, role, order) == want, role


def test_coupon_voucher_and_transit_token_each_in_its_file(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    card = make_card(tmp_path, SERIAL)
    stack.account("acc1", SERIAL, balance=10_000)
    device = stack.device()
    for sku in ("coupon", "airtime", "rides10"):
        buy(stack, http, device, card, sku)
    kinds = {g["kind"]: g for g in goods_on(card)}
    assert set(kinds) == {"coupon", "voucher", "transit"}
    assert kinds["transit"]["rides_left"] == 10 and kinds["transit"]["fare"] == 200
    assert kinds["voucher"]["value"] == 5000
    assert balance(stack) == 10_000 - 100 - 5000 - 2000


def test_declined_by_the_customer_or_for_lack_of_funds_moves_no_money(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    card = make_card(tmp_path, SERIAL)
    stack.account("acc1", SERIAL, balance=1000)
    device = stack.device()
    order = stack.order(http, "ticket", device).json()["order"]   # 1250 > 1000
    [first] = device.poll(wait=5)
    with open_reader(f"virtual:{card}") as reader:
        out = device.authorise(reader, first, "123456")
    assert not out.paid and "insufficient" in out.reason
    assert state(stack, "payment", order) == "declined"
    assert state(stack, "merchant", order) == "declined"
    order2 = stack.order(http, "coupon", device).json()["order"]
    [first2] = device.poll(wait=5)
    with open_reader(f"virtual:{card}") as reader:
        out = device.authorise(reader, first2, "123456", approve=False)
    assert not out.paid
    assert state(stack, "payment", order2) == "declined"
    assert balance(stack) == 1000 and goods_on(card) == []


def test_an_order_for_an_unknown_device_is_not_offered(stack: GoodsStack,
                                                       http: httpx.Client) -> None:
    answer = stack.order(http, "ticket", "ab" * 16)
    assert answer.status_code == 409 and answer.json()["offered"] is False
    with stack.engine("payment").connect() as conn:
        assert conn.execute(select(D.payment_orders.c.state)).scalars().all() == ["declined"]


def test_the_device_command_asks_for_authorisation_and_the_pin(
        stack: GoodsStack, http: httpx.Client, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from svcard.host.cli.main import main
    from svcard.host.goods import wire as W

    card = make_card(tmp_path, SERIAL)
    stack.account("acc1", SERIAL, balance=10_000)
    key = W.new_key()
    W.write_private_key(tmp_path / "device.key", key)
    device = stack.device(key)
    auth = stack.system.peer("auth")
    args = ["device", "wait", "--auth", auth.url, "--auth-id", auth.id, "--auth-key",
            auth.public_key.hex(), "--key", str(tmp_path / "device.key"), "--card",
            f"virtual:{card}", "--wait", "5"]
    order = stack.order(http, "coupon", device).json()["order"]
    said_no = CliRunner().invoke(main, args, input="n\n")
    assert said_no.exit_code == 0, said_no.output
    assert "Authorise this payment?" in said_no.output and "not paid" in said_no.output
    assert state(stack, "payment", order) == "declined" and goods_on(card) == []
    stack.order(http, "coupon", device)
    said_yes = CliRunner().invoke(main, args, input="y\n123456\n")
    assert said_yes.exit_code == 0, said_yes.output
    assert "Card PIN" in said_yes.output and "good written onto the card" in said_yes.output
    assert "123456" not in said_yes.output
    assert [g["kind"] for g in goods_on(card)] == ["coupon"]
