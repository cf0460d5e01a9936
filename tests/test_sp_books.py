"""The SP's books at the database level: the billability check and the credit reservation as
one step under real concurrency, replays, the bill arithmetic and the readable bill. The same
checks run on PostgreSQL in tests/test_sp_pg.py (``check_*`` below take a database URL)."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from pathlib import Path

from sqlalchemy import Engine

from svcard.host.sp import db as D
from svcard.host.sp import records
from svcard.host.sp.billing import bill_order, bill_text, close_now, settle_bill
from svcard.host.sp.config import Item
from svcard.host.sp.customers import add_customer
from svcard.host.sp.server import orders as O
from svcard.host.sp.server.payment import record_failed, record_paid
from svcard.host.sp.signing import new_key

SONG = Item("MERCH001", "song", "One song", retail=120, max_wholesale=120, fee=5,
            pass_on_percent=50, checkout_url="http://127.0.0.1:1/v1/checkout/song")
NOW = 1_790_000_000_000


def request(customer: str, key: str) -> O.OrderRequest:
    return O.OrderRequest(customer, "MERCH001", "song", key, NOW // 1000)


def check_concurrent_admissions(url: str, threads: int = 16) -> None:
    """``threads`` orders at once against a limit that fits exactly three (3 x 1.25)."""
    engine = D.make_engine(url)
    try:
        add_customer(engine, "alice", new_key()[1], 3 * 125, 156)
        barrier = threading.Barrier(threads)

        def one(i: int) -> O.Admission:
            barrier.wait()
            return O.admit(engine, request("alice", f"{i:032x}"), SONG, "d", 156, NOW)

        with cf.ThreadPoolExecutor(threads) as ex:
            results = list(ex.map(one, range(threads)))
        states = sorted(r.state for r in results)
        assert states == ["paying"] * 3 + ["rejected"] * (threads - 3), states
        assert {r.kind for r in results if r.state == "rejected"} == {"credit_limit"}
        [c] = records.customers(url)
        assert c["reserved"] == 375
        assert len(records.orders(url, "paying")) == 3
        assert len(records.order_log(url)) == threads
    finally:
        engine.dispose()


def check_concurrent_replays(url: str, threads: int = 12) -> None:
    """One order key sent by ``threads`` at once: one order, one reservation."""
    engine = D.make_engine(url)
    try:
        add_customer(engine, "bob", new_key()[1], 100_000, 156)
        barrier = threading.Barrier(threads)

        def one(_i: int) -> O.Admission:
            barrier.wait()
            return O.admit(engine, request("bob", "ab" * 16), SONG, "d", 156, NOW)

        with cf.ThreadPoolExecutor(threads) as ex:
            results = list(ex.map(one, range(threads)))
        assert sorted(r.state for r in results) == ["paying"] + ["replay"] * (threads - 1)
        assert len({r.order_ref for r in results}) == 1
        [c] = records.customers(url)
        assert c["reserved"] == 125
    finally:
        engine.dispose()


def test_concurrent_admissions_sqlite(tmp_path: Path) -> None:
    check_concurrent_admissions(f"sqlite:///{tmp_path / 'sp.db'}")


def test_concurrent_replays_sqlite(tmp_path: Path) -> None:
    check_concurrent_replays(f"sqlite:///{tmp_path / 'sp.db'}")


class Paid:
    def __init__(self, amount: int, txn: str) -> None:
        self.amount, self.txn_id, self.goods = amount, txn, "goods"
        self.receipt = {"amount": amount}
        self.purse_serial = "9000001"


def _paid_order(engine: Engine, customer: str, key: str, wholesale: int) -> str:
    admission = O.admit(engine, request(customer, key), SONG, "d", 156, NOW)
    assert admission.state == "paying"
    assert record_paid(engine, admission.order_ref, Paid(wholesale, key))  # type: ignore[arg-type]
    return admission.order_ref


def test_bill_lines_bills_and_payment_of_a_bill(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sp.db'}"
    engine = D.make_engine(url)
    add_customer(engine, "carol", new_key()[1], 100_000, 156)
    cheap = _paid_order(engine, "carol", "01" * 16, 99)     # merchant's discount 0.21
    dear = _paid_order(engine, "carol", "02" * 16, 130)     # dearer than retail: no discount
    assert bill_order(engine, cheap, 10_000, 14, NOW)["billed"] == 120 + 5 - 10  # type: ignore[index]
    assert bill_order(engine, dear, 10_000, 14, NOW)["billed"] == 125            # type: ignore[index]
    assert bill_order(engine, dear, 10_000, 14, NOW) is None                     # billed once
    over = [e for e in records.order_log(url, dear) if e["event"] == "over_price"]
    assert len(over) == 1 and '"wholesale": 130' in over[0]["detail"]
    failed = O.admit(engine, request("carol", "03" * 16), SONG, "d", 156, NOW).order_ref
    assert record_failed(engine, failed, "no purse")
    assert not record_paid(engine, failed, Paid(99, "x"))   # a failed order is never paid
    [c] = records.customers(url)
    assert (c["reserved"], c["open_total"], c["owed"]) == (0, 240, 0)
    bill = close_now(engine, "carol", 14, NOW + 1)
    assert bill is not None and close_now(engine, "carol", 14, NOW + 2) is None
    [b] = records.bills(url)
    assert (b["total"], b["lines"], b["trigger"]) == (240, 2, "manual")
    # each line: billed = retail + fee - discount; the bill: the sum of its lines
    assert all(x["billed"] == x["retail"] + x["fee"] - x["discount"] for x in b["items"])
    text = bill_text(b, b["items"], 2)
    assert "customer carol" in text and "CNY 2.40" in text and "-0.10" in text
    assert text.count("One song") == 2
    [c] = records.customers(url)
    assert (c["open_total"], c["owed"]) == (0, 240)
    assert settle_bill(engine, bill) and not settle_bill(engine, bill)
    [c] = records.customers(url)
    assert c["owed"] == 0
    engine.dispose()


def test_credit_limit_change_from_the_command_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from svcard.host.cli.main import main

    db = f"sqlite:///{tmp_path / 'sp.db'}"
    engine = D.make_engine(db)
    add_customer(engine, "dora", new_key()[1], 100, 156)
    engine.dispose()
    result = CliRunner().invoke(main, ["sp", "customer", "limit", "dora", "12.50", "--db", db])
    assert result.exit_code == 0, result.output
    assert records.customers(db)[0]["credit_limit"] == 1250
    assert CliRunner().invoke(main, ["sp", "customer", "limit", "nobody", "1", "--db", db]
                              ).exit_code == 1
    assert CliRunner().invoke(main, ["sp", "customer", "limit", "dora", "-1", "--db", db]
                              ).exit_code == 2
