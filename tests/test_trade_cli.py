"""``svcard session open|buy|close|show`` against a trading-session system on loopback: the
whole session from the command line, and each bad input one line with its exit code."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from svcard.host.cli.main import main
from svcard.host.trade.signing import write_private_key
from svcard.host.trade.stack import TradeStack, start_trade


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[TradeStack]:
    s = start_trade(tmp_path / "trade")
    yield s
    s.close()


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="svcard")


def open_args(stack: TradeStack, key: Path, state: Path, deposit: str = "2.00",
              currency: str = "EUR") -> list[str]:
    return ["session", "open", stack.am.url, "--account-id", "am1",
            "--account-key", stack.am.public.hex(), "--customer", "alice", "--key", str(key),
            "--merchant", "shop", "--merchant-url", stack.url("shop"), "--operator", "op1",
            "--deposit", deposit, "--currency", currency, "--state", str(state)]


def test_a_session_from_the_command_line(stack: TradeStack, tmp_path: Path) -> None:
    alice = stack.customer("alice", 5_00)
    key, state = tmp_path / "alice.key", tmp_path / "s.json"
    write_private_key(key, alice.key)
    r = run(*open_args(stack, key, state))
    assert r.exit_code == 0, r.output
    assert "session am1.1 open: deposit 2.00 EUR = 316 JPY at 316469/2000" in r.output
    assert state.stat().st_mode & 0o777 == 0o600
    r = run("session", "buy", "song", "--units", "3", "--state", str(state), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["left"] == 313
    r = run("session", "buy", "song", "--state", str(state))
    assert r.exit_code == 0 and "bought song: 1 JPY; 312 JPY left" in r.output
    r = run("session", "show", "--state", str(state), "--json")
    shown = json.loads(r.output)
    assert shown["spent"] == 4 and "seed" not in r.output and "session_key" not in r.output
    r = run("session", "close", "--state", str(state))
    assert r.exit_code == 0
    assert "cleared (agreed): paid 4 JPY, charged 0.03 EUR, returned 1.97 EUR" in r.output
    r = run("session", "buy", "song", "--state", str(state))
    assert r.exit_code == 1 and "terminated" in r.output


def test_bad_inputs(stack: TradeStack, tmp_path: Path) -> None:
    alice = stack.customer("alice", 1_00)
    key, state = tmp_path / "alice.key", tmp_path / "s.json"
    write_private_key(key, alice.key)
    r = run(*open_args(stack, key, state, deposit="2.005"))
    assert r.exit_code == 3 and "more than 2 decimals" in r.output
    r = run(*open_args(stack, key, state, currency="XXX"))
    assert r.exit_code == 3 and "ISO 4217" in r.output
    r = run(*open_args(stack, tmp_path / "none.key", state))
    assert r.exit_code == 3 and "none.key" in r.output
    r = run(*open_args(stack, key, state, deposit="2.00"))
    assert r.exit_code == 1 and "402" in r.output and "credit limit" in r.output
    assert not state.exists()
    state.write_text("{}")
    r = run("session", "buy", "x", "--state", str(state))
    assert r.exit_code == 3 and "not an svcard session file" in r.output
    r = run(*open_args(stack, key, state, deposit="0.50"))
    assert r.exit_code == 3 and "never overwritten" in r.output
    stack.parties["am1"].thread.stop()
    r = run(*open_args(stack, key, tmp_path / "t.json", deposit="0.50"))
    assert r.exit_code == 11


def test_prices_in_the_customers_currency_from_the_banks_table(stack: TradeStack,
                                                               tmp_path: Path) -> None:
    table = tmp_path / "table.json"
    price = ["session", "price", "120", "JPY", "--in", "EUR", "--table", str(table)]
    account = ["--account-url", stack.am.url, "--account-id", "am1",
               "--account-key", stack.am.public.hex()]
    r = run(*price)
    assert r.exit_code == 1 and "warning" in r.output and "fetch a new table" in r.output
    r = run(*price, *account)
    assert r.exit_code == 0, r.output
    assert "120 JPY = 0.76 EUR (at most; table of bank-c" in r.output
    assert json.loads(table.read_text())["issuer"] == "bank-c"
    stack.parties["am1"].thread.stop()          # the device uses its own copy now
    r = run(*price, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["shown"] == "0.76 EUR"
    kept = json.loads(table.read_text())
    table.write_text(json.dumps({**kept, "expires": kept["issued"] + 1}))
    r = run(*price, *account)
    assert r.exit_code == 11 and "expired at" in r.output      # warned, then fetch failed
    r = run("session", "price", "1.5", "JPY", "--in", "EUR", "--table", str(table))
    assert r.exit_code == 3 and "decimals" in r.output


def test_a_table_not_signed_by_the_account_manager_refused(stack: TradeStack,
                                                          tmp_path: Path) -> None:
    from svcard.host.trade.signing import new_key

    r = run("session", "price", "120", "JPY", "--in", "EUR", "--table",
            str(tmp_path / "t.json"), "--account-url", stack.am.url, "--account-id", "am1",
            "--account-key", new_key()[1].hex())
    assert r.exit_code == 1 and "not signed by the account manager" in r.output
    assert not (tmp_path / "t.json").exists()
