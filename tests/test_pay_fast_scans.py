"""The payment database never scans its whole table for a restart, a batch close or the late
proofs (issue 16, point 2): each of those queries reads a partial index holding only the rows it
looks for, so its cost follows those rows, not the days of purchases behind them. Checked with
SQLite's EXPLAIN QUERY PLAN on the very statements the methods run, and on the rows they find."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event, inspect, text

from svcard.host.pay.server import db as D


def _row(i: int, state: str, **more: Any) -> dict[str, Any]:
    return {"merchant_id": "aa" * 8, "txn_id": f"{i:032x}", "variant": 3, "amount": 100,
            "currency_code": 156, "card_serial": f"{i:020x}", "card_counter": i,
            "draw_digest": "00" * 32, "node": "n1", "reason": "", "proof_handed": 0,
            "created": 1, "updated": 1, "state": state, **more}


def _filled(tmp_path: Path) -> D.PaymentDb:
    db = D.PaymentDb(D.make_engine(f"sqlite:///{tmp_path / 'pay.db'}"))
    rows = [_row(i, "confirmed", psam_id="11" * 10, ttn=i, tac="01020304",
                 batch="b1", proof_handed=1) for i in range(200)]
    rows += [_row(1000, "received"), _row(1001, "busy"),
             _row(1002, "confirmed", psam_id="11" * 10, ttn=1002, tac="0a0b0c0d", batch="b2"),
             _row(1003, "released", psam_id="11" * 10, ttn=1003, batch="b2")]
    with db.engine.begin() as conn:
        for row in rows:
            conn.execute(D.payments.insert(), row)
        conn.exec_driver_sql("ANALYZE")
    return db


def _plans(db: D.PaymentDb, run: Any) -> list[str]:
    """What ``run`` made SQLite do: the query plan of every statement it ran on ``payments``."""
    seen: list[tuple[str, Any]] = []

    def look(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        if "payments" in statement and not statement.lstrip().upper().startswith("EXPLAIN"):
            seen.append((statement, params))

    event.listen(db.engine, "before_cursor_execute", look)
    try:
        run()
    finally:
        event.remove(db.engine, "before_cursor_execute", look)
    assert seen, "the method ran no statement on payments"
    plans = []
    raw = db.engine.raw_connection()
    try:
        for statement, params in seen:
            detail = [r[3] for r in raw.cursor().execute(f"EXPLAIN QUERY PLAN {statement}",
                                                          params).fetchall()]
            plans.append(" | ".join(detail))
    finally:
        raw.close()
    return plans


def _indexed(plans: list[str], index: str) -> None:
    """Every step of every plan goes through ``index`` (a scan of a partial index reads only
    the rows it holds); none reads the table itself."""
    for plan in plans:
        for detail in plan.split(" | "):
            assert f"USING INDEX {index}" in detail or f"USING COVERING INDEX {index}" \
                in detail, plan


def test_a_restart_reads_only_the_open_draws(tmp_path: Path) -> None:
    db = _filled(tmp_path)
    plans = _plans(db, lambda: db.recover(alive=["n2"]))
    _indexed(plans, "ix_payments_open_draws")
    assert db.counts()["voided"] == 2
    _indexed(_plans(db, db.recover), "ix_payments_open_draws")


def test_the_late_proofs_read_only_late_rows(tmp_path: Path) -> None:
    db = _filled(tmp_path)
    found: list[list[dict[str, Any]]] = []
    plans = _plans(db, lambda: found.append(db.late_proofs()))
    _indexed(plans, "ix_payments_late_proofs")
    assert [r["ttn"] for r in found[0]] == [1002]   # confirmed after b2 left; 1003 not yet


def test_a_batch_name_is_looked_up_by_index(tmp_path: Path) -> None:
    db = _filled(tmp_path)
    _indexed(_plans(db, lambda: db.batch_named("b2")), "ix_payments_batch")
    assert db.batch_named("b2") and not db.batch_named("b9")


def test_a_database_made_before_the_indexes_gets_them(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'pay.db'}"
    engine = D.make_engine(url)
    with engine.begin() as conn:
        for index in D.SCANLESS:
            conn.execute(text(f"DROP INDEX {index.name}"))
    engine.dispose()
    engine = D.make_engine(url)
    names = {i["name"] for i in inspect(engine).get_indexes("payments")}
    engine.dispose()
    assert {str(i.name) for i in D.SCANLESS} <= names
