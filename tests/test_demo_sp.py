"""``svcard demo`` runs the service provider too (seed 001): its purse pool tops up from the
demo bank, pays the demo merchant for a customer without a card, refuses a blocked customer and
one over its credit limit with nothing paid, and bills the customer; the closing clearing and
audit take the SP's purse payment in as an ordinary card payment. Also ``System.start_sp``."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from svcard.host.demo.story import run_demo
from svcard.host.demo.system import System, start_system
from svcard.host.sp import records


def test_the_demo_runs_the_sp_and_its_payment_is_cleared_and_audited(tmp_path: Path) -> None:
    story = run_demo(tmp_path / "demo", 10_000, 1_234)
    network = story.data["network"]
    sp = network["sp"]
    order = sp["order"]
    assert order["state"] == "billed" and order["goods"].startswith("https://")
    assert order["line"] == {"retail": 120, "wholesale": 99, "fee": 5, "discount": 10,
                             "billed": 115, "currency_code": 156}
    # two purses from the fixtures, empty: one topped up from the bank, then debited 0.99
    assert sp["topped_up"] == 5_000 and sp["bank_before"] - sp["bank_after"] == 5_000
    assert sorted(p["balance"] for p in sp["purses"]) == [0, 5_000 - 99]
    assert order["receipt"]["card_serial"] == sp["purse_serial"]
    assert [(r["customer"], r["status"], r["kind"]) for r in sp["refused"]] == [
        ("bob", 402, "blocked"), ("carol", 402, "credit_limit")]
    assert sp["bill"]["customer"] == "alice" and sp["bill"]["total"] == 115
    assert [ln["order_ref"] for ln in sp["bill_lines"]] == [order["order"]]
    # the SP database in the kept folder: one order paid, two refused, one bill
    db = f"sqlite:///{tmp_path / 'demo' / 'network' / 'sp' / 'sp.db'}"
    assert sorted(o["state"] for o in records.orders(db)) == ["billed", "rejected", "rejected"]
    spent = sum(p["amount"] for p in network["purchases"])
    assert network["clearing"]["total_paid"] == spent + 99
    assert network["clearing"]["total_loaded"] == 10_000 + 5_000
    audit = network["audit"]
    assert audit["clean"] is True
    assert audit["figures"]["card balances"] == 10_000 - spent + 5_000 - 99
    text = story.text
    for needle in ("SERVICE PROVIDER (seed 001)", "SP ORDER alice -> One song (MP3)",
                   "SP REFUSED, nothing paid: bob (blocked", "carol, credit limit CNY 1.00 "
                   "(credit_limit", "BILL 1  customer alice", "TOTAL", "CNY 1.15"):
        assert needle in text, needle
    # the SP's part comes before the clearing that pays its purchase
    assert text.index("SP BILL") < text.index("CLEARING:") < text.index("AUDIT:")
    json.dumps(story.data)          # --json prints all of it


@pytest.fixture
def system(tmp_path: Path) -> System:
    return start_system(tmp_path / "sys")


def test_a_system_starts_and_stops_its_sp(system: System, tmp_path: Path) -> None:
    try:
        sp = system.start_sp(ep=2_000, funds=10_000, topup_threshold=0)
        assert system.sp is sp and len(system.sp_purses) == 2
        with pytest.raises(RuntimeError, match="runs an SP already"):
            system.start_sp()
        who = sp.customer("dora")
        with httpx.Client(timeout=30) as http:
            answer = sp.order(http, who, "ticket")
        assert answer.status_code == 200, answer.text
        assert answer.json()["line"]["wholesale"] == 1250
        balances = sorted(json.loads(p.read_text())["app"]["ep"]["balance"]
                          for p in system.sp_purses)
        assert balances == [750, 2_000]     # no top-up needed: the purse paid from its own
        assert system.load.bank_server.db.account("sp")["balance"] == 10_000
        url = sp.url
        system.close_sp()
        assert system.sp is None
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/v1/health", timeout=2)
    finally:
        system.close()


def test_keep_refuses_a_folder_of_an_earlier_run(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from svcard.host.cli.main import main

    kept = tmp_path / "kept"
    (kept / "network").mkdir(parents=True)
    (kept / "network" / "marker").write_text("earlier run")
    result = CliRunner().invoke(main, ["demo", "--keep", str(kept)])
    assert result.exit_code == 2
    assert f"{kept}: holds an earlier demo run" in result.output
    assert sorted(p.name for p in kept.rglob("*")) == ["marker", "network"]   # untouched
