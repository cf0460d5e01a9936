"""The merchant answers an EXACT repeat of the confirmation that released an order with the same
goods and receipt (a client whose answer was lost, e.g. the SP's purse pool resuming after a
crash); any other confirmation for a released order gets 409 and nothing. Schema 2 of the
merchant database keeps the confirmation's digest and a counter of open orders, so a checkout
costs the same however many orders are open."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, event, select, text

from svcard.host.kit import schema as S
from svcard.host.pay import client as C
from svcard.host.pay.merchant import db as MD
from svcard.host.pay.stack import Stack
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader


class LosesTheAnswer(httpx.Client):
    """Sends the confirmation to the merchant (which releases the goods) and then loses the
    answer, as a process killed at that instant would; keeps the bytes sent."""

    sent: list[bytes]

    def post(self, url: Any, **kwargs: Any) -> httpx.Response:  # type: ignore[override]
        response = super().post(url, **kwargs)
        if "/v1/status/" in str(url):
            self.sent.append(kwargs["content"])
            if len(self.sent) == 1:
                raise httpx.ReadError("the answer was lost")
        return response


def _lost_answer(stack: Stack, card: Path, journal: Journal, variant: str) -> bytes:
    with LosesTheAnswer(timeout=30) as http, open_reader(f"virtual:{card}") as reader, \
            pytest.raises(httpx.ReadError):
        http.sent = []
        C.pay(stack.checkout_url("ticket", variant), reader, journal=journal, http=http)
    return http.sent[0]


@pytest.mark.parametrize("variant", ["fig5", "fig6", "fig8"])
def test_resume_after_a_lost_answer_gets_and_records_the_goods(
        stack: Stack, card: Path, tmp_path: Path, variant: str) -> None:
    journal = Journal(tmp_path / "journal.jsonl")
    first = _lost_answer(stack, card, journal, variant)
    assert stack.merchant_server.db.counts() == {"paid": 1}   # released to that confirmation
    with LosesTheAnswer(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
        http.sent = [b"already"]
        [done] = C.resume(reader, journal=journal, http=http)
        assert http.sent[1] == first   # the very same confirmation, byte for byte
    assert done["outcome"] == "completed" and done["goods"] == "TICKET-MUSEUM-0042", done
    assert done["receipt"]["amount"] == 1250 and done["item"] == "Museum e-ticket"
    last = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()][-1]
    assert last["state"] == "done" and last["goods"] == "TICKET-MUSEUM-0042"
    assert last["receipt"] == done["receipt"]
    assert stack.merchant_server.db.counts() == {"paid": 1}


def test_exact_repeat_same_goods_altered_repeat_nothing(stack: Stack, card: Path,
                                                        tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.jsonl")
    confirmation = _lost_answer(stack, card, journal, "fig6")
    [txn] = list(stack.merchant_server.orders)
    url = f"{stack.merchant.url}/v1/status/{txn.hex()}"
    one = httpx.post(url, content=confirmation, timeout=30)
    two = httpx.post(url, content=confirmation, timeout=30)
    assert one.status_code == two.status_code == 200 and one.json() == two.json()
    assert one.json()["goods"] == "TICKET-MUSEUM-0042" and one.json()["proven"] is True
    assert one.json()["receipt"] == json.loads(stack.merchant_server.db.get(txn.hex())["receipt"])
    # an attacker's forged or altered repeat: 409, no goods, nothing changed
    for forged in (confirmation[:-1] + bytes([confirmation[-1] ^ 1]), confirmation + b"\0",
                   b"SC" + bytes(200), b""):
        r = httpx.post(url, content=forged, timeout=30)
        assert r.status_code == 409, r.text
        assert r.json() == {"released": False, "reason": "this confirmation was already used: "
                                                         "goods released once"}
    # the exact confirmation for ANOTHER order: not that order's (404 or its own checks)
    other = C.fetch_checkout(httpx.Client(timeout=30), stack.checkout_url("ticket", "fig6"))
    r = httpx.post(f"{stack.merchant.url}/v1/status/{other['txn_id']}", content=confirmation,
                   timeout=30)
    assert r.status_code in (400, 402) and "goods" not in r.json(), r.text
    assert stack.merchant_server.db.counts() == {"paid": 1, "open": 1}


def _v1_database(url: str) -> None:
    """A merchant database as schema 1 made it: no ``confirmation`` column, no counter."""
    engine = MD.make_engine(url)
    engine.dispose()
    path = url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE merchant_counters")
        conn.execute("ALTER TABLE orders DROP COLUMN confirmation")
        conn.execute("UPDATE svcard_schema SET version = 1 WHERE component = 'merchant'")
        for i, (state, receipt) in enumerate([("open", ""), ("open", ""),
                                              ("paid", '{"amount": 99}')]):
            conn.execute(
                "INSERT INTO orders VALUES (?, 'song', 'Song', 'g', 99, 1, 0, '', '1.2.3.4', ?,"
                " 9e12, 9e12, ?, 1, 1)", (f"{i:032x}", state, receipt))


def test_schema_1_is_upgraded_and_an_old_release_stays_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'merchant.db'}"
    _v1_database(url)
    db = MD.OrderDb(MD.make_engine(url))
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(select(S.stamps.c.version).where(
            S.stamps.c.component == "merchant")).scalar() == MD.SCHEMA.version == 2
        assert conn.execute(text("SELECT value FROM merchant_counters")).scalar() == 2
        assert conn.execute(text("SELECT confirmation FROM orders")).scalars().all() == [
            None] * 3
    engine.dispose()
    # released before schema 2: no digest kept, so no confirmation repeats it
    from svcard.host.pay.merchant.server import MerchantConfig, MerchantServer
    server = MerchantServer(MerchantConfig(merchant_id=bytes(8), shared_key=bytes(16),
                                           payment_url="http://x", terminal_id=bytes(6),
                                           db_url=url))
    try:
        row = db.get(f"{2:032x}")
        assert row is not None
        assert server.released_again(row, MD.confirmation_digest(b"anything")).status_code == 409
    finally:
        server.close()
        db.engine.dispose()


# --- the open-order counter -----------------------------------------------------------------

def _row(i: int, client: str, until: int = 10**13) -> dict[str, Any]:
    return {"txn_id": f"{i:032x}", "sku": "song", "item": "Song", "goods": "g", "amount": 99,
            "variant": 1, "purpose": 0, "client_terminal": "", "client_address": client,
            "expires": until, "confirm_until": until, "created": 1}


def _open_in_db(db: MD.OrderDb) -> tuple[int, int]:
    with db.engine.connect() as conn:
        counted = conn.execute(text("SELECT COUNT(*) FROM orders WHERE state = 'open'")).scalar()
        kept = conn.execute(text("SELECT value FROM merchant_counters")).scalar()
    return int(counted or 0), int(kept or 0)


def test_counter_follows_create_release_and_sweep(tmp_path: Path) -> None:
    db = MD.OrderDb(MD.make_engine(f"sqlite:///{tmp_path / 'm.db'}"))
    try:
        assert [db.create(_row(i, f"c{i % 2}", 1000 if i < 3 else 10**13), 6, 3)
                for i in range(8)] == ["ok"] * 6 + ["full"] * 2
        assert _open_in_db(db) == (6, 6)
        assert db.release(f"{4:032x}", MD.PAID, "{}", 5, "ab" * 32)
        assert not db.release(f"{4:032x}", MD.PAID, "{}", 5, "cd" * 32)   # once
        assert _open_in_db(db) == (5, 5)
        assert db.create(_row(10, "c1"), 6, 3) == "client"   # c1 holds 1, 3, 5
        assert db.create(_row(11, "c0"), 6, 3) == "ok"       # c0 holds 0, 2 (4 was paid)
        assert db.create(_row(12, "c2"), 6, 3) == "full"
        assert _open_in_db(db) == (6, 6)
        assert db.sweep(2000) == 3   # 0, 1, 2 expired
        assert _open_in_db(db) == (3, 3)
        assert db.create(_row(13, "c0"), 6, 3) == "ok"
        assert _open_in_db(db) == (4, 4)
        with db.engine.begin() as conn:   # a lost counter row is counted again
            conn.execute(text("DELETE FROM merchant_counters"))
        assert db.create(_row(14, "c0"), 6, 3) == "ok"
        assert _open_in_db(db) == (5, 5)
    finally:
        db.engine.dispose()


def _with_open_orders(url: str, first: int, count: int, prefix: str) -> MD.OrderDb:
    """Add ``count`` open orders straight into the file, then open it as the merchant does
    (its counter counted again from the orders)."""
    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
        with contextlib.suppress(sqlite3.OperationalError):   # (a schema without a counter)
            conn.execute("DELETE FROM merchant_counters")
        columns = [*_row(0, ""), "state", "receipt", "updated"]
        conn.executemany(
            f"INSERT INTO orders ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
            [(*_row(first + i, f"{prefix}.{i % 250}.{i // 250 % 250}").values(), "open", "", 1)
             for i in range(count)])
    return MD.OrderDb(MD.make_engine(url))


def _vm_steps(db: MD.OrderDb, rows: list[dict[str, Any]]) -> int:
    """SQLite virtual-machine steps (in hundreds) that ``create`` of ``rows`` costs:
    deterministic, unlike a time."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    event.listen(db.engine, "connect", lambda conn, _: conn.set_progress_handler(tick, 100))
    db.engine.dispose()   # every connection from now on counts
    try:
        for row in rows:
            assert db.create(row, 10**6, 10**6) == "ok"
    finally:
        db.engine.dispose()
    return steps[0]


def test_checkout_cost_does_not_grow_with_open_orders(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    MD.make_engine(url).dispose()
    few = _vm_steps(_with_open_orders(url, 0, 6000, "10.0"),
                    [_row(10**6 + i, "9.9.9.9") for i in range(20)])
    many = _vm_steps(_with_open_orders(url, 2 * 10**6, 24000, "10.1"),
                     [_row(3 * 10**6 + i, "9.9.9.8") for i in range(20)])
    # 6,000 open orders -> 30,000: a count over them would cost 5x; kept, about the same
    print("VM steps (hundreds) for 20 checkouts:", few, many)
    assert many <= few * 1.5 + 2, (few, many)


def test_schema_1_upgrade_and_counter_on_postgresql() -> None:
    from pg_env import start_cluster

    cluster = start_cluster()
    try:
        url = cluster.new_database()
        MD.make_engine(url).dispose()
        old = create_engine(url)
        with old.begin() as conn:   # back to what schema 1 made
            conn.execute(text("DROP TABLE merchant_counters"))
            conn.execute(text("ALTER TABLE orders DROP COLUMN confirmation"))
            conn.execute(text("UPDATE svcard_schema SET version = 1"))
            for i, state in enumerate(["open", "open", "paid"]):
                conn.execute(MD.orders.insert().values(
                    **_row(i, "a"), state=state, receipt="", updated=1))
        old.dispose()
        db = MD.OrderDb(MD.make_engine(url))
        try:
            with db.engine.connect() as conn:
                assert conn.execute(text("SELECT version FROM svcard_schema")).scalar() == 2
                assert conn.execute(text("SELECT value FROM merchant_counters")).scalar() == 2
            assert [db.create(_row(10 + i, "a"), 3, 10) for i in range(2)] == ["ok", "full"]
            assert db.release(f"{10:032x}", MD.PAID, "{}", 5, "ab" * 32)
            assert db.sweep(10**14) == 2 and _open_in_db(db) == (0, 0)
        finally:
            db.engine.dispose()
    finally:
        cluster.stop()
