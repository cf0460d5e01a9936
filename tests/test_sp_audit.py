"""``svcard audit --sp-db``: the service provider's money closes three ways, to the minor unit
(issue 13, point 4): purse debits = what the merchants received, bill lines = payments made +
fees - discounts, loads = debits + balances. A tampered bill line, a deleted purse
debit, a forged top-up: each a finding naming the order or purse and the amounts."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from svcard.host.cli.main import main as cli
from svcard.host.demo.system import System, start_system
from svcard.host.settle.audit import AuditReport

OPENING = 2 * 1_500   # the two purses' personalised balances


@pytest.fixture(scope="module")
def books(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A system whose SP paid 3 orders for 2 customers (one purse topped up), billed them (one
    bill closed), then the PSAM batches closed and cleared; the SP stopped."""
    folder = tmp_path_factory.mktemp("spaudit")
    system = start_system(folder / "sys")
    try:
        sp = system.start_sp(ep=1_500, funds=20_000, topup_threshold=500, topup_amount=2_000)
        dora, eve = sp.customer("dora"), sp.customer("eve")
        with httpx.Client(timeout=30) as http:
            for who, sku in ((dora, "ticket"), (eve, "song"), (dora, "song")):
                answer = sp.order(http, who, sku)
                assert answer.status_code == 200, answer.text
        from svcard.host.sp.billing import close_now

        assert close_now(sp.engine, "dora", 30) is not None
        db = str(sp.config.db_url)
        system.close_sp()
        before = system.audit(list(system.sp_purses), OPENING, sp_dbs=(db,))
        system.close_batches()
        system.run_clearing()
        yield {"system": system, "db": db, "before": before, "folder": folder}
    finally:
        system.close()


def audit(books: dict[str, Any], db: str | None = None) -> AuditReport:
    system: System = books["system"]
    return system.audit(list(system.sp_purses), OPENING, sp_dbs=(db or books["db"],))


def tampered(books: dict[str, Any], tmp_path: Path, *sql: str) -> str:
    """A copy of the SP database with ``sql`` run on it; its URL."""
    path = tmp_path / "sp-copy.db"
    shutil.copy(books["db"].removeprefix("sqlite:///"), path)
    with sqlite3.connect(path) as conn:
        for statement in sql:
            conn.execute(statement)
    return f"sqlite:///{path}"


def test_the_sp_books_close_three_ways_after_clearing(books: dict[str, Any]) -> None:
    report = audit(books)
    assert report.clean, report.discrepancies
    f = report.figures
    names = [c["name"] for c in report.checks if c["name"].startswith("sp 156")]
    assert names == ["sp 156: purse debits = what the merchants received",
                     "sp 156: bill lines = retail + fees - discounts",
                     "sp 156: bill lines' wholesale = payments made for them",
                     "sp 156: loads + opening = purse debits + balances"]
    assert all(c["ok"] for c in report.checks)
    assert f["sp 156 purse debits"] == 1250 + 99 + 99 == f["sp 156 merchants received"]
    assert f["sp 156 bill lines wholesale"] == f["sp 156 bill lines payments"] == 1448
    assert f["sp 156 bill lines billed"] == (
        f["sp 156 bill lines retail"] + f["sp 156 bill lines fees"]
        - f["sp 156 bill lines discounts"])
    assert f["sp 156 purse loaded"] > 0            # a purse was topped up from the bank
    assert f["sp 156 purse loaded"] + f["sp 156 purse opening"] == (
        f["sp 156 purse debits"] + f["sp 156 purse balances"])
    assert report.sp_pending == []
    assert "clean" in report.text()


def test_before_clearing_the_debits_are_in_transit_and_listed(books: dict[str, Any]) -> None:
    before: AuditReport = books["before"]
    assert before.clean, before.discrepancies
    transit = [p for p in before.sp_pending if "not yet cleared" in p["text"]]
    assert len(transit) == 3 and {p["amount"] for p in transit} == {1250, 99}
    assert "SP items still open: 3" in before.text()


def test_a_tampered_bill_line_is_a_finding(books: dict[str, Any], tmp_path: Path) -> None:
    db = tampered(books, tmp_path, "UPDATE sp_bill_lines SET billed = billed - 1 "
                  "WHERE id = (SELECT min(id) FROM sp_bill_lines)")
    report = audit(books, db)
    assert not report.clean
    text = "\n".join(report.discrepancies)
    assert "bill line of order spo-" in text and "billed" in text
    assert "but the order makes it" in text
    assert any("bill lines = retail + fees - discounts" in d for d in report.discrepancies)


def test_a_bill_line_made_consistent_with_itself_still_fails(books: dict[str, Any],
                                                             tmp_path: Path) -> None:
    """Retail and billed both lowered by one: the line adds up, the order does not."""
    db = tampered(books, tmp_path, "UPDATE sp_bill_lines SET billed = billed - 1, "
                  "retail = retail - 1 WHERE id = (SELECT max(id) FROM sp_bill_lines)")
    report = audit(books, db)
    assert not report.clean
    assert any("retail" in d and "but the order makes it" in d for d in report.discrepancies)
    assert any("open total" in d or "bill " in d for d in report.discrepancies)


def test_a_deleted_purse_debit_is_a_finding(books: dict[str, Any], tmp_path: Path) -> None:
    db = tampered(books, tmp_path, "DELETE FROM sp_purse_payments WHERE amount = 1250")
    report = audit(books, db)
    assert not report.clean
    text = "\n".join(report.discrepancies)
    assert "a merchant received 1250 from provider purse" in text
    assert "the SP's books hold no purse debit for it" in text
    assert "no purse payment was made for it" in text      # its bill line
    assert "loads + opening = purse debits + balances" in text


def test_a_purse_debit_no_merchant_received_is_a_finding(books: dict[str, Any],
                                                         tmp_path: Path) -> None:
    db = tampered(books, tmp_path, "UPDATE sp_purse_payments SET counter = counter + 500 "
                  "WHERE amount = 1250")
    report = audit(books, db)
    assert any("reached no merchant" in d and "1250" in d for d in report.discrepancies)


def test_a_forged_top_up_is_a_finding(books: dict[str, Any], tmp_path: Path) -> None:
    """A top-up row the load server never loaded, with the purse's balance raised to match:
    the SP's own sums close, the load server's books do not."""
    db = tampered(books, tmp_path,
                  "INSERT INTO sp_purse_loads (purse_serial, request_id, txn_id, amount, "
                  "currency_code, state, reason, created, updated) SELECT serial, 'forged', "
                  "'f0f0', 700, currency_code, 'loaded', '', 0, 0 FROM sp_purses "
                  "ORDER BY serial LIMIT 1",
                  "UPDATE sp_purses SET balance = balance + 700 WHERE serial = "
                  "(SELECT min(serial) FROM sp_purses)")
    report = audit(books, db)
    assert any("top-up f0f0" in d and "nothing of it" in d for d in report.discrepancies)
    assert any("the card holds" in d for d in report.discrepancies)   # the card disagrees


def test_an_order_paid_and_failed_is_a_finding(books: dict[str, Any], tmp_path: Path) -> None:
    db = tampered(books, tmp_path, "UPDATE sp_orders SET state = 'failed' "
                  "WHERE id = (SELECT min(id) FROM sp_orders)")
    report = audit(books, db)
    assert any("paid and never billed" in d for d in report.discrepancies)


def test_the_audit_command_takes_sp_db(books: dict[str, Any], tmp_path: Path) -> None:
    system: System = books["system"]
    args = ["audit", "--sp-db", books["db"], "--clearing-db", system.clearing_db,
            "--payment-db", str(system.pay.payment_server.config.db_url),
            "--load-db", str(system.load.load_server.config.db_url),
            "--opening", str(OPENING)]
    for purse in system.sp_purses:
        args += ["--card", str(purse)]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["clean"] and data["figures"]["sp 156 purse debits"] == 1448
    bad = tampered(books, tmp_path, "UPDATE sp_bill_lines SET fee = fee + 3")
    args[2] = bad
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "bill line of order" in result.output
    missing = CliRunner().invoke(cli, ["audit", "--sp-db",
                                       f"sqlite:///{tmp_path / 'nope.db'}"])
    assert missing.exit_code == 3 and "nope.db" in missing.output
    assert "--sp-db" in CliRunner().invoke(cli, ["audit", "--help"]).output
