"""Database plumbing shared by the servers: SQLite (WAL, synchronous FULL) or PostgreSQL by URL,
through SQLAlchemy Core."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, MetaData, Table, create_engine, event, select, update
from sqlalchemy.exc import IntegrityError


class DuplicateError(Exception):
    """A unique key said no: the request is a replay or a race."""


def make_engine(url: str, metadata: MetaData) -> Engine:
    """An engine for ``url`` with ``metadata``'s tables created if missing."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()
    else:
        engine = create_engine(url, pool_size=20, max_overflow=10)
    metadata.create_all(engine)
    return engine


def now_ms() -> int:
    return int(time.time() * 1000)


def first_row(engine: Engine, table: Table, **where: Any) -> dict[str, Any] | None:
    """The first row of ``table`` whose columns equal ``where``, as a dict."""
    query = select(table).where(*(table.c[name] == value for name, value in where.items()))
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return dict(row._mapping) if row is not None else None


def update_row(engine: Engine, table: Table, row_id: int, **values: Any) -> None:
    """Change one row (by ``id``) and stamp it ``updated``; a unique key that says no is a
    :class:`DuplicateError`."""
    try:
        with engine.begin() as conn:
            conn.execute(update(table).where(table.c.id == row_id).values(
                updated=now_ms(), **values))
    except IntegrityError as exc:
        raise DuplicateError(str(exc.orig)) from None
