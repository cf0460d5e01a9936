"""Review (R-wallet2) of the wallet's real-card path: the attacker's and the crash cases the
builders' tests did not cover. Each test failed on the code before its fix.

* an approval request racing the member's choice of a real card: the purse evidence was looked
  up before the purchase existed, so the match then approved (and debited the financial
  system's copy) with no purse payment at all, the purse keeping its value;
* a purse that paid before the purchase expired, the mall asking after: 410 ``expired`` while
  the card's value had gone to the mall (and a confirmation brought late by the helper's
  journal was refused 410 though the card had been debited);
* a charge of a real card whose answer was lost: the financial system credited the card, but
  no load order was ever made, so the value could never reach the purse;
* a purse payment whose financial-system debit was missed, never approved: that copy stayed
  above the purse for good;
* another real card paying a purchase (a client naming no card): its copy kept the amount;
* a real card chosen for more than a purse holds: a 500 at the checkout.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_wallet_faults import wait_for
from test_wallet_realcard import (
    World,
    approve,
    choose,
    fin_balance,
    holder,
    load_card,
    loaded_holder,
    new_purchase,
    pay_purse,
    world,
)

from svcard.host.wallet.gateway import matching as X
from svcard.host.wallet.gateway import purse as PU
from svcard.host.wallet.gateway.cardpay import held_by
from svcard.host.wallet.links import LinkClient
from svcard.host.wallet.links import purchase as read_purchase

__all__ = ["world"]   # the module-scoped servers of test_wallet_realcard, started again here


def test_an_approval_racing_the_members_choice_needs_the_purse(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mall's approval request is read while no purchase exists for its order; the
    member's choice of a real card lands before the match. Before: 200 approved, the
    financial system's copy debited, the purse untouched (its value spendable again)."""
    h = loaded_holder(world, "rv2race", 3_000)
    try:
        engine = world.wallet.gateway.engine
        member = held_by(engine, h.card)
        assert member is not None
        p = new_purchase(900)
        real = X.by_order
        fired: list[str] = []

        def racing(eng: Any, mall: str, order: str) -> dict[str, Any] | None:
            found = real(eng, mall, order)
            if found is None and order == p["order"] and not fired:
                fired.append(order)   # the member's choice, stored between look-up and match
                assert X.store_choice(eng, member["member"], h.card, read_purchase(p))
            return found
        monkeypatch.setattr(X, "by_order", racing)
        status, answer = approve(world, p)
        monkeypatch.setattr(X, "by_order", real)
        assert fired and status != 200, (status, answer)
        assert h.purse_balance() == 3_000 and fin_balance(world, h) == 3_000
        # the purchase is still the member's to pay, by the purse: then approved once
        found = X.by_order(engine, p["mall"], p["order"])
        assert found is not None and found["state"] == "chosen"
        checkout = PU.checkout_token(world.wallet.gateway.config.secret_key, found["id"])
        assert pay_purse(world, h, checkout, h.card)["state"] == "paid"
        assert approve(world, p)[0] == 200
        assert h.purse_balance() == 2_100 and fin_balance(world, h) == 2_100
    finally:
        h.close()


def test_a_purse_paid_before_expiry_is_approved_when_the_mall_asks_late(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the purse paid (the value gone to the mall, the financial system's copy
    debited), the mall asked 100 s after the purchase's expiry: 410, never approved."""
    h = loaded_holder(world, "rv2late", 2_000)
    try:
        p, q = new_purchase(600), new_purchase(600)
        checkout = choose(world, h, p).json()["checkout"]
        assert choose(world, h, q).status_code == 200
        assert pay_purse(world, h, checkout, h.card)["state"] == "paid"
        late = p["expires"] + 100_000
        monkeypatch.setattr(world.wallet.gateway, "now_ms", lambda: late)
        status, answer = approve(world, p)
        assert status == 200 and answer["approved"], (status, answer)
        assert approve(world, p)[0] == 409
        assert h.purse_balance() == 1_400 and fin_balance(world, h) == 1_400
        # an unpaid purchase asked late is still expired
        assert approve(world, q)[0] in (409, 410)
        assert h.purse_balance() == 1_400 and fin_balance(world, h) == 1_400
    finally:
        h.close()


def test_a_late_confirmation_of_a_debited_card_is_recorded(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The card paid; its confirmation reached the gateway only from the helper's journal,
    20 minutes after the purchase's expiry. Before: 410, the card's debit never recorded
    (the mall paid, the purchase never approved, the books off by the amount)."""
    from svcard.host.pay import client as PC
    from svcard.host.terminal.journal import Journal
    from svcard.host.terminal.reader_specs import open_reader
    h = loaded_holder(world, "rv2held", 2_500)
    try:
        web = world.wallet.url("web")
        p = new_purchase(1_000)
        cp = choose(world, h, p).json()["checkout"]
        held: list[tuple[str, bytes]] = []

        class Held(httpx.HTTPTransport):
            def handle_request(self, request: httpx.Request) -> httpx.Response:
                if "/v1/purse/status/" in request.url.path:
                    held.append((str(request.url), request.read()))
                    raise httpx.ConnectError("held back by the test", request=request)
                return super().handle_request(request)
        with httpx.Client(timeout=30, transport=Held()) as http, \
                open_reader(f"virtual:{h.image}") as reader, pytest.raises(httpx.HTTPError):
            PC.pay(f"{web}/purse/checkout/{cp}", reader,
                   journal=Journal(Path(world.folder) / "rv2held.pay.journal"), http=http)
        assert h.purse_balance() == 1_500
        late = p["expires"] + 1_200_000
        monkeypatch.setattr(world.wallet.gateway, "now_ms", lambda: late)
        url, confirmation = held[0]
        with httpx.Client(timeout=30) as http:
            r = http.post(url, content=confirmation)
            assert r.status_code == 200 and r.json()["released"], r.text
            # a forged one for the same order is still refused
            assert http.post(url, content=confirmation[:-1] + bytes([confirmation[-1] ^ 1])
                             ).status_code in (400, 409)
        assert approve(world, p)[0] == 200
        assert h.purse_balance() == 1_500 and fin_balance(world, h) == 1_500
    finally:
        h.close()


def test_a_real_cards_charge_whose_answer_was_lost_still_loads(world: World) -> None:
    """The financial system charged the card (the account debited, the card's copy
    credited) and its answer to the gateway was lost. Before: no load order, ever (the
    report of the movement made none), so the value never reached the purse."""
    h = holder(world, "rv2lost")
    try:
        gateway = world.wallet.gateway
        member = held_by(gateway.engine, h.card)
        assert member is not None
        given = "page-ref-lost-1"
        ref = hashlib.sha256(f"{member['member']}\n{given}".encode()).hexdigest()[:32]
        with httpx.Client(timeout=30) as http:
            status, answer = LinkClient(http, world.wallet.url("fin"), gateway.config.party,
                                        gateway.config.fin_key).post("/v1/charges", {
                "ref": "charge:" + ref, "card": h.card, "kind": "account",
                "source": h.account, "amount": 600, "currency": 156,
                "applicant": gateway.applicant(member["member"])})
        assert status == 200 and answer["result"] == "done", answer
        loads = wait_for("the load order made from the charge's report",
                         lambda: h.b.wallet()["loads"], timeout=10)
        assert [x["amount"] for x in loads] == [600]
        # the page asks again with its own ref: the same order, not a second one
        r = h.b.post("/api/charges", {"kind": "account", "card": h.card, "source": h.account,
                                      "amount": 600, "currency": 156, "ref": given})
        assert r.status_code == 200 and r.json()["load"]["account"] == loads[0]["account"]
        assert len(h.b.wallet()["loads"]) == 1
        assert load_card(world, h, loads[0])["state"] == "loaded"
        assert h.purse_balance() == 600 and fin_balance(world, h) == 600
        assert h.b.wallet()["loads"] == []
    finally:
        h.close()


def test_a_purse_payment_whose_mirror_was_missed_is_mirrored_at_restart(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The purse paid and the gateway recorded it, but the financial system was not reached
    for its copy's debit (or the gateway died just after recording: crash point
    gateway-after-purse-paid), and the mall never asks. Before: the financial system's
    copy kept the amount the purse had paid away, for good (its balance and the member's
    statement above the purse); now the gateway's start asks for that debit again."""
    import asyncio
    h = loaded_holder(world, "rv2mirror", 2_000)
    try:
        gateway = world.wallet.gateway
        p = new_purchase(500)
        checkout = choose(world, h, p).json()["checkout"]

        async def unreachable(path: str, data: dict[str, Any]) -> tuple[int, Any]:
            return 0, {}
        monkeypatch.setattr(gateway, "ask_fin_quietly", unreachable)
        assert pay_purse(world, h, checkout, h.card)["state"] == "paid"
        monkeypatch.undo()
        assert h.purse_balance() == 1_500 and fin_balance(world, h) == 2_000
        asyncio.run(gateway.recover())            # what the gateway does at each start
        assert fin_balance(world, h) == 1_500
        asyncio.run(gateway.recover())            # asked again: the same ref, one debit
        assert fin_balance(world, h) == 1_500
        assert approve(world, p)[0] == 200 and fin_balance(world, h) == 1_500
    finally:
        h.close()


def test_another_real_card_paying_a_purchase_is_debited_in_the_books(world: World) -> None:
    """A client naming no card pays member A's purchase with B's real card: the payment
    server debits B's purse for A's mall (W1's open case). The gateway still refuses it as
    the purchase's payment, but before, B's financial-system copy kept the amount its purse
    had paid (B's balance and statement 1,000 above the purse, for good)."""
    h = loaded_holder(world, "rv2chosen", 3_000)
    other = loaded_holder(world, "rv2other", 3_000)
    try:
        p = new_purchase(1_000)
        checkout = choose(world, h, p).json()["checkout"]
        view = pay_purse(world, other, checkout)          # no card named
        assert view["state"] in ("pending", "refused"), view
        assert other.purse_balance() == 2_000
        assert fin_balance(world, other) == other.purse_balance()
        assert h.purse_balance() == 3_000 and fin_balance(world, h) == 3_000
        assert approve(world, p)[0] == 409                 # A's purchase: not paid
        # the helper again (its journal closed that payment: the checkout is refused)
        assert pay_purse(world, other, checkout)["state"] in ("pending", "refused")
        assert fin_balance(world, other) == 2_000 == other.purse_balance()
    finally:
        h.close()
        other.close()


def test_a_real_card_is_not_chosen_for_more_than_its_purse_can_hold(world: World) -> None:
    """A signed purchase of 50,000,000.00 (under the wallet's bound, above any purse's and
    the payment ticket's 32-bit amount) chosen with a real card. Before: stored, then the
    card helper's checkout was a 500 (the ticket could not be built), the purchase stuck."""
    h = holder(world, "rv2huge")
    try:
        amount = 5_000_000_000
        p = new_purchase(amount)
        r = choose(world, h, p)
        assert r.status_code == 400 and "amount" in r.json()["reason"], r.text
        assert X.by_order(world.wallet.gateway.engine, p["mall"], p["order"]) is None
    finally:
        h.close()


def test_two_malls_named_with_one_merchant_id_do_not_lose_a_payment(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The [purse] section names another mall first with the same merchant id (another key).
    Before: the confirmation was opened under the first mall's key found by merchant id,
    so this mall's card payment was 'forged' (400): the card debited, nothing recorded."""
    import os
    h = loaded_holder(world, "rv2twomalls", 2_000)
    try:
        settings = world.wallet.gateway.config.purse
        merchant_id = settings.merchants[p_mall := new_purchase()["mall"]][0]
        monkeypatch.setattr(settings, "merchants", {
            "OTHERMALL": (merchant_id, os.urandom(32)), **settings.merchants})
        p = new_purchase(400)
        assert p["mall"] == p_mall
        checkout = choose(world, h, p).json()["checkout"]
        view = pay_purse(world, h, checkout, h.card)
        assert view["state"] == "paid", view
        assert approve(world, p)[0] == 200
        assert h.purse_balance() == 1_600 and fin_balance(world, h) == 1_600
    finally:
        h.close()
