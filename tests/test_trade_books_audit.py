"""The trading sessions' books in ``svcard audit --trade-db`` (seed 004): after sessions cleared
through the real servers (two operators, JPY, KWD and USD merchants, EUR customers), the audit
of every party's database is clean; a book row changed afterwards (a posting, a deposit
record, a withdrawal record, a rounding posting) is found: exit 1 and one line naming the
account (or session) and the currency. A database that is no trading party's is refused
(exit 3)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result
from test_trade_close import Clock, opened, wait_delivered

from svcard.host.cli.main import main
from svcard.host.trade import customer as C
from svcard.host.trade.stack import add_operator, start_trade


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="svcard")


@pytest.fixture(scope="module")
def cleared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder holding the parties' databases after four sessions cleared (servers stopped)."""
    folder = tmp_path_factory.mktemp("trade-audit") / "trade"
    stack = start_trade(folder, merchants={"shop": "JPY", "kiosk": "KWD"}, clock=Clock(),
                        close_seconds=3600)
    add_operator(stack, folder, "op2", {"deli": "USD"}, close_seconds=3600)
    try:
        with httpx.Client(timeout=30) as http:
            for merchant, units in (("shop", 3), ("kiosk", 2), ("deli", 4), ("shop", 1)):
                s = opened(stack, http, who=f"c{merchant}{units}", merchant=merchant, unit=1)
                C.buy(http, s, "song", units)
                assert C.close(http, s)["clearing"]["outcome"] == "agreed"
                wait_delivered(stack, s.session)
    finally:
        stack.close()
    yield folder


def dbs(folder: Path) -> list[str]:
    args = []
    for name in ("acq1", "acq2", "am1", "mam1", "mam2", "shop"):
        args += ["--trade-db", f"sqlite:///{folder / (name + '.db')}"]
    return args


def copy(folder: Path, into: Path) -> Path:
    into.mkdir()
    for db in folder.glob("*.db"):
        with sqlite3.connect(db) as src, sqlite3.connect(into / db.name) as dst:
            src.backup(dst)
    return into


def change(db: Path, sql: str) -> None:
    with sqlite3.connect(db) as conn:
        assert conn.execute(sql).rowcount == 1
    conn.close()


def test_the_trade_books_audit_clean(cleared: Path) -> None:
    r = run("audit", *dbs(cleared))
    assert r.exit_code == 0, r.output
    assert "trade paid to merchants JPY" in r.output and "trade withdrawals EUR" in r.output
    assert "[ok] trade postings KWD sum to 0" in r.output


@pytest.mark.parametrize("db,sql,line", [
    ("acq1.db", "UPDATE trade_acq_postings SET minor = minor + 1 WHERE id = (SELECT max(id) "
     "FROM trade_acq_postings WHERE account = 'merchant:shop')",
     "account merchant:shop JPY: the agents paid"),
    ("mam2.db", "UPDATE trade_mam_deposits SET amount = amount - 1",
     "account merchant:deli USD: the agents paid"),
    ("acq2.db", "UPDATE trade_acq_postings SET minor = minor + 1 WHERE id = (SELECT max(id) "
     "FROM trade_acq_postings WHERE account = 'rounding' AND currency = 'EUR')",
     "acq2 account rounding EUR:"),
    ("am1.db", "UPDATE trade_am_withdrawals SET amount = amount + 2 WHERE id = 1",
     "account customer:"),
])
def test_a_tampered_book_row_is_found(cleared: Path, tmp_path: Path, db: str, sql: str,
                                      line: str) -> None:
    folder = copy(cleared, tmp_path / "copy")
    change(folder / db, sql)
    r = run("audit", *dbs(folder))
    assert r.exit_code == 1, r.output
    found = [x for x in r.output.splitlines() if line in x]
    assert found, r.output
    assert any(code in found[0] for code in ("JPY", "KWD", "USD", "EUR")), found


def test_a_database_of_no_trading_party_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    r = run("audit", "--trade-db", f"sqlite:///{other}")
    assert r.exit_code == 3 and "not a trading-session party database" in r.output, r.output
    r = run("audit", "--trade-db", f"sqlite:///{tmp_path / 'missing.db'}")
    assert r.exit_code == 3, r.output


def test_the_audit_needs_the_mediating_agents(cleared: Path) -> None:
    r = run("audit", "--trade-db", f"sqlite:///{cleared / 'am1.db'}")
    assert r.exit_code != 0 and "needs the mediating agents" in r.output, r.output
