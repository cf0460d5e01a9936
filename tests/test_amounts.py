"""Amounts as people write them (``12.34`` in the card's currency, ``1234u`` or ``--minor`` in
minor units) and money printed with its currency (``CNY 12.34``); raw minor units only in
``--json``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from conftest import demo_image, with_balance

from svcard.card.image import save_new_image
from svcard.card.storage import read_image
from svcard.host.cli.main import main
from svcard.host.demo.system import System
from svcard.host.terminal.money import (
    MAX_MINOR,
    AmountError,
    currency_label,
    format_money,
    minor_amount,
    parse_amount,
)

SVCARD = str(Path(sys.executable).parent / "svcard")


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


# --- parsing --------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "exponent", "minor"), [
    ("12.34", 2, 1234), ("0.99", 2, 99), ("12", 2, 1200), ("12.", 2, 1200), (".5", 2, 50),
    ("12.340", 2, 1234), ("7", 0, 7), ("100.00", 0, 100), ("1.234", 3, 1234),
    ("42949672.95", 2, MAX_MINOR), ("1234u", 2, 1234), ("1234U", 0, 1234), (" 5u ", None, 5),
    ("0", 2, 0),
])
def test_amount_placed_by_the_exponent(text: str, exponent: int | None, minor: int) -> None:
    assert parse_amount(text).minor_units(exponent, 156) == minor


def test_decimals_are_exact_never_float() -> None:
    # 0.29 * 100 is 28.999999999999996 in binary floating point
    assert parse_amount("0.29").minor_units(2) == 29
    assert parse_amount("1.1").decimal == Decimal("1.1")
    assert parse_amount("12345678.91").minor_units(2) == 1234567891


@pytest.mark.parametrize(("text", "exponent", "reason"), [
    ("12.345", 2, "more decimals than CNY has (2)"),
    ("0.5", 0, "more decimals than CNY has (0)"),
    ("42949672.96", 2, "too large (at most CNY 42949672.95)"),
    ("4294967296", 0, "too large"),
    ("12.34", None, "no known exponent"),
])
def test_amount_refused_at_the_exponent(text: str, exponent: int | None, reason: str) -> None:
    with pytest.raises(AmountError, match=re.escape(reason)) as caught:
        parse_amount(text, "--amount").minor_units(exponent, 156)
    assert str(caught.value).startswith(f"--amount {text}: ")


@pytest.mark.parametrize(("text", "reason"), [
    ("-1", "not negative"), ("-0.01", "not negative"), ("12,34", "not an amount"),
    ("1e3", "not an amount"), ("12.34.5", "not an amount"), ("", "not an amount"),
    ("CNY", "not an amount"), ("nan", "not an amount"), ("4294967296u", "too large"),
    ("1" * 41, "too long"), ("1.5u", "not an amount"), ("0x10", "not an amount"),
])
def test_malformed_amounts_refused(text: str, reason: str) -> None:
    with pytest.raises(AmountError, match=reason):
        parse_amount(text)


def test_minor_option_amount() -> None:
    assert minor_amount(1234).minor_units(None) == 1234
    assert minor_amount(0).minor_units(3) == 0
    with pytest.raises(AmountError, match="--minor -1"):
        minor_amount(-1)


# --- formatting -----------------------------------------------------------------------------

def test_money_formatted_with_its_currency() -> None:
    assert format_money(1250, 156, 2) == "CNY 12.50"
    assert format_money(5, 978, 2) == "EUR 0.05"
    assert format_money(-5, 48, 3) == "BHD -0.005"
    assert format_money(1250, 392, 0) == "JPY 1250"
    assert format_money(1250, 156) == "CNY 12.50"          # the table's exponent
    assert format_money(1250, 123, 2) == "#123 12.50"      # unknown code: its number
    assert format_money(1250, 999, 2) == "1250 pts"        # XXX: points
    assert format_money(1250, None, 2) == "12.50"          # a card that states no currency
    assert currency_label(36) == "AUD" and currency_label(7) == "#007"


# --- the command line -----------------------------------------------------------------------

def test_terminal_purchase_with_a_decimal_amount(image_files: dict[str, Path]) -> None:
    card, psam = f"virtual:{image_files['iep']}", f"virtual:{image_files['psam']}"
    code, text = run("terminal", "purchase", "--card", card, "--psam", psam, "--amount", "12.34")
    assert code == 0, text
    assert "purchase of CNY 12.34 approved" in text
    assert "balance CNY 100.00 -> CNY 87.66" in text
    assert read_image(image_files["iep"])["app"]["ep"]["balance"] == 10000 - 1234
    code, text = run("terminal", "purchase", "--card", card, "--psam", psam, "--amount", "0.66u",
                     "--json")
    assert code == 2 and "--amount" in text
    code, text = run("terminal", "purchase", "--card", card, "--psam", psam, "--minor", "66",
                     "--json")
    receipt = json.loads(text)
    assert code == 0 and receipt["amount"] == 66 and receipt["balance_after"] == 10000 - 1300
    code, text = run("terminal", "balance", "--card", card)
    assert code == 0 and "EP balance: CNY 87.00" in text
    code, text = run("terminal", "log", "--card", card)
    assert code == 0 and "CNY 12.34" in text and "CNY 0.66" in text


@pytest.mark.parametrize(("args", "message"), [
    (["--amount", "12.345"], "--amount 12.345: more decimals than CNY has (2)"),
    (["--amount", "-1"], "not negative"),
    (["--amount", "42949672.96"], "--amount 42949672.96: too large"),
    (["--amount", "1", "--minor", "1"], "give the amount once"),
    ([], "give the amount once"),
    (["--minor", "4294967296"], "--minor"),
])
def test_terminal_amount_usage_errors_change_nothing(image_files: dict[str, Path],
                                                      args: list[str], message: str) -> None:
    before = {k: p.read_bytes() for k, p in image_files.items()}
    code, text = run("terminal", "purchase", "--card", f"virtual:{image_files['iep']}",
                     "--psam", f"virtual:{image_files['psam']}", *args)
    assert code == 2 and message in text, text
    assert "Traceback" not in text
    assert {k: p.read_bytes() for k, p in image_files.items()} == before


def test_terminal_load_at_exponent_zero(tmp_path: Path) -> None:
    image = with_balance(demo_image("iep", currency_code=392, currency_exponent=0), ep=0)
    save_new_image(tmp_path / "yen.json", image)
    save_new_image(tmp_path / "hsm.json", demo_image("hsm"))
    card, hsm = f"virtual:{tmp_path / 'yen.json'}", f"virtual:{tmp_path / 'hsm.json'}"
    code, text = run("terminal", "load", "--card", card, "--hsm", hsm, "--amount", "500")
    assert code == 0 and "load of JPY 500 done" in text and "JPY 0 -> JPY 500" in text
    code, text = run("terminal", "load", "--card", card, "--hsm", hsm, "--amount", "0.5")
    assert code == 2 and "more decimals than JPY has (0)" in text
    assert read_image(tmp_path / "yen.json")["app"]["ep"]["balance"] == 500


def test_bank_accounts_in_the_account_currency(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'bank.db'}"
    code, text = run("bank", "account", "create", "alice", "--db", db, "--funds", "100.50")
    assert code == 0 and "opened with CNY 100.50" in text
    code, text = run("bank", "account", "fund", "alice", "0.25", "--db", db)
    assert code == 0 and "balance CNY 100.75" in text
    code, text = run("bank", "account", "fund", "alice", "25u", "--db", db, "--json")
    assert code == 0 and json.loads(text)["balance"] == 10100
    code, text = run("bank", "account", "fund", "alice", "0.001", "--db", db)
    assert code == 2 and "AMOUNT 0.001: more decimals than CNY has (2)" in text
    code, text = run("bank", "account", "create", "yen", "--db", db, "--currency", "392",
                     "--funds", "1500")
    assert code == 0 and "opened with JPY 1500" in text
    code, text = run("bank", "account", "create", "odd", "--db", db, "--currency", "1",
                     "--funds", "15.00")
    assert code == 2 and "#001 has no known exponent" in text
    code, text = run("bank", "account", "list", "--db", db)
    assert code == 0 and "CNY 101.00" in text and "JPY 1500" in text
    listed = json.loads(run("bank", "account", "list", "--db", db, "--json")[1])
    assert [r["balance"] for r in listed] == [10100, 1500]


def test_svcard_load_with_a_decimal_amount(tmp_path: Path) -> None:
    from test_load_cli import LoadServers

    from svcard.host.demo.system import card_image

    servers = LoadServers(tmp_path)   # alice has CNY 200.00
    try:
        card = card_image(tmp_path, ep=0)
        args = [SVCARD, "load", servers.bank_url, "--card", f"virtual:{card}", "--account",
                "alice", "--secret", servers.secret, "--journal", str(tmp_path / "j.jsonl")]
        done = subprocess.run([*args, "--amount", "50.00"], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert "loaded CNY 50.00" in done.stdout
        assert "card balance CNY 0.00 -> CNY 50.00" in done.stdout
        assert "account balance CNY 150.00" in done.stdout
        assert "{" not in done.stdout, done.stdout       # no Python or JSON dicts in text
        assert read_image(card)["app"]["ep"]["balance"] == 5000
        odd = subprocess.run([*args, "--amount", "0.001"], capture_output=True, text=True,
                             timeout=120)
        assert odd.returncode == 2 and "--amount 0.001: more decimals" in odd.stderr
        as_json = subprocess.run([*args, "--minor", "1", "--json"], capture_output=True,
                                 text=True, timeout=120)
        assert as_json.returncode == 0, as_json.stderr
        assert json.loads(as_json.stdout)["load"]["amount"] == 1
        assert read_image(card)["app"]["ep"]["balance"] == 5001
        assert servers.account() == 20000 - 5001
        # a request missing a field is named by the field, not by a KeyError's repr
        bad = httpx.post(f"{servers.bank_url}/start", json={"account": "alice",
                                                             "secret": "x" * 8}, timeout=30)
        assert bad.status_code == 400
        assert bad.json()["reason"] == "bad load request: no field card", bad.text
    finally:
        servers.stop()


def test_a_batch_file_missing_a_field_names_it(tmp_path: Path) -> None:
    from svcard.fixtures import fixture_path
    from svcard.host.settle.batches import check_batch
    from svcard.host.settle.config import clearing_config

    (tmp_path / "batch.json").write_text(json.dumps({"terminal_id": "000000000001",
                                                     "batch_number": 1, "records": []}))
    verdict = check_batch(clearing_config(fixture_path("clearing-demo.toml")),
                          tmp_path / "batch.json")
    assert verdict.state == "refused" and verdict.reason == "not a batch file: no field mac"


def test_svcard_pay_prints_money_with_its_currency(tmp_path: Path) -> None:
    from test_servers_cli import Servers

    from svcard.host.demo.system import card_image

    servers = Servers(tmp_path)
    try:
        card = card_image(tmp_path, ep=5_000)
        for variant in ("fig6", "fig7"):
            paid = subprocess.run(
                [SVCARD, "pay", servers.checkout("song", variant), "--card", f"virtual:{card}",
                 "--journal", str(tmp_path / "journal.jsonl"), "--terminal-key",
                 str(servers.terminal_key)], capture_output=True, text=True, timeout=120)
            assert paid.returncode == 0, paid.stderr
            assert f"paid CNY 0.99 ({variant}," in paid.stdout
            assert "receipt: txn " in paid.stdout and "CNY 0.99" in paid.stdout
            assert not re.search(r"[{}\[\]]|': |\": ", paid.stdout), paid.stdout
        assert "balance CNY 49.01 -> CNY 48.02" in paid.stdout
        assert "not yet proven" in paid.stdout
    finally:
        servers.stop()


def test_clearing_run_text_has_no_python_dicts(system: System, tmp_path: Path) -> None:
    from conftest import load_card

    from svcard.fixtures import fixture_path
    from svcard.host.demo.system import card_image
    from svcard.host.pay import client as C
    from svcard.host.terminal.journal import Journal
    from svcard.host.terminal.reader_specs import open_reader

    card = card_image(tmp_path, ep=0)
    journal = Journal(tmp_path / "j.jsonl")
    load_card(system, card, journal, 3_000)
    with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
        C.pay(system.pay.checkout_url("song", "fig6"), reader, journal=journal, http=http)
    system.close_batches()
    run_ = subprocess.run(
        [SVCARD, "clearing", "run", "--config", str(fixture_path("clearing-demo.toml")),
         "--batches", str(system.batch_dir), "--load-db", system.load.load_server.config.db_url,
         "--db", system.clearing_db, "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120)
    assert run_.returncode == 0, run_.stderr
    assert "1 cleared" in run_.stdout, run_.stdout
    assert not re.search(r"[{}\[\]]|': ", run_.stdout), run_.stdout
    # money with its currency (the configuration's currency_code), never bare minor units
    assert "CNY 0.99 paid to merchants" in run_.stdout and "minor units" not in run_.stdout, \
        run_.stdout
