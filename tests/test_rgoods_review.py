"""R-goods: the seed-000 goods servers reviewed as an attacker and a payment engineer. Each test
is a break found in the review (it failed before its fix): money taken with no good and no
refund, or a confirmation signed for what the institution did not do."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from pcsc_env import wait_for
from pg_env import start_cluster
from sqlalchemy import text, update
from test_goods_attack import authorisation, challenge_of, offered
from test_goods_flow import balance, goods_on, state

from svcard.host.goods import db as D
from svcard.host.goods import wire as W
from svcard.host.goods.device import DeviceError
from svcard.host.goods.server.auth import AuthServer
from svcard.host.goods.server.bank import BankServer
from svcard.host.goods.server.common import REPLY, Unreachable
from svcard.host.goods.server.payment import PaymentServer
from svcard.host.goods.stack import GoodsStack, make_card, start_goods
from svcard.host.kit.db import first_row
from svcard.host.terminal.reader_specs import open_reader

A, B = 70_021, 70_022
SERIAL_A, SERIAL_B = f"{A:020d}", f"{B:020d}"
TICKET = 1250   # the demo ticket's price


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[GoodsStack]:
    s = start_goods(tmp_path / "servers")
    try:
        yield s
    finally:
        s.close()


def bank_of(stack: GoodsStack) -> BankServer:
    bank = stack.servers["bank"]
    assert isinstance(bank, BankServer)
    return bank


def payment_of(stack: GoodsStack) -> PaymentServer:
    pay = stack.servers["payment"]
    assert isinstance(pay, PaymentServer)
    return pay


def payment_message(stack: GoodsStack, order: str, card: str, pin: str = "123456",
                    ) -> dict[str, Any]:
    return {"order": order, "card": card, "amount": TICKET,
            "currency": stack.system.currency_code, "merchant": "merchant1",
            "pin": W.seal_pin(stack.system.seal_key, pin, order, card),
            "created": int(time.time())}


def test_a_second_payment_of_a_paid_order_is_never_declined(stack: GoodsStack) -> None:
    """Two payments of one order (an authorisation retried while the first is at the bank) both
    read "no payment yet" before either debits: the second then found the balance spent by
    the first and answered a FINAL "insufficient funds" for an order it had paid; the payment
    server took that and declined the order, money gone, no good, no refund."""
    stack.account("acc1", A, balance=TICKET)   # enough for one good
    bank = bank_of(stack)
    account = first_row(bank.engine, D.accounts, account="acc1")
    assert account is not None
    data = payment_message(stack, "ab" * 16, SERIAL_A)
    first = bank._debit(data, account["id"], True)     # both past the read of `done`
    second = bank._debit(data, account["id"], True)
    assert first["paid"] is True
    assert second == first
    assert balance(stack) == 0


def test_a_repeated_payment_naming_another_card_is_not_confirmed_for_that_card(
        stack: GoodsStack) -> None:
    """A repeated order was answered with the card the REQUEST named, unchecked (and before
    the PIN): the institution signed a confirmation "paid for card B" for a payment made from
    card A's account, with no PIN of card B."""
    stack.account("acc1", A)
    bank = bank_of(stack)
    order = "cd" * 16
    paid = asyncio.run(bank._pay(payment_message(stack, order, SERIAL_A)))
    assert paid["paid"] is True and paid["card"] == SERIAL_A
    again = asyncio.run(bank._pay(payment_message(stack, order, SERIAL_B, pin="000000")))
    assert not (again.get("paid") is True and again.get("card") == SERIAL_B)


def test_a_payment_made_while_a_wrong_pin_reset_the_order_still_pays_the_order(
        stack: GoodsStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two authorisations of one order with the same card, one with a wrong PIN: the wrong
    one's answer put the order back to ``routed`` (the device may retry) while the right one
    was at the bank; the bank's signed "paid" then found no ``authorising`` order, was dropped
    (the compare-and-set's result unread) and the device told "not paid": money taken, the
    order not paid, nothing to refund."""
    stack.account("acc1", A)
    card = make_card(tmp_path / "cards", A)
    pay = payment_of(stack)
    auth = stack.servers["auth"]
    assert isinstance(auth, AuthServer)
    real = pay.send_raw

    async def racing(role: str, path: str, domain: bytes, payload: Any,
                     http: httpx.AsyncClient | None = None) -> tuple[dict[str, Any], str, str]:
        out = await real(role, path, domain, payload, http)
        if role == "bank":   # the wrong PIN's decline lands first, here and at the auth server
            await pay.sql(pay._set, payload["order"], D.AUTHORISING, D.ROUTED, card=None)
            auth._set(payload["order"], D.AUTHORISED, D.OFFERED, authorisation=None)
        return out

    monkeypatch.setattr(pay, "send_raw", racing)
    device = stack.device()
    with httpx.Client(timeout=30) as http:
        assert stack.order(http, "ticket", device).status_code == 200
    [first] = device.poll(wait=5)
    with open_reader(f"virtual:{card}") as reader:
        outcome = device.authorise(reader, first, "123456")
    assert balance(stack, "acc1") == 100_000 - TICKET
    assert state(stack, "payment", first.order) == D.PAID
    assert outcome.paid and outcome.written
    assert len(goods_on(card)) == 1
    assert state(stack, "auth", first.order) == D.PAID   # not offered again to the device
    assert device.poll(wait=0) == []


def queued(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted"))
                   .scalar_one())


def test_wrong_pins_raced_on_postgresql_block_the_account_after_three(tmp_path: Path) -> None:
    """The PIN's failure count was read, then written as that value + 1: on PostgreSQL (read
    committed, one thread per call) wrong PINs of parallel orders (anyone may order for a
    card's public serial through their own device) each wrote 1, so the 3-try lockout never
    came: unlimited PIN guessing. Six wrong PINs queued on the account's row must block it."""
    cluster = start_cluster()
    try:
        s = start_goods(tmp_path / "servers", db_urls={"bank": cluster.new_database()})
        try:
            s.account("acc1", A)
            bank = bank_of(s)
            a = D.accounts
            account = first_row(bank.engine, a, account="acc1")
            assert account is not None
            guesses = [payment_message(s, f"{i:032x}", SERIAL_A, pin="000000")
                       for i in range(6)]
            with bank.engine.connect() as holder, ThreadPoolExecutor(6) as pool:
                held = holder.begin()   # the six meet at the row, as parallel requests do
                holder.execute(update(a).where(a.c.id == account["id"]).values(
                    updated=a.c.updated))
                futures = [pool.submit(bank._debit, g, account["id"], False) for g in guesses]
                wait_for(lambda: queued(bank.engine) >= 6, "six guesses queued at the row")
                held.commit()
                answers = [f.result(timeout=60) for f in futures]
            after = first_row(bank.engine, a, account="acc1")
            assert after is not None
            assert not any(x["paid"] for x in answers)
            assert after["state"] == "blocked" and after["pin_failures"] == 3
        finally:
            s.close()
    finally:
        cluster.stop()


def test_a_payment_whose_answer_was_lost_is_found_by_the_payment_servers_recovery(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The institution paid and its answer was lost (the link, or the payment server killed
    after the bank committed): the order stayed ``authorising`` and recovery only looked at
    ``paid`` orders, so unless the device came back the account stayed debited with no good
    and no refund. Recovery now asks the institution about old ``authorising`` orders: the
    good is kept for pick-up and refunded at its deadline."""
    offset = [0.0]
    s = start_goods(tmp_path / "servers", clock=lambda: time.time() + offset[0])
    try:
        s.account("acc1", A)
        card = make_card(tmp_path / "cards", A)
        pay = payment_of(s)
        real = pay.send_raw

        async def lost(role: str, path: str, domain: bytes, payload: Any,
                       http: httpx.AsyncClient | None = None) -> tuple[dict[str, Any], str, str]:
            out = await real(role, path, domain, payload, http)
            if path == "/v1/payments":
                raise Unreachable("bank: the answer was lost")
            return out

        monkeypatch.setattr(pay, "send_raw", lost)
        device = s.device()
        with httpx.Client(timeout=30) as http:
            assert s.order(http, "ticket", device).status_code == 200
        [first] = device.poll(wait=5)
        with open_reader(f"virtual:{card}") as reader, pytest.raises(DeviceError):
            device.authorise(reader, first, "123456")
        monkeypatch.undo()
        assert balance(s) == 100_000 - TICKET          # the device never comes back
        assert state(s, "payment", first.order) == D.AUTHORISING
        offset[0] = 120.0
        asyncio.run(pay.recover())
        assert state(s, "payment", first.order) == D.PAID
        assert state(s, "fulfil", first.order) == D.PENDING
        offset[0] = s.system.pickup_seconds + 240.0
        assert asyncio.run(s.fulfil.refund_due()) == 1
        assert balance(s) == 100_000 and state(s, "fulfil", first.order) == D.REFUNDED
        assert goods_on(card) == []
    finally:
        s.close()


def test_the_payment_status_is_asked_by_the_payment_server_only_and_changes_nothing(
        stack: GoodsStack) -> None:
    """The recovery's new message: from another party (403) or forged (401) it is refused;
    an order not paid answers unpaid; a paid one answers the confirmation the payment route
    gives (signed as that answer, naming the card that paid); the balance never moves."""
    stack.account("acc1", A)
    bank = bank_of(stack)
    paid_order, other = "ef" * 16, "12" * 16
    asyncio.run(bank._pay(payment_message(stack, paid_order, SERIAL_A)))
    url = f"{stack.url('bank')}/v1/payments/status"

    def ask(order: str, role: str = "payment", key: bytes | None = None) -> httpx.Response:
        body, headers = W.signed(key or stack.keys[role], stack.system.peer(role).id,
                                 W.PAYMENT_STATUS, {"order": order,
                                                    "created": int(time.time())})
        return httpx.post(url, content=body, headers=headers, timeout=10)

    assert ask(paid_order, "fulfil").status_code == 403
    assert ask(paid_order, key=W.new_key()).status_code == 401
    assert ask(paid_order[:-2], key=None).status_code == 400
    unpaid = ask(other)
    assert unpaid.status_code == 200 and unpaid.json() == {"order": other, "paid": False}
    answer = ask(paid_order).json()
    confirmation = answer["confirmation"].encode()
    assert W.verify(W.public_of(stack.keys["bank"]), REPLY + W.PAYMENT, confirmation,
                    answer["confirmation_signature"])
    assert W.canonical_load(confirmation)["card"] == SERIAL_A
    assert balance(stack) == 100_000 - TICKET


def test_a_replayed_wrong_pin_authorisation_counts_once(stack: GoodsStack,
                                                        tmp_path: Path) -> None:
    """Whoever saw a device's authorisation with a wrong PIN could send it again (signed, fresh
    for 300 s, and a wrong PIN puts the order back to ``offered``): each copy counted another
    wrong PIN at the institution, so two copies blocked the card holder's account."""
    stack.account("acc1", A)
    card = make_card(tmp_path / "cards", A)
    device = stack.device()
    first = offered(stack, device)
    reader, challenge = challenge_of(card)
    try:
        body = authorisation(device, first, SERIAL_A, challenge, pin="000000")
        answer = device._post("/v1/authorisations", W.AUTHORISATION, body)
        assert answer["paid"] is False
        for _ in range(2):
            with pytest.raises(DeviceError, match="409"):
                device._post("/v1/authorisations", W.AUTHORISATION, body)
    finally:
        reader.__exit__(None, None, None)
    row = first_row(stack.engine("bank"), D.accounts, account="acc1")
    assert row is not None and row["pin_failures"] == 1 and row["state"] == "active"
    with open_reader(f"virtual:{card}") as r:   # the card holder's own retry still pays
        assert device.authorise(r, first, "123456").paid


def test_the_merchant_takes_paid_after_declined(stack: GoodsStack) -> None:
    """The payment server now takes the institution's "paid" after a racing decline
    (above) and tells the merchant; the merchant took ``paid`` only from ``routed``, so it
    kept showing ``declined`` for an order paid (and its good delivered or refunded)."""
    with httpx.Client(timeout=30) as http:
        answer = stack.order(http, "ticket", "0" * 32)   # no such device: declined
    order = answer.json()["order"]
    assert state(stack, "merchant", order) == D.DECLINED
    body, headers = W.signed(stack.keys["payment"], stack.system.peer("payment").id, W.PAID,
                             {"order": order, "state": "paid", "reason": "paid after all",
                              "created": int(time.time())})
    told = httpx.post(f"{stack.url('merchant')}/v1/paid", content=body, headers=headers,
                      timeout=10)
    assert told.status_code == 200
    assert state(stack, "merchant", order) == D.PAID


class Recording:
    """A reader that records what it is sent (and answers 9000)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def exchange(self, apdu: bytes) -> Any:
        self.sent.append(apdu)

        class Answer:
            sw = 0x9000
            data = b""
        return Answer()


def test_the_device_relays_only_a_goods_write_to_the_card(stack: GoodsStack) -> None:
    """The device sent the card whatever APDU the authentication server's answer named (any
    hex, 5..300 bytes), right after VERIFY PIN: a server (or its key) turned bad could send a
    PIN-verified card any plain command. Only a secure-messaging goods write (04 DC / 04 E2)
    is relayed now; anything else is not sent and the good waits for its pick-up."""
    device = stack.device()
    for apdu in ("805E010003123456", "00A4040008A000000003869807", "8424000004"):
        card = Recording()
        out = device._write(card, "ab" * 16, SERIAL_A, apdu)   # type: ignore[arg-type]
        assert card.sent == [] and not out.written
