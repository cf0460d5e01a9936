"""Database plumbing shared by the servers: SQLite (WAL, synchronous FULL) or PostgreSQL by URL,
through SQLAlchemy Core."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, MetaData, create_engine, event


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
