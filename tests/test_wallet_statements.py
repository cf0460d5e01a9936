"""The gateway's daily statements (seed 003 steps b12, c12, d13): a file per member per day
holding every transaction of that day on the member's cards, across the three embodiments,
cash, account and credit-card charges; written atomically, the same bytes when made again, and
agreeing with the financial system's balances to the cent."""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from test_wallet_attack import choose, new_purchase
from test_wallet_embodiments import filled, gateway_pay, van_pay, wait_for
from test_wallet_network import balance, issue, member, topup

from svcard.host.cli.main import main
from svcard.host.wallet.gateway.journal import write_statements
from svcard.host.wallet.stack import WalletStack, start_wallet

ACCOUNT, CREDIT = "1000000000000011", "4000000000000012"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WalletStack]:
    s = start_wallet(tmp_path_factory.mktemp("wallet-statements"))
    s.open_account(ACCOUNT, "acct1234", 100_000)
    s.open_credit(CREDIT, "cvc987", 100_000)
    yield s
    s.close()


def fin_rows(stack: WalletStack, query: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(stack.folder / "wallet-fin.db")
    try:
        return list(db.execute(query))
    finally:
        db.close()


def reported(stack: WalletStack) -> bool:
    """Every movement done has been taken by the gateway."""
    pending = fin_rows(stack, "SELECT count(*) FROM wf_outbox WHERE sent=0")[0][0]
    done = fin_rows(stack, "SELECT count(*) FROM wf_movements WHERE result='done'")[0][0]
    db = sqlite3.connect(stack.folder / "wallet-gateway.db")
    try:
        journal = db.execute("SELECT count(*) FROM wg_journal").fetchone()[0]
    finally:
        db.close()
    return bool(pending == 0 and journal == done)


def days(stack: WalletStack) -> list[str]:
    db = sqlite3.connect(stack.folder / "wallet-gateway.db")
    try:
        return [r[0] for r in db.execute("SELECT DISTINCT day FROM wg_journal ORDER BY day")]
    finally:
        db.close()


def test_statements_cover_every_embodiment_and_agree_with_the_balances(
        stack: WalletStack, tmp_path: Path) -> None:
    http = httpx.Client(timeout=30)
    carol, dave = member(stack, "carol3"), member(stack, "dave3")
    c1, c2, d1 = issue(carol), issue(carol), issue(dave)
    topup(stack, c1["number"], 30_000, "cash-c1")
    topup(stack, d1["number"], 5_000, "cash-d1")
    for kind, number, secret in (("account", ACCOUNT, "acct1234"), ("credit", CREDIT, "cvc987")):
        assert carol.post("/api/links", {"kind": kind, "number": number,
                                         "secret": secret}).status_code == 200
        r = carol.post("/api/charges", {"card": c2["number"], "kind": kind, "source": number,
                                        "amount": 7_000, "currency": 156})
        assert r.status_code == 200, r.text
    # embodiment 1, 2 and 3 payments, and a declined one (dave's balance is too low)
    p = new_purchase()
    assert choose(stack, carol, c1, p).status_code == 200
    assert stack.mall_link(http).post("/v1/approvals", p)[0] == 200
    p = new_purchase()
    assert gateway_pay(stack, http, p, filled(stack, carol, c2, p))[0] == 200
    p = new_purchase()
    assert van_pay(stack, http, p, filled(stack, carol, c1, p))[0] == 200
    p = new_purchase((("cup", 5, 1200),))
    assert van_pay(stack, http, p, filled(stack, dave, d1, p))[0] == 402
    http.close()
    wait_for("every movement reported", lambda: reported(stack))

    folder = tmp_path / "statements"
    written = [path for day in days(stack) for path in write_statements(stack.gateway.engine,
                                                                        folder, day)]
    assert sorted({p.stem for p in written}) == ["carol3", "dave3"]
    contents = {p: p.read_bytes() for p in written}
    totals: dict[str, int] = {}
    closing: dict[str, int] = {}
    kinds: set[str] = set()
    for path in sorted(written):
        s = json.loads(path.read_bytes())
        assert s["member"] == path.stem and s["day"] == path.parent.name
        for t in s["transactions"]:
            totals[t["card"]] = totals.get(t["card"], 0) + t["amount"]
            kinds.add(t["kind"] if t["kind"] != "debit" else "debit:" + t["counterparty"])
        for card, c in s["cards"].items():
            assert c["closing"] == c["opening"] + c["credited"] - c["debited"]
            closing[card] = c["closing"]
        mine = {c["number"] for c in (c1, c2)} if path.stem == "carol3" else {d1["number"]}
        assert set(s["cards"]) <= mine          # never another member's card
    assert kinds == {"cash", "account", "credit", "debit:mall:MALL001"}
    for b, card in ((carol, c1), (carol, c2), (dave, d1)):
        assert totals[card["number"]] == balance(b, card["number"]) == closing[card["number"]]
    assert balance(carol, c1["number"]) == 30_000 - 2 * 2_100
    assert balance(carol, c2["number"]) == 14_000 - 2_100
    assert balance(dave, d1["number"]) == 5_000          # declined: not in the statement
    # made again: the same bytes; nothing else (no temporary file) left in the folder
    again = [path for day in days(stack) for path in write_statements(stack.gateway.engine,
                                                                      folder, day)]
    assert sorted(again) == sorted(written)
    assert all(p.read_bytes() == contents[p] for p in again)
    assert sorted(folder.rglob("*")) == sorted(set(written) | {p.parent for p in written})


def test_the_statements_command(stack: WalletStack, tmp_path: Path) -> None:
    wait_for("every movement reported", lambda: reported(stack))
    config = tmp_path / "gateway.toml"
    config.write_text(f'db = "sqlite:///{stack.folder / "wallet-gateway.db"}"\n'
                      f'secret_key = "{secrets.token_hex(32)}"\n'
                      'fin_url = "http://127.0.0.1:9"\n'
                      f'fin_key = "{secrets.token_hex(32)}"\n'
                      f'[[web]]\nid = "web"\nkey = "{secrets.token_hex(32)}"\n')
    day = days(stack)[-1] if days(stack) else "2026-01-01"
    out = tmp_path / "out"
    runner = CliRunner()
    r = runner.invoke(main, ["wallet", "statements", "--config", str(config), "--day", day,
                             "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert f"for {day} in" in r.output
    first = {p: p.read_bytes() for p in out.rglob("*.json")}
    r = runner.invoke(main, ["wallet", "statements", "--config", str(config), "--day", day,
                             "--out", str(out)])
    assert r.exit_code == 0 and {p: p.read_bytes() for p in out.rglob("*.json")} == first
    r = runner.invoke(main, ["wallet", "statements", "--config", str(config), "--day",
                             "2026-13-40", "--out", str(out)])
    assert r.exit_code != 0 and "--day" in r.output


def test_the_gateway_writes_yesterdays_statements_itself(stack: WalletStack,
                                                         tmp_path: Path) -> None:
    """With ``statement_dir`` set, the running gateway writes yesterday's statements (and
    the same files again at each round)."""
    import time

    from svcard.host.wallet.gateway.journal import day_of
    from svcard.host.wallet.links import LinkClient

    b = member(stack, "erin3")
    card = issue(b)
    yesterday_ms = int(time.time() * 1000) - 86_400_000
    with httpx.Client(timeout=30) as http:
        fin = LinkClient(http, stack.url("gateway"), "fin", stack.gateway.config.fin_key)
        status, _ = fin.post("/v1/reports", {"reports": [{
            "ref": "cash-yesterday-erin", "kind": "cash", "card": card["number"],
            "amount": 1_234, "currency": 156, "balance": 1_234, "counterparty": "agent:AGENT1",
            "order": "", "at": yesterday_ms}]})
    assert status == 200
    folder = tmp_path / "daily"
    stack.gateway.config.statement_dir = folder
    stack.gateway.config.statement_seconds = 0.2
    try:
        stack.restart("gateway")
        path = folder / day_of(yesterday_ms) / "erin3.json"
        wait_for("yesterday's statement", path.exists)
        first = path.read_bytes()
        s = json.loads(first)
        assert [t["ref"] for t in s["transactions"]] == ["cash-yesterday-erin"]
        assert s["cards"][card["number"]]["closing"] == 1_234
        mtime = path.stat().st_mtime_ns
        wait_for("another round", lambda: path.stat().st_mtime_ns != mtime)
        assert path.read_bytes() == first
    finally:
        stack.gateway.config.statement_dir = None
        stack.restart("gateway")
