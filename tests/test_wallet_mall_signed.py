"""Mall-signed orders (issue 14's known limit): the purchase the mall's page hands the wallet
carries the mall's signature, and the gateway stores a wallet's choice (embodiment 1) or fill
(2 and 3) only for a purchase its mall signed, bound to the customer id at the mall.

Attacks: an unsigned, forged or altered purchase; mall B's key signing mall A's order; another
member filing a customer's order first (with a copy of the signed purchase); the signed
purchase replayed after it expired or after it was paid; members racing to take one customer
id. Each is refused with nothing stored, and the customer's own choice still pays once."""

from __future__ import annotations

import copy
import secrets
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from test_wallet_attack import approve, debits, mutations, new_purchase
from test_wallet_network import balance, issue, member, topup

from svcard.host.kit.http import Refused
from svcard.host.wallet.gateway.matching import ORDER_DOMAIN, sign_order, signed_purchase
from svcard.host.wallet.links import purchase as read_purchase
from svcard.host.wallet.stack import MALL, Browserless, WalletStack, start_wallet


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WalletStack]:
    s = start_wallet(tmp_path_factory.mktemp("wallet-signed"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def send(stack: WalletStack, b: Browserless, card: dict[str, Any], p: dict[str, Any],
         way: str = "choose") -> httpx.Response:
    """What the wallet page sends, with ``p`` exactly as given (signed or not)."""
    back = f"{stack.url('mall')}/shop/?order={p['order']}"
    if way == "choose":
        return b.post("/api/purchases", {"card": card["number"], "secret": card["secret"],
                                         "purchase": p, "return_url": back})
    return b.post("/api/fills", {"card": card["number"], "purchase": p, "return_url": back})


def stored(stack: WalletStack, order: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(stack.folder / "wallet-gateway.db")
    try:
        return list(db.execute("SELECT member, state FROM wg_purchases WHERE mall_order=?",
                               (order,)))
    finally:
        db.close()


def payer(stack: WalletStack, name: str, amount: int = 50_000) -> tuple[Browserless,
                                                                         dict[str, Any]]:
    b = member(stack, name)
    card = issue(b)
    topup(stack, card["number"], amount, "cash-" + name)
    return b, card


@pytest.mark.parametrize("way", ["choose", "fill"])
def test_an_unsigned_or_forged_purchase_is_not_stored(stack: WalletStack, http: httpx.Client,
                                                      way: str) -> None:
    b, card = payer(stack, f"signed-u-{way}")
    p = new_purchase()
    good = sign_order(stack.mall_key, p)
    forged = [("unsigned", p),
              ("random signature", {**p, "signature": secrets.token_hex(32)}),
              ("another key's", sign_order(secrets.token_bytes(32), p)),
              ("the VAN link key's", sign_order(stack.van_mall_key, p)),
              ("upper-case hex", {**p, "signature": good["signature"].upper()}),
              ("truncated", {**p, "signature": good["signature"][:-2]}),
              ("not text", {**p, "signature": 7})]
    for name, q in forged:
        r = send(stack, b, card, q, way)
        assert r.status_code == 403 and "signed" in r.json()["reason"], (name, r.text)
        assert stored(stack, p["order"]) == [], name
    # the mall's own signed purchase is stored, and (embodiment 1) approved once
    assert send(stack, b, card, good, way).status_code == 200
    assert [s for _, s in stored(stack, p["order"])] == ["chosen" if way == "choose"
                                                          else "filled"]
    if way == "choose":
        before = balance(b, card["number"])
        assert approve(stack, http, p)[0] == 200
        assert balance(b, card["number"]) == before - p["amount"]
    b.close()


def test_each_field_changed_after_signing_is_refused(stack: WalletStack) -> None:
    """The member (or a page in between) alters the signed purchase: 403 for every field."""
    b, card = payer(stack, "signed-fields")
    p = new_purchase()
    signature = sign_order(stack.mall_key, p)["signature"]
    refused = 0
    for name, wrong in mutations(p):
        r = send(stack, b, card, {**wrong, "signature": signature})
        assert r.status_code in (400, 403), (name, r.text)     # 400: not our mall
        refused += 1
        assert stored(stack, wrong["order"]) == [] and stored(stack, p["order"]) == [], name
    assert refused == len(mutations(p))
    assert send(stack, b, card, sign_order(stack.mall_key, p)).status_code == 200
    b.close()


def test_mall_b_cannot_sign_mall_a_orders() -> None:
    """With two malls served, B's key signing a purchase that names A is refused: the
    signature is checked under the key of the mall the purchase names."""
    keys = {"MALLA": secrets.token_bytes(32), "MALLB": secrets.token_bytes(32)}
    p = {**new_purchase(), "mall": "MALLA"}
    assert signed_purchase(keys, sign_order(keys["MALLA"], p)) == read_purchase(p)
    for q in (sign_order(keys["MALLB"], p), {**sign_order(keys["MALLB"], {**p, "mall": "MALLB"}),
                                              "mall": "MALLA"}):
        with pytest.raises(Refused) as caught:
            signed_purchase(keys, q)
        assert caught.value.status == 403
    with pytest.raises(Refused) as caught:          # a mall not served here
        signed_purchase(keys, sign_order(keys["MALLA"], {**p, "mall": "MALLC"}))
    assert caught.value.status == 400
    # the signing key is derived from the link key under its own label: a link MAC is no
    # order signature
    assert ORDER_DOMAIN == b"svcard-wallet-order-v1"


def test_another_member_cannot_file_a_customers_order(stack: WalletStack,
                                                      http: httpx.Client) -> None:
    """Mallory holds a copy of the signed purchase Alice's mall page made for her customer id
    (bound to Alice by her earlier purchase): filing it first is refused, and Alice's own
    choice of it is stored and paid once."""
    alice, a_card = payer(stack, "signed-alice")
    mallory, m_card = payer(stack, "signed-mallory")
    first = new_purchase()
    customer = first["customer"]
    assert send(stack, alice, a_card, sign_order(stack.mall_key, first)).status_code == 200
    p = {**new_purchase(), "customer": customer}
    copy_of = sign_order(stack.mall_key, p)
    for way in ("choose", "fill"):
        r = send(stack, mallory, m_card, copy.deepcopy(copy_of), way)
        assert r.status_code == 403 and "another wallet" in r.json()["reason"], r.text
    assert stored(stack, p["order"]) == []
    done = debits(stack)
    assert send(stack, alice, a_card, copy_of).status_code == 200
    status, answer = approve(stack, http, p)
    assert status == 200 and answer["approved"], answer
    assert debits(stack) == done + 1
    assert balance(mallory, m_card["number"]) == 50_000
    # Mallory's own customer id at the mall keeps working for her
    own = new_purchase()
    assert send(stack, mallory, m_card, sign_order(stack.mall_key, own)).status_code == 200
    alice.close()
    mallory.close()


def test_members_racing_for_one_customer_id_bind_it_once(stack: WalletStack) -> None:
    """Eight members file eight signed orders of ONE new customer id at once: one member gets
    the id (its purchase stored), the seven others are refused."""
    people = [payer(stack, f"signed-race{i}", 1_000) for i in range(8)]
    customer = "shopper-" + secrets.token_hex(4)
    orders = [sign_order(stack.mall_key, {**new_purchase(), "customer": customer})
              for _ in people]

    def one(i: int) -> int:
        return send(stack, people[i][0], people[i][1], orders[i]).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(8)))
    assert codes.count(200) == 1 and sorted(set(codes) - {200}) in ([403], [409], [403, 409]), \
        codes
    holders = {m for o in orders for m, _ in stored(stack, o["order"])}
    assert len(holders) == 1
    for b, _ in people:
        b.close()


def test_a_signed_purchase_replayed_after_expiry_or_payment(stack: WalletStack,
                                                            http: httpx.Client) -> None:
    b, card = payer(stack, "signed-replay")
    # expired: the signed purchase is refused (400), and moving its expiry breaks the signature
    old = new_purchase(expires_in=-5)
    r = send(stack, b, card, sign_order(stack.mall_key, old))
    assert r.status_code == 400 and "expires" in r.json()["reason"], r.text
    later = {**sign_order(stack.mall_key, old), "expires": new_purchase()["expires"]}
    assert send(stack, b, card, later).status_code == 403
    assert stored(stack, old["order"]) == []
    # paid: the same signed purchase again is one order, never a second purchase or debit
    p = new_purchase()
    s = sign_order(stack.mall_key, p)
    assert send(stack, b, card, s).status_code == 200
    assert approve(stack, http, p)[0] == 200
    done = debits(stack)
    for way in ("choose", "fill"):
        assert send(stack, b, card, s, way).status_code == 409
    assert approve(stack, http, p)[0] == 409 and debits(stack) == done
    b.close()


def test_the_demo_mall_signs_its_orders(stack: WalletStack) -> None:
    """The demo mall's page gets its purchase signed; the wallet's choice of it is stored and
    the mall's own (unsigned) record is approved."""
    b, card = payer(stack, "signed-shopper")
    mall = httpx.Client(base_url=stack.url("mall"), headers={"X-Mall": "1"}, timeout=30)
    try:
        made = mall.post("/shop/orders", json={"cart": [["tea", 1]]}).json()
        p = made["purchase"]
        assert signed_purchase({MALL: stack.mall_key}, p) == read_purchase(
            {k: v for k, v in p.items() if k != "signature"})
        assert b.post("/api/purchases", {"card": card["number"], "secret": card["secret"],
                                         "purchase": p, "return_url": made["return_url"]}
                      ).status_code == 200
        paid = mall.post(f"/shop/orders/{p['order']}/pay", json={}).json()
        assert paid["approved"], paid
        assert "signature" not in stack.mall.orders[p["order"]]
    finally:
        mall.close()
        b.close()


def test_the_demo_pays_a_mall_signed_order(tmp_path: Any) -> None:
    """``svcard demo``'s wallet part: registered, issued, charged, paid at the mall in
    embodiment 1, and the statement lists the charge and the debit, to the cent."""
    from svcard.host.demo.wallet_story import run_wallet

    lines, data = run_wallet(tmp_path / "wallet", charge=50_00)
    assert data["anonymous"] and data["amount"] == 2_100
    assert data["balance"] == 50_00 - 2_100
    moves = [(t["kind"], t["amount"]) for t in data["statement"]["transactions"]]
    assert moves == [("account", 50_00), ("debit", -2_100)]
    card = data["statement"]["cards"][data["card"]]
    assert (card["opening"], card["closing"]) == (0, data["balance"])
    assert any("embodiment 1" in line and "approved" in line for line in lines)
    assert sum("statement" in line for line in lines) == 2


def test_a_first_purchase_losing_the_binding_race_is_asked_again(monkeypatch: Any) -> None:
    """On PostgreSQL two first purchases of one new customer id can both miss the binding and
    one insert fails (IntegrityError). The loser is stored on a second try if the id went to
    its own member (a double click on two orders), refused (403) if to another; it is not
    mistaken for "this order has a purchase already"."""
    from sqlalchemy import insert
    from sqlalchemy.exc import IntegrityError

    from svcard.host.wallet.gateway import db as D
    from svcard.host.wallet.gateway import matching as X

    engine = D.make_engine("sqlite://")
    real = X._store
    try:
        for winner, outcome in (("m", "stored"), ("n", 403)):
            p = read_purchase(new_purchase())
            raced = [True]

            def store(*args: Any, p: dict[str, Any] = p, winner: str = winner,
                      raced: list[bool] = raced) -> str:
                if raced and raced.pop():       # the other request bound it first
                    with engine.begin() as conn:
                        conn.execute(insert(X.customers).values(
                            mall=p["mall"], customer=p["customer"], member=winner, bound=0))
                    raise IntegrityError("INSERT", {}, Exception("unique"))
                return real(*args)

            monkeypatch.setattr(X, "_store", store)
            if outcome == "stored":
                assert X.store_choice(engine, "m", "9" * 16, p) is not None
                assert X.by_order(engine, p["mall"], p["order"])["member"] == "m"
            else:
                with pytest.raises(Refused) as caught:
                    X.store_choice(engine, "m", "9" * 16, p)
                assert caught.value.status == 403
    finally:
        engine.dispose()
