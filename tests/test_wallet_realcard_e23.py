"""A real card in embodiments 2 (auto-filled details) and 3 (the VAN), end to end (issue 14).

Real servers on loopback (the wallet stack, seed 002's payment stack, the load stack), a real
card image mailed by the financial system, loaded through the load flow and paying through the
card helper with its journal. The money leaves the purse: the mall's card payment (at the
gateway or through the VAN) is approved only once the purse paid THIS purchase; the financial
system's copy is debited once under ``pay:PURCHASE`` and agrees with the purse and the
member's statement. Attacks: the mall asking before the purse paid, the purse payment of
another purchase, a replay.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import test_wallet_realcard as RC
from test_wallet_realcard import (
    Holder,
    World,
    fin_balance,
    loaded_holder,
    new_purchase,
    pay_purse,
    sign_order,
)

world = RC.world   # the same stack (wallet, payment, load), one per module


def fill(world: World, h: Holder, p: dict[str, Any]) -> dict[str, Any]:
    """The wallet's fill of the real card: number, profile token and the purse checkout."""
    handed = sign_order(world.wallet.mall_key, p) if sign_order is not None else p
    r = h.b.post("/api/fills", {"card": h.card, "purchase": handed,
                                "return_url": f"{world.wallet.url('mall')}/shop/"})
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    assert set(answer) == {"card", "profile", "return_url", "checkout"}   # never the secret
    return answer


def form(h: Holder, filled: dict[str, Any]) -> dict[str, Any]:
    return {"card": h.card, "secret": h.secret, "profile": filled["profile"]}


def gateway_pay(world: World, p: dict[str, Any], f: dict[str, Any]) -> tuple[int, Any]:
    with httpx.Client(timeout=30) as http:
        return world.wallet.mall_link(http).post("/v1/card-payments", {"purchase": p, **f})


def van_pay(world: World, p: dict[str, Any], f: dict[str, Any]) -> tuple[int, Any]:
    with httpx.Client(timeout=30) as http:
        return world.wallet.van_link(http).post("/v1/approvals", {"purchase": p, **f})


def debits_of(world: World, card: str) -> list[tuple[str, int]]:
    db = sqlite3.connect(world.wallet.folder / "wallet-fin.db")
    try:
        return [(str(r[0]), int(r[1])) for r in db.execute(
            "SELECT ref, amount FROM wf_movements WHERE kind='debit' AND result='done' "
            "AND card=? ORDER BY id", (card,))]
    finally:
        db.close()


def statement_closing(world: World, h: Holder, name: str, tmp_path: Path,
                      movements: int) -> dict[str, Any]:
    from test_wallet_faults import wait_for

    from svcard.host.wallet.gateway.journal import day_of, write_statements

    def written() -> list[Path]:
        return [f for f in write_statements(world.wallet.gateway.engine, tmp_path, day_of(
            int(time.time() * 1000))) if f.name.startswith(name)]
    files = wait_for("the statement with every movement", lambda: [
        f for f in written() if len(json.loads(f.read_text())["transactions"]) == movements])
    statement: dict[str, Any] = json.loads(files[0].read_text())
    return statement


def test_embodiment_2_a_real_card_pays_by_its_purse(world: World, tmp_path: Path) -> None:
    h = loaded_holder(world, "e2payer", 5_000)
    try:
        p = new_purchase(1_200)
        filled = fill(world, h, p)
        # the mall's form sent before the purse paid: 409, nothing debited
        status, answer = gateway_pay(world, p, form(h, filled))
        assert status == 409 and "purse has not paid" in answer["reason"], answer
        assert debits_of(world, h.card) == [] and fin_balance(world, h) == 5_000
        # the page has the helper pay the purchase's checkout, then sends the form
        view = pay_purse(world, h, filled["checkout"], h.card)
        assert view["state"] == "paid", view
        assert h.purse_balance() == 3_800
        status, answer = gateway_pay(world, p, form(h, filled))
        assert status == 200 and answer["approved"], answer
        # one debit at the financial system, under the purchase's ref
        [(ref, amount)] = debits_of(world, h.card)
        assert ref.startswith("pay:") and amount == 1_200
        assert fin_balance(world, h) == 3_800 == h.purse_balance()
        # replayed: no second approval, no second debit
        status, answer = gateway_pay(world, p, form(h, filled))
        assert status == 409 and answer.get("state") == "approved", answer
        # the same checkout again: the purse never pays one purchase twice
        assert pay_purse(world, h, filled["checkout"])["state"] == "refused"
        assert h.purse_balance() == 3_800 and len(debits_of(world, h.card)) == 1
        statement = statement_closing(world, h, "e2payer", tmp_path, 2)
        assert [t["amount"] for t in statement["transactions"]] == [5_000, -1_200]
        assert statement["cards"][h.card]["closing"] == 3_800
    finally:
        h.close()


def test_embodiment_2_another_purchases_purse_payment_approves_nothing(world: World) -> None:
    h = loaded_holder(world, "e2other", 5_000)
    try:
        p, q = new_purchase(700), new_purchase(700)
        fp, fq = fill(world, h, p), fill(world, h, q)
        # the purse pays q: p's form (its own profile) is still refused
        assert pay_purse(world, h, fq["checkout"], h.card)["state"] == "paid"
        status, answer = gateway_pay(world, p, form(h, fp))
        assert status == 409 and "purse has not paid" in answer["reason"], answer
        # p's purchase information with q's profile token: not what the wallet filled
        assert gateway_pay(world, p, form(h, fq))[0] in (403, 409)
        # q's form, with p's amount: no match
        assert gateway_pay(world, {**q, "amount": 600, "products": [
            {"sku": "tea", "qty": 1, "price": 600}]}, form(h, fq))[0] in (400, 403, 409)
        assert gateway_pay(world, q, form(h, fq))[0] == 200
        assert h.purse_balance() == 4_300 == fin_balance(world, h)
        assert [a for _, a in debits_of(world, h.card)] == [700]
    finally:
        h.close()


def test_embodiment_3_a_real_card_pays_by_its_purse_through_the_van(
        world: World, tmp_path: Path) -> None:
    h = loaded_holder(world, "e3payer", 5_000)
    try:
        p = new_purchase(900)
        filled = fill(world, h, p)
        # the mall asks the VAN before the purse paid: the financial system refuses, 409
        status, answer = van_pay(world, p, form(h, filled))
        assert status == 409 and not answer["approved"], answer
        assert "purse has not paid" in answer["reason"], answer
        assert debits_of(world, h.card) == [] and fin_balance(world, h) == 5_000
        assert pay_purse(world, h, filled["checkout"], h.card)["state"] == "paid"
        status, answer = van_pay(world, p, form(h, filled))
        assert status == 200 and answer["approved"] and not answer["repeated"], answer
        # replayed: the same outcome, repeated, no second debit
        status, answer = van_pay(world, p, form(h, filled))
        assert status == 200 and answer["repeated"], answer
        assert [a for _, a in debits_of(world, h.card)] == [900]
        assert h.purse_balance() == 4_100 == fin_balance(world, h)
        # a wrong secret on the VAN path: refused as for a virtual card
        status, _ = van_pay(world, p, {**form(h, filled), "secret": "00000000"})
        assert status == 403
        statement = statement_closing(world, h, "e3payer", tmp_path, 2)
        assert [t["amount"] for t in statement["transactions"]] == [5_000, -900]
        assert statement["cards"][h.card]["closing"] == 4_100
    finally:
        h.close()


def test_embodiment_3_another_purchases_purse_payment_approves_nothing(world: World) -> None:
    h = loaded_holder(world, "e3other", 5_000)
    try:
        p, q = new_purchase(800), new_purchase(800)
        fp, fq = fill(world, h, p), fill(world, h, q)
        assert pay_purse(world, h, fq["checkout"], h.card)["state"] == "paid"
        # p asked with its own token: q's payment is not p's
        assert van_pay(world, p, form(h, fp))[0] == 409
        # p's purchase with q's token: the token binds q's purchase
        assert van_pay(world, p, form(h, fq))[0] == 403
        # q with another amount: its token does not verify
        assert van_pay(world, {**q, "amount": 700, "products": [
            {"sku": "tea", "qty": 1, "price": 700}]}, form(h, fq))[0] == 403
        assert van_pay(world, q, form(h, fq))[0] == 200
        assert [a for _, a in debits_of(world, h.card)] == [800]
        assert h.purse_balance() == 4_200 == fin_balance(world, h)
    finally:
        h.close()


def test_raced_and_late_requests_approve_once(world: World) -> None:
    """16 copies of the mall's request at once, at the gateway and at the VAN: one debit, one
    first answer; a purchase its purse paid in time is approved when the mall asks late."""
    from concurrent.futures import ThreadPoolExecutor
    h = loaded_holder(world, "e23race", 6_000)
    try:
        p, q = new_purchase(1_000), new_purchase(1_000)
        fp, fq = fill(world, h, p), fill(world, h, q)
        assert pay_purse(world, h, fp["checkout"], h.card)["state"] == "paid"
        assert pay_purse(world, h, fq["checkout"], h.card)["state"] == "paid"
        with ThreadPoolExecutor(16) as pool:
            at_gateway = list(pool.map(lambda _: gateway_pay(world, p, form(h, fp)), range(16)))
            at_van = list(pool.map(lambda _: van_pay(world, q, form(h, fq)), range(16)))
        assert sum(1 for s, a in at_gateway if s == 200 and a["approved"]) == 1, at_gateway
        assert all(s in (200, 409) for s, _ in at_gateway), at_gateway
        assert all(s == 200 for s, _ in at_van), at_van
        assert sum(1 for _, a in at_van if not a["repeated"]) == 1, at_van
        assert sorted(a for _, a in debits_of(world, h.card)) == [1_000, 1_000]
        assert h.purse_balance() == 4_000 == fin_balance(world, h)
        # paid in time, asked after the purchase expired: approved (the value is the mall's)
        late = {**new_purchase(500), "expires": int((time.time() + 3) * 1000)}
        fl = fill(world, h, late)
        assert pay_purse(world, h, fl["checkout"], h.card)["state"] == "paid"
        deadline = time.monotonic() + 10
        while time.time() * 1000 <= late["expires"] + 50:   # past its expiry
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status, answer = gateway_pay(world, late, form(h, fl))
        assert status == 200 and answer["approved"], answer
        assert h.purse_balance() == 3_500 == fin_balance(world, h)
    finally:
        h.close()


def test_another_card_paying_the_checkout_approves_nothing(world: World) -> None:
    """Another member's real card pays this purchase's checkout (a client naming no card):
    the gateway refuses it as this purchase's payment; the mall is refused both ways."""
    h = loaded_holder(world, "e23own", 3_000)
    other = loaded_holder(world, "e23thief", 3_000)
    try:
        p = new_purchase(600)
        fp = fill(world, h, p)
        view = pay_purse(world, other, fp["checkout"])
        assert view["state"] in ("pending", "refused"), view
        assert gateway_pay(world, p, form(h, fp))[0] == 409
        assert van_pay(world, p, form(h, fp))[0] == 409
        assert h.purse_balance() == 3_000 == fin_balance(world, h)
        assert debits_of(world, h.card) == []
        # a truncated request at the VAN: 400, nothing relayed as a payment
        status, _ = van_pay(world, {k: v for k, v in p.items() if k != "amount"}, form(h, fp))
        assert status == 400
    finally:
        h.close()
        other.close()


def test_the_van_approval_step_raced_on_postgresql() -> None:
    """fin's VAN approval of a real card (check the gateway's debit, record the approval) as
    one step under PostgreSQL, where each copy runs in its own transaction: 16 at once give
    one first approval and 15 repeated, no error; without the gateway's debit, none."""
    from concurrent.futures import ThreadPoolExecutor

    from pg_env import start_cluster
    from sqlalchemy import insert

    from svcard.host.wallet.fin import db as D
    from svcard.host.wallet.fin import ledger as L
    cluster = start_cluster()
    try:
        engine = D.make_engine(cluster.new_database())
        with engine.begin() as conn:
            conn.execute(insert(D.cards).values(
                number="9000000000000017", kind="real", state=D.ACTIVE, balance=400,
                currency=156, secret_digest="0" * 64, failures=0, applicant="0" * 64,
                created=0, updated=0))
            conn.execute(insert(D.movements).values(
                ref="pay:" + "a" * 32, kind="debit", card="9000000000000017",
                source="mall:mall-1", amount=600, currency=156, digest="0" * 64,
                result=D.DONE, reason="", at=0))

        def ask(ref: str) -> L.Outcome | None:
            return L.van_purse_approval(engine, ref, "9000000000000017", "mall:mall-1", 600,
                                        156)
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, ["pay:" + "a" * 32] * 16))
        assert all(a is not None for a in answers)
        assert sum(1 for a in answers if a is not None and not a.repeated) == 1
        assert ask("pay:" + "b" * 32) is None                   # no gateway debit: none
        assert L.van_purse_approval(engine, "pay:" + "a" * 32, "9000000000000017",
                                    "mall:mall-1", 599, 156) is None   # another amount
        engine.dispose()
    finally:
        cluster.stop()
