"""Embodiments 2 and 3 of seed 003 (FIG. 5 and 6) over HTTP, with the attacker's tests.

Embodiment 2: the member's wallet fills a card's number, its secret and a one-time profile
token into the mall's form; the mall asks the GATEWAY, which checks the token, the secret
(with the lockout) and every field before the financial system debits the card.
Embodiment 3: the mall asks the VAN server, which asks the financial system; the financial
system reports the movement to the gateway, which records it against the member.
Declines: a wrong secret, another member's card, a balance too low, a replay, a forged
profile token, an expired purchase; a forged report to the gateway is refused."""

from __future__ import annotations

import copy
import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from test_wallet_attack import mutations, new_purchase, signed
from test_wallet_network import balance, issue, member, topup

from svcard.host.wallet.links import LinkClient, link_headers
from svcard.host.wallet.stack import MALL, Browserless, WalletStack, start_wallet


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WalletStack]:
    s = start_wallet(tmp_path_factory.mktemp("wallet-embodiments"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def fill(stack: WalletStack, b: Browserless, card: str, p: dict[str, Any]) -> httpx.Response:
    return b.post("/api/fills", {"card": card, "purchase": signed(stack.mall_key, p),
                                 "return_url": f"{stack.url('mall')}/shop/?order={p['order']}"})


def filled(stack: WalletStack, b: Browserless, card: dict[str, Any], p: dict[str, Any]
           ) -> dict[str, Any]:
    """What the wallet page writes into the mall's form: number, secret, profile token."""
    r = fill(stack, b, card["number"], p)
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"card", "profile", "return_url"}     # never the secret
    return {"card": card["number"], "secret": card["secret"], "profile": r.json()["profile"]}


def gateway_pay(stack: WalletStack, http: httpx.Client, p: dict[str, Any],
                form: dict[str, Any]) -> tuple[int, Any]:
    return stack.mall_link(http).post("/v1/card-payments", {"purchase": p, **form})


def van_pay(stack: WalletStack, http: httpx.Client, p: dict[str, Any],
            form: dict[str, Any]) -> tuple[int, Any]:
    return stack.van_link(http).post("/v1/approvals", {"purchase": p, **form})


def debits(stack: WalletStack) -> int:
    db = sqlite3.connect(stack.folder / "wallet-fin.db")
    try:
        return int(db.execute("SELECT count(*) FROM wf_movements WHERE kind='debit' "
                              "AND result='done'").fetchone()[0])
    finally:
        db.close()


def journal(stack: WalletStack) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(stack.folder / "wallet-gateway.db")
    try:
        return list(db.execute("SELECT ref, member, card, kind, amount, balance, counterparty, "
                               "mall_order FROM wg_journal ORDER BY at, ref"))
    finally:
        db.close()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def alice(stack: WalletStack) -> tuple[Browserless, dict[str, Any]]:
    b = member(stack, "alice2")
    card = issue(b)
    topup(stack, card["number"], 50_000, "cash-alice2")
    return b, card


@pytest.fixture(scope="module")
def bob(stack: WalletStack) -> tuple[Browserless, dict[str, Any]]:
    b = member(stack, "bob2")
    card = issue(b)
    topup(stack, card["number"], 50_000, "cash-bob2")
    return b, card


PAYERS = {"gateway": gateway_pay, "van": van_pay}


@pytest.mark.parametrize("via", ["gateway", "van"])
def test_filled_details_pay_once(stack: WalletStack, http: httpx.Client, alice: Any,
                                 via: str) -> None:
    b, card = alice
    pay = PAYERS[via]
    p = new_purchase()
    form = filled(stack, b, card, p)
    before, done = balance(b, card["number"]), debits(stack)
    status, answer = pay(stack, http, p, form)
    assert status == 200 and answer["approved"] and answer["amount"] == 2_100, answer
    assert balance(b, card["number"]) == before - 2_100 and debits(stack) == done + 1
    # replayed, by either way: refused at the gateway; the VAN (no state of its own) gives
    # the first outcome marked repeated; nothing more debited either way
    status, answer = gateway_pay(stack, http, p, form)
    assert status == 409, answer
    status, answer = van_pay(stack, http, p, form)
    assert status == 200 and answer["repeated"], answer
    assert balance(b, card["number"]) == before - 2_100 and debits(stack) == done + 1
    # the financial system reported the debit to the gateway: in alice's journal, once
    rows = wait_for("the report", lambda: [r for r in journal(stack)
                                           if r[7] == p["order"]])
    assert len(rows) == 1 and rows[0][1] == "alice2" and rows[0][3] == "debit" and \
        rows[0][4] == -2_100 and rows[0][6] == "mall:" + MALL


@pytest.mark.parametrize("via", ["gateway", "van"])
def test_a_filled_card_is_never_paid_by_embodiment_one(stack: WalletStack, http: httpx.Client,
                                                       alice: Any, via: str) -> None:
    """A filled purchase has no secret checked yet: the mall's plain approval request (no
    card details) must not pay it."""
    b, card = alice
    p = new_purchase()
    filled(stack, b, card, p)
    before = balance(b, card["number"])
    status, answer = stack.mall_link(http).post("/v1/approvals", p)
    assert status == 409, answer
    assert balance(b, card["number"]) == before


@pytest.mark.parametrize("via", ["gateway", "van"])
def test_wrong_secret_then_locked(stack: WalletStack, http: httpx.Client, via: str) -> None:
    b = member(stack, f"locky-{via}")
    card = issue(b)
    topup(stack, card["number"], 10_000, f"cash-locky-{via}")
    p = new_purchase()
    form = filled(stack, b, card, p)
    for _ in range(5):
        status, _ = PAYERS[via](stack, http, p, {**form, "secret": "00000000"})
        assert status == 403
    status, answer = PAYERS[via](stack, http, p, form)   # the right secret: too late
    assert status in (403, 423) and "locked" in answer["reason"], answer
    assert balance(b, card["number"]) == 10_000


@pytest.mark.parametrize("via", ["gateway", "van"])
def test_another_members_card(stack: WalletStack, http: httpx.Client, alice: Any, bob: Any,
                              via: str) -> None:
    (ab, acard), (bb, bcard) = alice, bob
    p = new_purchase()
    # alice's wallet cannot fill bob's card
    assert fill(stack, ab, bcard["number"], p).status_code == 404
    # bob's card number and secret with alice's profile token: refused, nothing debited,
    # and bob's secret was never even tried (no lockout count)
    form = filled(stack, ab, acard, p)
    before = (balance(ab, acard["number"]), balance(bb, bcard["number"]))
    status, answer = PAYERS[via](stack, http, p, {**form, "card": bcard["number"],
                                                  "secret": bcard["secret"]})
    assert status in (403, 409), answer
    assert (balance(ab, acard["number"]), balance(bb, bcard["number"])) == before
    # a token made for another order of the same card: refused
    q = new_purchase()
    status, _ = PAYERS[via](stack, http, q, form)
    assert status in (403, 404, 409)
    assert (balance(ab, acard["number"]), balance(bb, bcard["number"])) == before


@pytest.mark.parametrize("via", ["gateway", "van"])
def test_insufficient_balance(stack: WalletStack, http: httpx.Client, via: str) -> None:
    b = member(stack, f"poor-{via}")
    card = issue(b)
    topup(stack, card["number"], 2_000, f"cash-poor-{via}")
    p = new_purchase()                       # 21.00
    status, answer = PAYERS[via](stack, http, p, filled(stack, b, card, p))
    assert status == 402 and not answer["approved"], answer
    assert balance(b, card["number"]) == 2_000


@pytest.mark.parametrize("via", ["gateway", "van"])
def test_each_field_mutated_and_forged_tokens(stack: WalletStack, http: httpx.Client,
                                              alice: Any, via: str) -> None:
    b, card = alice
    pay = PAYERS[via]
    p = new_purchase()
    form = filled(stack, b, card, p)
    before, done = balance(b, card["number"]), debits(stack)
    approvals = 0
    for name, wrong in mutations(p):
        status, answer = pay(stack, http, wrong, form)
        approvals += status == 200
        assert status in (400, 403, 404, 409), (name, status, answer)
    forged = form["profile"][:32] + secrets.token_hex(32)
    flipped = form["profile"][:-1] + ("0" if form["profile"][-1] != "0" else "1")
    for token in (forged, flipped, secrets.token_hex(48)):
        status, answer = pay(stack, http, p, {**form, "profile": token})
        approvals += status == 200
        assert status in (403, 409), answer
    for bad in ({**form, "profile": "zz"}, {k: v for k, v in form.items() if k != "secret"},
                {**form, "card": "123"}):
        status, _ = pay(stack, http, p, bad)
        assert status == 400
    assert approvals == 0 and balance(b, card["number"]) == before and debits(stack) == done
    status, answer = pay(stack, http, p, form)
    assert status == 200 and answer["approved"]


@pytest.mark.parametrize("via", ["gateway", "van"])
def test_raced_payments_debit_once(stack: WalletStack, alice: Any, via: str) -> None:
    b, card = alice
    p = new_purchase()
    form = filled(stack, b, card, p)
    before, done = balance(b, card["number"]), debits(stack)

    def one(_: int) -> int:
        with httpx.Client(timeout=30) as h:
            return PAYERS[via](stack, h, p, form)[0]

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(16)))
    assert statuses.count(200) == (1 if via == "gateway" else 16), statuses
    assert balance(b, card["number"]) == before - 2_100 and debits(stack) == done + 1


def test_both_ways_for_one_fill_debit_once(stack: WalletStack, http: httpx.Client,
                                           alice: Any) -> None:
    """One fill, paid through the VAN and then through the gateway: the same debit ref."""
    b, card = alice
    p = new_purchase()
    form = filled(stack, b, card, p)
    before, done = balance(b, card["number"]), debits(stack)
    assert van_pay(stack, http, p, form)[0] == 200
    gateway_pay(stack, http, p, form)
    assert balance(b, card["number"]) == before - 2_100 and debits(stack) == done + 1


@pytest.mark.parametrize("via", ["gateway", "van"])
def test_expired(stack: WalletStack, http: httpx.Client, alice: Any, via: str) -> None:
    b, card = alice
    p = new_purchase(expires_in=1.2)
    form = filled(stack, b, card, p)
    before = balance(b, card["number"])
    wait_for("the expiry", lambda: time.time() * 1000 > p["expires"] + 50)
    status, answer = PAYERS[via](stack, http, p, form)
    assert status == 410, answer
    assert balance(b, card["number"]) == before


def test_a_mall_pays_only_its_own_orders_at_the_van(stack: WalletStack, http: httpx.Client,
                                                    alice: Any) -> None:
    b, card = alice
    p = new_purchase()
    form = filled(stack, b, card, p)
    other = LinkClient(http, stack.url("van"), "MALL002", stack.van_mall_key)
    assert other.post("/v1/approvals", {"purchase": p, **form})[0] == 401   # unknown party
    wrong_key = LinkClient(http, stack.url("van"), MALL, secrets.token_bytes(32))
    assert wrong_key.post("/v1/approvals", {"purchase": p, **form})[0] == 401
    # the gateway's key for this mall is not the VAN's: refused too
    assert LinkClient(http, stack.url("van"), MALL, stack.mall_key).post(
        "/v1/approvals", {"purchase": p, **form})[0] == 401
    # a truncated body
    body = json.dumps({"purchase": p, **form}).encode()[:-7]
    r = http.post(stack.url("van") + "/v1/approvals", content=body, headers=link_headers(
        stack.van_mall_key, MALL, "POST", "/v1/approvals", body))
    assert r.status_code == 400
    assert balance(b, card["number"]) == balance(b, card["number"])
    assert van_pay(stack, http, p, form)[0] == 200


def report(ref: str, card: str, amount: int = 100) -> dict[str, Any]:
    return {"ref": ref, "kind": "cash", "card": card, "amount": amount, "currency": 156,
            "balance": 999_999, "counterparty": "agent:X", "order": "", "at": int(time.time()
                                                                                * 1000)}


def test_forged_reports_to_the_gateway_are_refused(stack: WalletStack, http: httpx.Client,
                                                   alice: Any) -> None:
    _, card = alice

    def forged() -> list[Any]:      # (the genuine reports of earlier tests may still arrive)
        return [r for r in journal(stack) if r[0].startswith(("forged", "r"))]

    fake = {"reports": [report("forged-1", card["number"])]}
    gw = stack.url("gateway")
    # as the financial system but with another key; as a mall; as the web server; as
    # "gateway" (the financial system's own name for the gateway) under the right key
    for party, key in (("fin", secrets.token_bytes(32)), (MALL, stack.mall_key),
                       ("web", stack.web.config.gateway_key),
                       ("gateway", stack.gateway.config.fin_key)):
        status, _ = LinkClient(http, gw, party, key).post("/v1/reports", fake)
        assert status == 401, party
    # a genuine report's headers on another body, or replayed on another path
    body = json.dumps(fake).encode()
    headers = link_headers(stack.gateway.config.fin_key, "fin", "POST", "/v1/reports", body)
    r = http.post(gw + "/v1/reports", content=body.replace(b"forged-1", b"forged-2"),
                  headers=headers)
    assert r.status_code == 401
    r = http.post(gw + "/v1/approvals", content=body, headers=headers)
    assert r.status_code == 401
    assert forged() == []
    # too many, or malformed: 400, nothing recorded
    fin = LinkClient(http, gw, "fin", stack.gateway.config.fin_key)
    assert fin.post("/v1/reports", {"reports": [report(f"r{i}", card["number"])
                                                for i in range(101)]})[0] == 400
    assert fin.post("/v1/reports", {"reports": [{**report("r-x", card["number"]),
                                                 "amount": -5}]})[0] == 400
    assert forged() == []
    # the genuine sender, twice: recorded once
    assert fin.post("/v1/reports", fake) == (200, {"recorded": 1, "known": 0})
    assert fin.post("/v1/reports", fake) == (200, {"recorded": 0, "known": 1})


def test_the_mall_never_learns_the_member(stack: WalletStack, http: httpx.Client) -> None:
    """Through the demo mall's own endpoint (both ways): nothing the mall receives names
    the member or holds the password."""
    b = member(stack, "shy-member-77", "a secret passphrase")
    card = issue(b)
    topup(stack, card["number"], 10_000, "cash-shy")
    mall = httpx.Client(base_url=stack.url("mall"), timeout=30, headers={"X-Mall": "1"})
    start = len(stack.mall.seen)
    for via in ("gateway", "van"):
        r = mall.post("/shop/orders", json={"cart": [["tea", 1]]})
        p = r.json()["purchase"]
        form = filled(stack, b, card, p)
        r = mall.post(f"/shop/orders/{p['order']}/pay-card", json={**form, "via": via})
        assert r.json()["approved"], r.text
    r = mall.post(f"/shop/orders/{p['order']}/pay-card", json={**form, "via": "nowhere"})
    assert r.status_code == 400
    mall.close()
    seen = json.dumps(stack.mall.seen[start:])
    assert "shy-member-77" not in seen and "a secret passphrase" not in seen
    assert balance(b, card["number"]) == 10_000 - 2 * 450


def test_filling_checks_the_purchase(stack: WalletStack, alice: Any) -> None:
    b, card = alice
    p = new_purchase()
    bad_return = b.post("/api/fills", {"card": card["number"],
                                       "purchase": signed(stack.mall_key, p),
                                       "return_url": "http://evil.example/steal"})
    assert bad_return.status_code == 400
    wrong = copy.deepcopy(p)
    wrong["amount"] += 1
    assert fill(stack, b, card["number"], wrong).status_code == 400
    assert fill(stack, b, card["number"], {**p, "mall": "MALL999"}).status_code == 400
    assert fill(stack, b, card["number"], p).status_code == 200
    assert fill(stack, b, card["number"], p).status_code == 409     # one card per order
    anonymous = Browserless(stack)
    assert anonymous.post("/api/fills", {"card": card["number"], "purchase": p,
                                         "return_url": "x"}).status_code == 401
    anonymous.close()
