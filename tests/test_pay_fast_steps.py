"""A purchase's steps in the SQLite writer's group go to the driver directly (pay/server/db.py),
not through SQLAlchemy's execution machinery (~25 us a statement there), and mean the same:
the same rows, a unique key still a DuplicateError, a full disk still SQLAlchemy's
OperationalError (answered 503 with its reason)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from svcard.host.kit.db import DuplicateError, storage_reason
from svcard.host.kit.http import SqlRunner
from svcard.host.pay.server import db as D


def _draw(i: int) -> dict[str, Any]:
    return {"merchant_id": "aa" * 8, "txn_id": f"{i:032x}", "variant": 3, "amount": 250,
            "currency_code": 156, "card_serial": "11" * 10, "card_counter": i,
            "draw_digest": "0f" * 32, "node": None}


def _confirm(row: dict[str, Any]) -> dict[str, Any]:
    return {"state": "confirmed", "card_mac2": "01020304", "tac": "0a0b0c0d", "reason": "paid"}


def _purchase(sql: Any, db: D.PaymentDb, i: int) -> dict[str, Any] | None:
    async def run() -> dict[str, Any] | None:
        existing, row_id = await sql(db.get_or_insert, _draw(i))
        assert existing is None and row_id is not None
        again, _ = await sql(db.get_or_insert, _draw(i))
        assert again is not None and again["id"] == row_id and again["state"] == "received"
        assert await sql(db.advance, row_id, "received", None, state="released",
                         psam_id="22" * 10, ttn=i, txn_date="20261123", txn_time="050000",
                         mac1="00112233", expected_mac2="01020304", debit_command=b"\x01" * 40)
        assert not await sql(db.advance, row_id, "received", None, state="failed")
        row, won = await sql(db.take, "aa" * 8, f"{i:032x}", "released", _confirm)
        assert won and row["state"] == "released"
        with pytest.raises(DuplicateError):
            await sql(db.insert_received, _draw(i))
        return await sql(db.by_id, row_id)

    return asyncio.run(run())


async def _plain(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)   # not in the writer's group: SQLAlchemy all the way


def test_the_writers_steps_skip_sqlalchemy_and_mean_the_same(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fast.db'}"
    db, sql = D.PaymentDb(D.make_engine(url)), SqlRunner(url)
    seen: list[str] = []
    event.listen(db.engine, "before_cursor_execute",
                 lambda _c, _cur, statement, *_: seen.append(statement))
    try:
        fast = _purchase(sql, db, 1)
    finally:
        assert sql.executor is not None
        sql.executor.shutdown()
    assert not [s for s in seen if "payments" in s], seen   # no statement went through SA
    plain_db = D.PaymentDb(D.make_engine(f"sqlite:///{tmp_path / 'plain.db'}"))
    plain = _purchase(_plain, plain_db, 1)
    assert fast is not None and plain is not None
    stamps = ("created", "updated")
    assert {k: v for k, v in fast.items() if k not in stamps} == \
        {k: v for k, v in plain.items() if k not in stamps}
    assert fast["state"] == "confirmed" and fast["debit_command"] == b"\x01" * 40


def test_a_full_disk_in_the_writers_group_is_still_a_storage_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'full.db'}"
    engine = D.make_engine(url)
    with engine.connect() as conn:
        pages = int(conn.exec_driver_sql("PRAGMA page_count").scalar() or 0)
    engine.dispose()

    @event.listens_for(engine, "connect")
    def small(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute(f"PRAGMA max_page_count = {pages + 2}")

    db, sql = D.PaymentDb(engine), SqlRunner(url)

    async def fill() -> BaseException:
        for i in range(10_000):
            try:
                await sql(db.insert_received, {**_draw(i), "draw_digest": "ab" * 32})
            except Exception as exc:
                return exc
        raise AssertionError("the database never filled up")

    try:
        failure = asyncio.run(fill())
    finally:
        assert sql.executor is not None
        sql.executor.shutdown()
    assert isinstance(failure, OperationalError), repr(failure)
    assert storage_reason(failure) == "the database's disk is full; try again later"
