"""The wallet system (seed 003, issue 14) over HTTP, honest flows and their declines: members
(FIG. 1 a1, FIG. 2), issuing virtual and real cards (a2-a6), charging a card from cash, an
account and a credit card (a7), and an embodiment-1 payment (FIG. 4)."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from svcard.card.image import open_card
from svcard.host.wallet.stack import MALL, Browserless, WalletStack, start_wallet
from svcard.host.wallet.web.app import COOKIE
from svcard.reader.virtual import VirtualReader

ACCOUNT, CREDIT = "1000000000000001", "4000000000000002"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WalletStack]:
    s = start_wallet(tmp_path_factory.mktemp("wallet"), login_failures=3)
    s.open_account(ACCOUNT, "acct1234", 50_000)
    s.open_credit(CREDIT, "cvc987", 20_000)
    yield s
    s.close()


def member(stack: WalletStack, name: str, password: str = "correct horse") -> Browserless:
    b = Browserless(stack)
    assert b.post("/api/register", {"member": name, "password": password}).status_code == 201
    assert b.post("/api/login", {"member": name, "password": password}).status_code == 200
    return b


def issue(b: Browserless, kind: str = "virtual") -> dict[str, Any]:
    r = b.post("/api/cards", {"kind": kind})
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def balance(b: Browserless, number: str) -> int:
    return int(next(c["balance"] for c in b.wallet()["cards"] if c["number"] == number))


def topup(stack: WalletStack, card: str, amount: int, ref: str) -> dict[str, Any]:
    with httpx.Client() as http:
        status, answer = stack.agent(http).post("/v1/topups", {
            "ref": ref, "card": card, "amount": amount, "currency": 156})
    assert status == 200, answer
    result: dict[str, Any] = answer
    return result


def test_registration_login_and_the_throttle(stack: WalletStack) -> None:
    b = Browserless(stack)
    assert b.post("/api/register", {"member": "reg1", "password": "short"}).status_code == 400
    assert b.post("/api/register", {"member": "reg1", "password": "long enough"}).status_code \
        == 201
    assert b.post("/api/register", {"member": "reg1", "password": "other one"}).status_code \
        == 409
    assert b.http.get("/api/wallet").status_code == 401          # not logged in
    # the password is stored as an argon2id hash, never in clear
    db = sqlite3.connect(stack.folder / "wallet-web.db")
    stored = db.execute("SELECT password_hash FROM wm_members WHERE member='reg1'").fetchone()[0]
    assert stored.startswith("$argon2id$") and "long enough" not in stored
    # three wrong passwords (login_failures=3), then even the right one is refused for a while
    for _ in range(3):
        assert b.post("/api/login", {"member": "reg1", "password": "wrong pass"}).status_code \
            == 401
    r = b.post("/api/login", {"member": "reg1", "password": "long enough"})
    assert r.status_code == 429 and "Retry-After" in r.headers
    # another member from the same address is throttled too (the address's count)
    c = Browserless(stack)
    assert c.post("/api/register", {"member": "reg2", "password": "long enough"}).status_code \
        == 201
    assert c.post("/api/login", {"member": "reg2", "password": "long enough"}).status_code \
        == 429
    db.execute("DELETE FROM wm_throttle")    # the window passes
    db.commit()
    r = c.post("/api/login", {"member": "reg2", "password": "long enough"})
    assert r.status_code == 200 and COOKIE in r.cookies
    set_cookie = r.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie
    # the session's token is kept only as its digest
    token = r.cookies[COOKIE]
    rows = [row[0] for row in db.execute("SELECT token_digest FROM wm_sessions")]
    assert token not in rows and len(rows) >= 1
    # a request without the wallet's header is refused (a foreign page cannot send it)
    plain = httpx.Client(base_url=stack.url("web"), cookies={COOKIE: token})
    assert plain.get("/api/wallet").status_code == 403
    assert plain.post("/api/cards", json={"kind": "virtual"}).status_code == 403
    assert c.post("/api/logout", {}).status_code == 200
    assert c.http.get("/api/wallet").status_code == 401
    db.execute("DELETE FROM wm_throttle")
    db.commit()
    db.close()


def test_issuing_virtual_and_real_cards(stack: WalletStack) -> None:
    b = member(stack, "issuer1")
    v = issue(b)
    assert len(v["number"]) == 16 and len(v["secret"]) == 8
    r = issue(b, "real")
    assert "secret" not in r and r["mailed"] == f"{r['number']}.json"
    wallet = b.wallet()
    assert [(c["number"], c["kind"], c["balance"]) for c in wallet["cards"]] == [
        (v["number"], "virtual", 0), (r["number"], "real", 0)]
    # the financial system keeps the secret only as a keyed digest, and the member only as
    # the gateway's applicant digest
    raw = (stack.folder / "wallet-fin.db").read_bytes()
    assert v["secret"].encode() not in raw and b"issuer1" not in raw
    # the real card: an anonymous purse (EF 0x16 empty), its letter private
    mail = stack.folder / "mail"
    letter = mail / f"{r['number']}.letter.txt"
    assert stat.S_IMODE(os.stat(letter).st_mode) == 0o600 and r["number"] in letter.read_text()
    image = json.loads((mail / f"{r['number']}.json").read_text())
    assert image["app"]["holder_data"] == "00" * 55
    card = open_card(mail / f"{r['number']}.json")
    reader = VirtualReader(card)
    reader.connect()
    aid = bytes.fromhex(image["app"]["aid"])
    select = reader.transmit(bytes([0x00, 0xA4, 0x04, 0x00, len(aid)]) + aid)
    assert select[-2:] == b"\x90\x00"
    holder = reader.transmit(bytes([0x00, 0xB0, 0x80 | 0x16, 0x00, 0x00]))
    assert holder[-2:] == b"\x90\x00" and holder[:-2] == bytes(55)
    public = reader.transmit(bytes([0x00, 0xB0, 0x80 | 0x15, 0x00, 0x00]))
    assert r["number"] in public[:-2].hex()          # the purse's serial is the card number
    card.close()


def test_charging_from_cash_an_account_and_a_credit_card(stack: WalletStack) -> None:
    b = member(stack, "charger1")
    card = issue(b)["number"]
    # cash: an agent's top-up; the same ref again moves nothing
    assert topup(stack, card, 1_000, "cash-1")["balance"] == 1_000
    again = topup(stack, card, 1_000, "cash-1")
    assert again["repeated"] and again["balance"] == 1_000
    # a wrong agent key: refused, nothing moves
    with httpx.Client() as http:
        status, _ = type(stack.agent(http))(http, stack.url("fin"), "AGENT1", b"\x01" * 32).post(
            "/v1/topups", {"ref": "cash-x", "card": card, "amount": 5, "currency": 156})
    assert status == 401
    # an account and a credit card: linked with their secrets, then charged from
    assert b.post("/api/links", {"kind": "account", "number": ACCOUNT,
                                 "secret": "wrong0"}).status_code == 403
    assert b.post("/api/links", {"kind": "account", "number": ACCOUNT,
                                 "secret": "acct1234"}).status_code == 200
    assert b.post("/api/links", {"kind": "credit", "number": CREDIT,
                                 "secret": "cvc987"}).status_code == 200
    charge = {"card": card, "amount": 2_000, "currency": 156}
    r = b.post("/api/charges", {**charge, "kind": "account", "source": ACCOUNT})
    assert r.status_code == 200 and r.json()["balance"] == 3_000
    r = b.post("/api/charges", {**charge, "kind": "credit", "source": CREDIT})
    assert r.status_code == 200 and r.json()["balance"] == 5_000
    assert balance(b, card) == 5_000
    # declines change nothing: more than the account holds, past the credit limit
    r = b.post("/api/charges", {**charge, "amount": 48_001, "kind": "account",
                                "source": ACCOUNT})
    assert r.status_code == 402 and "too low" in r.json()["reason"]
    r = b.post("/api/charges", {**charge, "amount": 18_001, "kind": "credit", "source": CREDIT})
    assert r.status_code == 402 and "limit" in r.json()["reason"]
    assert balance(b, card) == 5_000
    # another member cannot charge from this account, nor charge this card
    other = member(stack, "charger2")
    other_card = issue(other)["number"]
    r = other.post("/api/charges", {**charge, "card": other_card, "kind": "account",
                                    "source": ACCOUNT})
    assert r.status_code == 404
    r = other.post("/api/charges", {**charge, "kind": "account", "source": ACCOUNT})
    assert r.status_code == 404
    assert other.post("/api/links", {"kind": "account", "number": ACCOUNT,
                                     "secret": "acct1234"}).status_code == 409
    assert balance(b, card) == 5_000 and balance(other, other_card) == 0
    # guessing a credit card's secret: five wrong ones lock it, then the right one is refused
    stack.open_credit("4000000000000003", "cvc555", 10_000)
    for _ in range(5):
        assert other.post("/api/links", {"kind": "credit", "number": "4000000000000003",
                                         "secret": "guess1"}).status_code == 403
    r = other.post("/api/links", {"kind": "credit", "number": "4000000000000003",
                                  "secret": "cvc555"})
    assert r.status_code == 403 and "locked" in r.json()["reason"]
    db = sqlite3.connect(stack.folder / "wallet-fin.db")
    assert db.execute("SELECT balance FROM wf_accounts WHERE number=?",
                      (ACCOUNT,)).fetchone()[0] == 48_000
    assert db.execute("SELECT used FROM wf_credit WHERE number=?", (CREDIT,)).fetchone()[0] \
        == 2_000
    db.close()


def test_an_embodiment_1_payment(stack: WalletStack) -> None:
    b = member(stack, "payer1", "a good password")
    v = issue(b)
    topup(stack, v["number"], 5_000, "cash-pay1")
    mall = httpx.Client(base_url=stack.url("mall"), headers={"X-Mall": "1"})
    made = mall.post("/shop/orders", json={"cart": [["tea", 2], ["cup", 1]]}).json()
    p = made["purchase"]
    assert p["amount"] == 2_100 and p["mall"] == MALL
    r = b.post("/api/purchases", {"card": v["number"], "secret": v["secret"], "purchase": p,
                                  "return_url": made["return_url"]})
    assert r.status_code == 200 and r.json()["return_url"] == made["return_url"]
    paid = mall.post(f"/shop/orders/{p['order']}/pay", json={}).json()
    assert paid["approved"] and paid["amount"] == 2_100
    assert balance(b, v["number"]) == 2_900
    # the mall never saw the member: no id, no password, no session in any request it got
    seen = json.dumps(stack.mall.seen)
    for secret in ("payer1", "a good password", v["secret"], COOKIE):
        assert secret not in seen
    # a return_url off the mall's site is refused (the wallet would send the member there)
    made = mall.post("/shop/orders", json={"cart": [["tea", 1]]}).json()
    r = b.post("/api/purchases", {"card": v["number"], "secret": v["secret"],
                                  "purchase": made["purchase"],
                                  "return_url": "http://evil.example/shop/"})
    assert r.status_code == 400
    mall.close()
