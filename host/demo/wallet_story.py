"""The wallet part of ``svcard demo`` (seed 003): a member registers with the electronic
payment web server, is issued an anonymous virtual card (a number and a secret), charges it
from a bank account added to the wallet, and pays at the demo mall in embodiment 1: the mall's
page gives the wallet the purchase signed with the mall's key, the member picks the card and
types its secret, the mall asks the gateway for approval with its own record, the gateway
matches the two and the financial system debits the card. Then the member's daily statement
is written from the gateway's journal. The mall never learns who paid."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from ..wallet.gateway.journal import day_of, entries, write_statements
from ..wallet.stack import Browserless, start_wallet
from .system import ask_to_stop

MEMBER, PASSWORD = "demo-walker", "a demo password"
ACCOUNT, ACCOUNT_SECRET = "1000000000000001", "acct4321"
CART = [["tea", 2], ["cup", 1]]


def _cny(minor: int) -> str:
    return f"CNY {minor // 100}.{minor % 100:02d}"


def _ok(r: httpx.Response, status: int = 200) -> dict[str, Any]:
    if r.status_code != status:
        raise RuntimeError(f"the wallet demo: {r.request.url.path} answered {r.status_code}: "
                           f"{r.text[:200]}")
    answer: dict[str, Any] = r.json()
    return answer


def run_wallet(folder: Path, charge: int = 50_00) -> tuple[list[str], dict[str, Any]]:
    """Register, issue, charge ``charge`` minor units, pay at the mall, write the statement:
    the story's lines and data."""
    started = time.perf_counter()
    stack = start_wallet(folder)
    b = Browserless(stack)
    mall = httpx.Client(base_url=stack.url("mall"), headers={"X-Mall": "1"}, timeout=30)
    try:
        return _story(folder, stack, b, mall, charge, started)
    finally:
        mall.close()
        b.close()
        ask_to_stop(stack.threads.values())
        stack.close()


def _story(folder: Path, stack: Any, b: Browserless, mall: httpx.Client, charge: int,
           started: float) -> tuple[list[str], dict[str, Any]]:
    _ok(b.post("/api/register", {"member": MEMBER, "password": PASSWORD}), 201)
    _ok(b.post("/api/login", {"member": MEMBER, "password": PASSWORD}))
    card = _ok(b.post("/api/cards", {"kind": "virtual"}))
    number = str(card["number"])
    stack.open_account(ACCOUNT, ACCOUNT_SECRET, 200_00)
    _ok(b.post("/api/links", {"kind": "account", "number": ACCOUNT, "secret": ACCOUNT_SECRET}))
    charged = _ok(b.post("/api/charges", {"kind": "account", "card": number,
                                          "source": ACCOUNT, "amount": charge,
                                          "currency": 156, "ref": "demo-charge-1"}))
    made = _ok(mall.post("/shop/orders", json={"cart": CART}))
    p = made["purchase"]
    chosen = _ok(b.post("/api/purchases", {"card": number, "secret": card["secret"],
                                           "purchase": p, "return_url": made["return_url"]}))
    paid = _ok(mall.post(f"/shop/orders/{p['order']}/pay", json={}))
    if not paid.get("approved"):
        raise RuntimeError(f"the wallet demo: the mall's order was not paid: {paid}")
    balance = next(c["balance"] for c in b.wallet()["cards"] if c["number"] == number)
    day = day_of(int(time.time() * 1000))
    deadline = time.monotonic() + 20
    while len([e for e in entries(stack.gateway.engine, day) if e["card"] == number]) < 2:
        if time.monotonic() > deadline:    # the financial system's reports did not arrive
            raise RuntimeError("the wallet demo: the gateway's journal lacks the movements")
        time.sleep(0.05)
    written = write_statements(stack.gateway.engine, folder / "statements", day)
    statement = json.loads(next(w for w in written if w.stem == MEMBER).read_text())
    seen = json.dumps(stack.mall.seen)
    anonymous = MEMBER not in seen and PASSWORD not in seen and card["secret"] not in seen
    lines = [
        f"WALLET (seed 003): web server {stack.url('web')}, payment gateway "
        f"{stack.url('gateway')}, financial system {stack.url('fin')}, demo mall "
        f"{stack.url('mall')}; member '{MEMBER}' registered (argon2id) and logged in; "
        f"anonymous virtual card {number} issued (its secret shown once)",
        f"  charged {_cny(charge)} from bank account {ACCOUNT} in the wallet: card balance "
        f"{_cny(charged['balance'])}",
        f"  embodiment 1: mall order {p['order']} ({_cny(p['amount'])}) signed by the mall, "
        f"card chosen in the wallet ({chosen['purchase'][:8]}...), the mall's own request "
        f"matched field by field and debited: approved {paid['approval'][:8]}...; card "
        f"balance {_cny(balance)}; the mall saw "
        + ("no member id, password or secret" if anonymous else "MEMBER DATA"),
    ]
    for t in statement["transactions"]:
        sign = "-" if t["amount"] < 0 else "+"
        lines.append(f"  statement {day} for {MEMBER}: {t['kind']:<7} {sign}"
                     f"{_cny(abs(t['amount']))}  balance {_cny(t['balance'])}  "
                     f"{t['counterparty']}{' order ' + t['order'] if t['order'] else ''}")
    return lines, {"member": MEMBER, "card": number, "charged": charge,
                   "order": p["order"], "amount": p["amount"], "approval": paid["approval"],
                   "balance": balance, "anonymous": anonymous, "statement": statement,
                   "ms": round((time.perf_counter() - started) * 1000, 1)}
