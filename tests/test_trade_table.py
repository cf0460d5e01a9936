"""Issue 15 point 4: the customer's device keeps its bank's exchange table with a lifespan stamp
(``svcard session table``), shows prices in the customer's currency with each currency's real
exponent, WARNS when the kept table has expired and fetches a new one (the command, and the
open and buy paths), refuses an expired table it cannot renew, and keeps the session's rate
fixed for the whole session whatever table the device fetches later."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from svcard.host.cli.main import main
from svcard.host.trade import customer as C
from svcard.host.trade.money import ExchangeTable
from svcard.host.trade.signing import write_private_key
from svcard.host.trade.stack import DEMO_RATES, TradeStack, demo_table, start_trade


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[TradeStack]:
    s = start_trade(tmp_path / "trade")
    yield s
    s.close()


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="svcard")


def account(stack: TradeStack) -> list[str]:
    return ["--account-url", stack.am.url, "--account-id", "am1",
            "--account-key", stack.am.public.hex()]


def expire(path: Path) -> None:
    kept = json.loads(path.read_text())
    path.write_text(json.dumps({**kept, "issued": 1_000, "expires": 2_000}))


def test_the_device_table_fetched_kept_warned_and_renewed(stack: TradeStack,
                                                          tmp_path: Path) -> None:
    table = tmp_path / "table.json"
    r = run("session", "table", "--table", str(table))
    assert r.exit_code == 1 and "warning" in r.output and "no exchange table" in r.output
    assert "fetch a new table" in r.output and not table.exists()
    r = run("session", "table", "--table", str(table), *account(stack))
    assert r.exit_code == 0, r.output
    assert "exchange table of bank-c: 1 EUR = " in r.output and "158.2345 JPY" in r.output
    assert json.loads(table.read_text())["issuer"] == "bank-c"
    r = run("session", "table", "--table", str(table), "--json")    # valid: no fetch, no warning
    assert r.exit_code == 0 and "warning" not in r.output
    assert json.loads(r.output)["rates"]["KWD"] == "0.3312"
    expire(table)
    r = run("session", "table", "--table", str(table))             # expired, no one to ask
    assert r.exit_code == 1 and "expired at 1970-01-01 00:00:02 UTC" in r.output
    r = run("session", "table", "--table", str(table), *account(stack))
    assert r.exit_code == 0 and "warning" in r.output and "expired at" in r.output
    assert "fetched a new exchange table of bank-c" in r.output
    assert json.loads(table.read_text())["expires"] > time.time() * 1000
    # --fetch renews a valid table (the bank published new rates)
    stack.account.config.table = ExchangeTable.from_text(
        "bank-c", "EUR", {**DEMO_RATES, "JPY": "160"}, int(time.time() * 1000) - 1000,
        int(time.time() * 1000) + 3_600_000)
    r = run("session", "table", "--table", str(table), *account(stack), "--fetch", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(table.read_text())["rates"]["JPY"] == "160"


def test_an_expired_table_from_the_bank_is_refused_and_not_kept(stack: TradeStack,
                                                                tmp_path: Path) -> None:
    now = int(time.time() * 1000)
    stack.account.config.table = ExchangeTable.from_text("bank-c", "EUR", DEMO_RATES,
                                                         now - 7_200_000, now - 3_600_000)
    table = tmp_path / "table.json"
    r = run("session", "price", "120", "JPY", "--in", "EUR", "--table", str(table),
            *account(stack))
    assert r.exit_code == 1 and "not valid now" in r.output and not table.exists()


def shown(price: int, source: str, target: str, exp_s: int, exp_t: int) -> int:
    rates = {"EUR": Fraction(1), **{k: Fraction(v) for k, v in DEMO_RATES.items()}}
    rate = rates[target] / rates[source]
    return math.ceil(Fraction(price) * rate * 10**exp_t / 10**exp_s)


@pytest.mark.parametrize(("amount", "source", "target", "exp_s", "exp_t"), [
    ("120", "JPY", "KWD", 0, 3), ("1.000", "KWD", "JPY", 3, 0), ("0.005", "KWD", "EUR", 3, 2),
    ("7", "JPY", "EUR", 0, 2), ("12.34", "USD", "JPY", 2, 0)])
def test_prices_shown_with_each_currencys_exponent(stack: TradeStack, tmp_path: Path,
                                                   amount: str, source: str, target: str,
                                                   exp_s: int, exp_t: int) -> None:
    table = tmp_path / "table.json"
    r = run("session", "price", amount, source, "--in", target, "--table", str(table),
            *account(stack), "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)            # the warning and the fetch went to stderr
    minor = shown(int(amount.replace(".", "")), source, target, exp_s, exp_t)
    text = str(minor) if exp_t == 0 else f"{minor // 10**exp_t}.{minor % 10**exp_t:0{exp_t}d}"
    assert got["shown"] == f"{text} {target}"
    decimals = got["shown"].split()[0].partition(".")[2]
    assert len(decimals) == exp_t


def test_open_and_buy_renew_the_table_and_the_session_rate_stays_fixed(stack: TradeStack,
                                                                       tmp_path: Path) -> None:
    alice = stack.customer("alice", 5_00)
    key, state, table = tmp_path / "alice.key", tmp_path / "s.json", tmp_path / "table.json"
    write_private_key(key, alice.key)
    table.write_text(json.dumps({"issuer": "bank-c", "base": "EUR", "issued": 1_000,
                                 "expires": 2_000, "rates": {"JPY": "100"}}))
    r = run("session", "open", stack.am.url, "--account-id", "am1", "--account-key",
            stack.am.public.hex(), "--customer", "alice", "--key", str(key), "--merchant",
            "shop", "--merchant-url", stack.url("shop"), "--operator", "op1", "--deposit",
            "2.00", "--currency", "EUR", "--state", str(state), "--table", str(table))
    assert r.exit_code == 0, r.output
    assert "warning" in r.output and "expired at" in r.output and "fetched a new" in r.output
    assert json.loads(table.read_text())["rates"]["JPY"] == "158.2345"
    rate = C.load(state).rate
    # the bank's table changes and the device's copy expires: buy renews it, the rate stays
    stack.account.config.table = demo_table(issuer="bank-c2")
    expire(table)
    r = run("session", "buy", "song", "--units", "3", "--state", str(state), "--table",
            str(table))
    assert r.exit_code == 0, r.output
    assert "fetched a new exchange table of bank-c2" in r.output
    assert json.loads(table.read_text())["issuer"] == "bank-c2"
    assert "(the price: 0.02 EUR at most, at the session's rate)" in r.output
    assert C.load(state).rate == rate
    r = run("session", "buy", "song", "--state", str(state), "--table", str(table), "--json")
    assert r.exit_code == 0 and "warning" not in r.output
    assert json.loads(r.output)["in_your_currency"] == "0.01 EUR"


def test_in_customer_currency_rounds_up_at_the_session_rate() -> None:
    s = C.Session("am1.1", "p1", "shop", "", 100, "KWD", 47_776, "JPY", "1582345/3312",
                  2**43, 1, 47_776, 0, b"k" * 32, b"s" * 32)
    assert str(C.in_customer_currency(s, 478)) == "1.001 KWD"   # 478 JPY: a little over
    assert str(C.in_customer_currency(s, 0)) == "0.000 KWD"
