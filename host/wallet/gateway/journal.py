"""The gateway's journal of card movements (reported by the financial system) and the daily
statements made from it (seed 003 steps b12, c12, d13: each member's transactions of a day,
sent the next day; here a file per member per day: e-mail and SMS are out of scope).

A statement is ``DIR/YYYY-MM-DD/MEMBER.json`` (UTC days), JSON with sorted keys:
``member``, ``day``, ``transactions`` (in time order: ``at`` ISO-8601 UTC, ``ref``, ``card``,
``kind`` cash|account|credit|debit, ``amount`` signed minor units (a debit is negative),
``currency``, ``balance`` after it, ``counterparty``, ``order``) and ``cards`` (per card:
``opening`` and ``closing`` balance of the day, ``credited``, ``debited``, ``currency``).
It is written to a temporary file in the same folder, flushed, and renamed over the old one
(atomic); made again from the same journal it is byte for byte the same.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError

from ...kit.db import now_ms, reading, step
from . import db as D
from .wallets import owner


def day_of(at_ms: int) -> str:
    return dt.datetime.fromtimestamp(at_ms / 1000, dt.UTC).strftime("%Y-%m-%d")


def record(engine: Engine, reports: list[dict[str, Any]]) -> tuple[int, int]:
    """(recorded, known before): each report once by its ref, in one step (a copy of the
    batch recorded at the same moment by another connection: the step runs again, and finds
    them known)."""
    try:
        return _record(engine, reports)
    except IntegrityError:
        return _record(engine, reports)


def _record(engine: Engine, reports: list[dict[str, Any]]) -> tuple[int, int]:
    new = known = 0
    j = D.journal.c
    with step(engine) as conn:
        for r in reports:
            if conn.execute(select(j.ref).where(j.ref == r["ref"])).first() is not None:
                known += 1
                continue
            conn.execute(insert(D.journal).values(
                ref=r["ref"], member=owner(conn, r["card"]), card=r["card"], kind=r["kind"],
                amount=-r["amount"] if r["kind"] == "debit" else r["amount"],
                currency=r["currency"], balance=r["balance"], counterparty=r["counterparty"],
                mall_order=r["order"], at=r["at"], day=day_of(r["at"]), received=now_ms()))
            new += 1
    return new, known


def entries(engine: Engine, day: str | None = None) -> list[dict[str, Any]]:
    j = D.journal.c
    query = select(D.journal).order_by(j.at, j.ref)
    if day is not None:
        query = query.where(j.day == day)
    with reading(engine) as conn:
        return [dict(r._mapping) for r in conn.execute(query).all()]


def statement(member: str, day: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    cards: dict[str, dict[str, int]] = {}
    transactions = []
    for r in rows:
        c = cards.setdefault(r["card"], {"opening": r["balance"] - r["amount"], "credited": 0,
                                         "debited": 0, "currency": r["currency"]})
        c["closing"] = r["balance"]
        c["credited" if r["amount"] > 0 else "debited"] += abs(r["amount"])
        at = dt.datetime.fromtimestamp(r["at"] / 1000, dt.UTC)
        transactions.append({
            "at": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "ref": r["ref"], "card": r["card"], "kind": r["kind"], "amount": r["amount"],
            "currency": r["currency"], "balance": r["balance"],
            "counterparty": r["counterparty"], "order": r["mall_order"]})
    return {"member": member, "day": day, "transactions": transactions, "cards": cards}


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def write_statements(engine: Engine, folder: Path, day: str) -> list[Path]:
    """Every member's statement of ``day`` (YYYY-MM-DD) with a transaction that day."""
    dt.date.fromisoformat(day)   # ValueError on a malformed day
    by_member: dict[str, list[dict[str, Any]]] = {}
    for row in entries(engine, day):
        if row["member"]:
            by_member.setdefault(row["member"], []).append(row)
    written = []
    for member, rows in sorted(by_member.items()):
        path = folder / day / f"{member}.json"
        body = json.dumps(statement(member, day, rows), sort_keys=True, indent=1) + "\n"
        write_atomically(path, body.encode())
        written.append(path)
    return written
