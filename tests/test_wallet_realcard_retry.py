"""A real card's purse payment asked again (review R-wallet2, issue 14): the purchase's one
order is answered again, with a fresh ticket for the SAME transaction, while it is open; the
payment server takes one draw per transaction, so it stays one debit.

Before: one checkout per purchase, ever. A lost checkout answer, or a card that refused before
its debit (its balance too low), blocked the purchase for good (409 at every later checkout).

And the helper's check that the card in its reader is the one the page named: before, it ran
outside ``reader.transaction()``, so a card swapped in the gap paid (another card's purse
debited for a purchase that stays unpaid).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_wallet_realcard import (
    World,
    approve,
    charge,
    choose,
    fin_balance,
    holder,
    load_card,
    loaded_holder,
    new_purchase,
    pay_purse,
    world,
)

from svcard.host.helper import payments as HP
from svcard.host.pay import client as PC
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.online import PaymentRefused
from svcard.host.terminal.reader_specs import open_reader
from svcard.reader import Reader

__all__ = ["world"]   # the module-scoped servers of test_wallet_realcard, started again here


def raw_checkout(world: World, checkout: str) -> httpx.Response:
    with httpx.Client(timeout=30) as http:
        return http.post(f"{world.wallet.url('web')}/purse/checkout/{checkout}",
                         headers={"X-Svcard-Client": "1"})


def test_a_card_refused_for_its_balance_pays_once_loaded(world: World) -> None:
    """Charged at the financial system but not yet loaded: the purse refuses (9401) before
    any debit. Loaded, the same checkout pays (before: 409, the purchase stuck)."""
    h = holder(world, "retry-low")
    try:
        order = charge(world, h, 5_000)["load"]
        p = new_purchase(1_000)
        r = choose(world, h, p)
        assert r.status_code == 200, r.text
        cp = r.json()["checkout"]
        view = pay_purse(world, h, cp, h.card)
        assert view["state"] == "refused" and "too low" in view["message"], view
        assert h.purse_balance() == 0
        assert load_card(world, h, order)["state"] == "loaded"
        view = pay_purse(world, h, cp, h.card)
        assert view["state"] == "paid", view
        assert h.purse_balance() == 4_000
        assert approve(world, p)[0] == 200
        assert fin_balance(world, h) == 4_000 and h.purse_balance() == 4_000
        # paid: a checkout now is refused, and the purse keeps its value
        assert raw_checkout(world, cp).status_code == 409
        assert pay_purse(world, h, cp, h.card)["state"] == "refused"
        assert h.purse_balance() == 4_000
    finally:
        h.close()


def test_a_lost_checkout_answer_is_answered_again(world: World) -> None:
    h = loaded_holder(world, "retry-lost", 3_000)
    try:
        p = new_purchase(700)
        cp = choose(world, h, p).json()["checkout"]
        lost = raw_checkout(world, cp)     # the helper never saw this answer
        assert lost.status_code == 200, lost.text
        view = pay_purse(world, h, cp, h.card)
        assert view["state"] == "paid" and view["txn_id"] == lost.json()["txn_id"], view
        assert h.purse_balance() == 2_300 and approve(world, p)[0] == 200
    finally:
        h.close()


def test_two_tickets_of_one_transaction_both_tried_one_debit(
        world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two checkout answers of one purchase: the same transaction, two session keys. The
    card pays with the first; the second's draw is refused by the payment server (one draw
    per transaction): the purse is debited once, and so is the financial system's copy."""
    h = loaded_holder(world, "retry-two", 5_000)
    try:
        p = new_purchase(1_200)
        cp = choose(world, h, p).json()["checkout"]
        a, b = raw_checkout(world, cp), raw_checkout(world, cp)
        assert a.status_code == b.status_code == 200
        ta, tb = a.json(), b.json()
        assert ta["txn_id"] == tb["txn_id"] and ta["etsk"] != tb["etsk"]
        url = f"{world.wallet.url('web')}/purse/checkout/{cp}"

        def paying_with(ticket: dict[str, Any], journal: str) -> PC.PaymentOutcome:
            monkeypatch.setattr(PC, "fetch_checkout", lambda *_a, **_k: dict(ticket))
            with httpx.Client(timeout=30) as http, open_reader(f"virtual:{h.image}") as r:
                return PC.pay(url, r, journal=Journal(tmp_path / journal), http=http)

        assert paying_with(ta, "a.journal").amount == 1_200
        assert h.purse_balance() == 3_800
        with pytest.raises(PaymentRefused) as refused:
            paying_with(tb, "b.journal")
        assert refused.value.status == 409, refused.value
        assert h.purse_balance() == 3_800
        assert approve(world, p)[0] == 200
        assert fin_balance(world, h) == 3_800
        # the other order: the second ticket tried first, then the first: one debit still
        q = new_purchase(800)
        cq = choose(world, h, q).json()["checkout"]
        ta, tb = raw_checkout(world, cq).json(), raw_checkout(world, cq).json()
        assert paying_with(tb, "c.journal").amount == 800
        with pytest.raises(PaymentRefused):
            paying_with(ta, "d.journal")
        assert h.purse_balance() == 3_000 and approve(world, q)[0] == 200
        assert fin_balance(world, h) == 3_000
    finally:
        h.close()


class SwappingReader(Reader):
    """Card ``first`` until a transaction begins, then card ``second`` (a person swapped the
    cards just before the helper took the reader for the payment)."""

    def __init__(self, first: Reader, second: Reader) -> None:
        self.first, self.second = first, second
        self.now = first
        self.name = "swapping"

    def connect(self) -> bytes:
        self.second.connect()
        return self.first.connect()

    def disconnect(self) -> None:
        self.first.disconnect()
        self.second.disconnect()

    def transmit(self, apdu: bytes) -> bytes:
        return self.now.transmit(apdu)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.now = self.second
        yield


def test_a_card_swapped_before_the_transaction_is_refused(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    h = loaded_holder(world, "swap-chosen", 3_000)
    other = loaded_holder(world, "swap-other", 3_000)
    try:
        p = new_purchase(900)
        cp = choose(world, h, p).json()["checkout"]
        monkeypatch.setattr(HP, "open_reader", lambda spec: SwappingReader(
            open_reader(f"virtual:{h.image}"), open_reader(f"virtual:{other.image}")))
        view = pay_purse(world, h, cp, h.card)
        assert view["state"] == "refused" and "not the card chosen" in view["message"], view
        assert other.purse_balance() == 3_000 and h.purse_balance() == 3_000
        monkeypatch.undo()
        assert pay_purse(world, h, cp, h.card)["state"] == "paid"
        assert h.purse_balance() == 2_100 and approve(world, p)[0] == 200
    finally:
        h.close()
        other.close()


def test_an_expired_order_is_not_answered_again(world: World) -> None:
    """An order whose ticket expired (the purchase still open): 410, and no new transaction
    is made for the purchase (its one order stays)."""
    from sqlalchemy import update

    from svcard.host.wallet.gateway import purse as PU
    h = loaded_holder(world, "retry-expired", 2_000)
    try:
        p = new_purchase(500)
        cp = choose(world, h, p).json()["checkout"]
        first = raw_checkout(world, cp).json()["txn_id"]
        engine = world.wallet.gateway.engine
        with engine.begin() as conn:
            conn.execute(update(PU.orders).where(PU.orders.c.txn_id == first).values(
                expires=1_000))
        r = raw_checkout(world, cp)
        assert r.status_code == 410 and "expired" in r.json()["reason"], r.text
        with engine.connect() as conn:
            rows = conn.execute(PU.orders.select().where(
                PU.orders.c.purchase == cp[:32])).all()
        assert [row.txn_id for row in rows] == [first]
        assert pay_purse(world, h, cp, h.card)["state"] == "refused"
        assert h.purse_balance() == 2_000
    finally:
        h.close()
