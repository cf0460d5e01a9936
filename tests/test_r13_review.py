"""Review of issue 13's code (seed 001) by an attacker and a payment engineer: each test here
failed on the code before its fix (helper R-13)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from test_sp_audit import audit, books, tampered  # noqa: F401  (books: its fixture)

from svcard.host.kit.serving import ServerThread
from svcard.host.pay.merchant import pon as MP
from svcard.host.pay.merchant.server import MerchantConfig, MerchantServer
from svcard.host.sp.server.pon import set_merchant_key
from svcard.host.sp.signing import new_key, signed_pon_order
from svcard.host.sp.stack import demo_config, start_sp

CLIENT = {"X-Svcard-Client": "1"}


class NeverPays:
    def pay(self, *_a: Any, **_k: Any) -> Any:
        raise AssertionError("a bad merchant answer reached the payment")


def test_a_merchant_answer_without_end_is_not_read_whole(tmp_path: Path) -> None:
    """A merchant (gone bad, or anyone on the path to it) answering the SP's PON question with
    a body that never ends: the SP stops reading past its 4 KiB bound and answers 502, instead
    of reading (and holding in memory) whatever comes until the stream stops."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    sent = [0]
    stop = [False]

    async def endless() -> AsyncIterator[bytes]:
        chunk = b"x" * 65536
        while not stop[0] and sent[0] < 32 << 20:
            sent[0] += len(chunk)
            yield chunk
            await asyncio.sleep(0.005)

    async def quote(_request: Request) -> StreamingResponse:
        return StreamingResponse(endless(), media_type="application/json")

    _private, public = new_key()
    fake = ServerThread(Starlette(routes=[Route("/v1/pon/{pon}", quote)])).start()
    sp = start_sp(demo_config(tmp_path / "sp", "http://127.0.0.1:9",
                              merchants={"FAKE": fake.url}), NeverPays())
    try:
        set_merchant_key(sp.engine, "FAKE", public, 0)
        oz = sp.customer("oz")
        body, headers = signed_pon_order(oz.key, "oz", "FAKE", "ef" * 16)
        started = time.monotonic()
        try:
            got = httpx.post(f"{sp.url}/v1/orders/pon", content=body, headers=headers,
                             timeout=8)
        except httpx.TimeoutException:
            pytest.fail(f"the SP was still reading the merchant's answer after 8 s "
                        f"({sent[0]} bytes sent)")
        assert got.status_code == 502, got.text
        assert time.monotonic() - started < 8
        assert sent[0] <= 1 << 20, f"the merchant could send {sent[0]} bytes"
    finally:
        stop[0] = True
        sp.close()
        fake.stop()


@pytest.fixture
def pon_merchant(tmp_path: Path) -> Iterator[tuple[MerchantServer, ServerThread]]:
    private, _public = new_key()
    server = MerchantServer(MerchantConfig(
        b"R13SHOP1", os.urandom(32), "http://127.0.0.1:9", b"\x00\x00\x00\x00\x0a\x01",
        db_url=f"sqlite:///{tmp_path / 'merchant.db'}", max_open_per_client=2,
        pon=MP.PonSettings(private, "SHOP")))
    thread = ServerThread(server.app()).start()
    try:
        yield server, thread
    finally:
        thread.stop()
        server.close()


def test_refused_pon_checkouts_leave_no_rows_behind(
        pon_merchant: tuple[MerchantServer, ServerThread], http: httpx.Client) -> None:
    """A checkout of a PON refused for the open-order bound (429/503) wrote its PON link all
    the same: anyone holding a PON (they are free to make) grew the merchant's database by a
    row per request, without bound. Now only an admitted checkout keeps its link."""
    server, thread = pon_merchant
    made = http.post(f"{thread.url}/v1/pon", json={"sku": "song", "customer": "eve"},
                     headers=CLIENT).json()
    codes = [http.post(f"{thread.url}/v1/pon/{made['pon']}/checkout", headers=CLIENT
                       ).status_code for _ in range(12)]
    assert codes[:2] == [200, 200] and set(codes[2:]) <= {429, 503}, codes
    with server.db.engine.connect() as conn:
        links = conn.execute(select(func.count()).select_from(MP.pon_txns)).scalar_one()
    assert links == 2, f"{links} PON links for 2 admitted checkouts"


# --- the SP audit (settle/sp_books.py): tampering it stayed silent on --------------------------


def _copy_row(conn: Any, table: str, where: str, **changes: Any) -> None:
    conn.row_factory = sqlite3.Row
    row = dict(conn.execute(f"SELECT * FROM {table} WHERE {where}").fetchone())
    row.pop("id", None)
    row.update(changes)
    conn.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES "
                 f"({', '.join('?' for _ in row)})", tuple(row.values()))


def test_one_card_debit_behind_two_billed_orders_is_a_finding(books: dict[str, Any],  # noqa: F811
                                                              tmp_path: Path) -> None:
    """An SP insider bills eve a second time for one purchase: a forged order, a pool payment
    that reuses the real payment's card counter (so a merchant 'received' it), its bill line,
    eve's open total, and the purse's opening balance raised to close (c). Each sum closed;
    but one card debit (purse, counter) cannot pay two orders."""
    db = tampered(books, tmp_path)
    path = db.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        ref = conn.execute("SELECT p.order_ref FROM sp_purse_payments p JOIN sp_orders o "
                           "ON o.order_ref = p.order_ref WHERE o.customer = 'eve'").fetchone()[0]
        where = f"order_ref = '{ref}'"
        _copy_row(conn, "sp_orders", where, order_ref="spo-forged", order_key="ab" * 16)
        _copy_row(conn, "sp_purse_payments", where, order_ref="spo-forged", txn_id=None)
        _copy_row(conn, "sp_bill_lines", where, order_ref="spo-forged")
        billed, = conn.execute(f"SELECT billed FROM sp_bill_lines WHERE {where}").fetchone()
        amount, serial = conn.execute("SELECT amount, purse_serial FROM sp_purse_payments "
                                      f"WHERE {where}").fetchone()
        conn.execute(f"UPDATE sp_customers SET open_total = open_total + {billed} "
                     "WHERE id = 'eve'")
        conn.execute(f"UPDATE sp_purses SET opening_balance = opening_balance + {amount} "
                     f"WHERE serial = '{serial}'")
    report = audit(books, db)
    assert not report.clean, "a second bill for one card debit: the audit said clean"
    assert any("spo-forged" in d and ref in d for d in report.discrepancies), \
        report.discrepancies


def test_an_issued_bill_deleted_is_a_finding(
        books: dict[str, Any], tmp_path: Path) -> None:  # noqa: F811
    """dora's issued bill deleted and her debt set to 0: her billed lines still name the bill,
    which is gone, so the money she owes vanished from every sum the audit made."""
    db = tampered(books, tmp_path, "DELETE FROM sp_bills WHERE customer = 'dora'",
                  "UPDATE sp_customers SET owed = 0 WHERE id = 'dora'")
    report = audit(books, db)
    assert not report.clean, "a deleted bill: the audit said clean"
    assert any("no such bill" in d for d in report.discrepancies), report.discrepancies


# --- FIG. 4B: the shared POS ---------------------------------------------------------------
def test_two_merchants_naming_one_terminal_are_refused() -> None:
    """Clearing pays a terminal's records to the one merchant its [[terminal]] names: two
    merchants of a shared POS on one terminal id would have B's payments paid to A. Such a
    configuration is refused (one line naming both merchants) instead of served."""
    from svcard.host.kit.reader_pool import PoolError
    from svcard.host.pay.server.app import MerchantAccount, merchant_terminals

    a, b, c = b"MERCH00A", b"MERCH00B", b"MERCH00C"
    t1, t2 = bytes.fromhex("000000000A01"), bytes.fromhex("000000000B02")
    key = os.urandom(32)
    fine = {a: MerchantAccount(a, key, terminal_id=t1), b: MerchantAccount(b, key, terminal_id=t2)}
    assert merchant_terminals(fine) == {t1, t2}
    shared = {**fine, c: MerchantAccount(c, key, terminal_id=t1)}
    with pytest.raises(PoolError, match=r"4D45524348303041.*4D45524348303043.*000000000A01"):
        merchant_terminals(shared)
    assert merchant_terminals({a: MerchantAccount(a, key), b: MerchantAccount(b, key)}) == set()


def test_the_health_check_probes_every_psam_of_a_shared_pos(tmp_path: Path) -> None:
    """On a shared POS every PSAM waits in its terminal's queue, so the health check's
    ``acquire`` found none free and counted them all "in use": a dead PSAM was never seen
    and the server reported healthy. Now each free PSAM, of whatever terminal, is probed."""
    from svcard.host.kit.health import pool_check
    from svcard.host.pay.server.psam_pool import PsamPool
    from svcard.host.pay.stack import psam_images
    from svcard.host.terminal.reader_specs import open_reader

    terminals = (bytes.fromhex("000000000A01"), bytes.fromhex("000000000B02"))
    readers = []
    for i, tid in enumerate(terminals):
        folder = tmp_path / tid.hex()
        folder.mkdir()
        readers += [open_reader(f"virtual:{p}")
                    for p in psam_images(folder, 1, tid, first_serial=i + 1)]
    probed: list[str] = []

    def probe(reader: Any) -> None:
        probed.append(reader.name)
        if len(probed) == 2:
            raise ValueError("this PSAM does not answer")

    async def run() -> dict[str, Any]:
        pool = PsamPool(readers, terminals=frozenset(terminals))
        await pool.start()
        try:
            report = await pool_check(pool, probe)()
            assert pool.idle == 2   # every PSAM given back to its own terminal's queue
            assert {(await pool.acquire_for(t, 0.05)).terminal_id for t in terminals} == \
                set(terminals)
            return report
        finally:
            pool.close()

    report = asyncio.run(run())
    assert (report["answered"], report["in_use"], len(report["failed"])) == (1, 0, 1), report


# --- the operator's decision (sp/operator.py) ----------------------------------------------
def test_a_purses_first_payment_counter_0_is_settled_by_the_payment_server(
        tmp_path: Path) -> None:
    """A new purse's first payment is made at offline counter 0. The operator compared
    ``pay["counter"] or -1`` with the payment server's counter, so the honest record of a
    counter-0 payment was 'another payment, not evidence' and the order stayed undecided."""
    from test_sp_operator import Books

    book = Books(tmp_path)
    book.pool_row("disputed", counter=0)
    book.payment_server("confirmed", counter=0)
    decision = book.settle(payment_dbs=(book.pay_url,))
    assert decision.state == "billed", decision
    assert book.book.payment(book.ref)["state"] == "paid"
