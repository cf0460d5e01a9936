"""Database plumbing shared by the servers: SQLite (WAL, synchronous FULL) or PostgreSQL by URL,
through SQLAlchemy Core.

A SQLite database file is created mode 0600 before SQLite opens it (its -wal and -shm files take
the database file's mode), and an existing one is narrowed to 0600: rows hold secret hashes and
transaction data. :func:`storage_reason` says, without quoting the driver (whose messages can
carry SQL parameters), why a database could not do its work.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from typing import Any

from sqlalchemy import Engine, MetaData, Table, create_engine, event, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

DB_FILE_MODE = 0o600


class DuplicateError(Exception):
    """A unique key said no: the request is a replay or a race."""


def make_engine(url: str, metadata: MetaData) -> Engine:
    """An engine for ``url`` with ``metadata``'s tables created if missing."""
    if url.startswith("sqlite"):
        _private_sqlite_file(url)
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


def _private_sqlite_file(url: str) -> None:
    """Create the SQLite file of ``url`` as 0600 (or narrow an existing one to 0600)."""
    path = make_url(url).database
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, DB_FILE_MODE)
    except FileNotFoundError:
        return  # no folder: SQLite says so itself
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, DB_FILE_MODE)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):  # left by an older run with a wider mode
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(os.stat(path + suffix).st_mode) & 0o077:
                os.chmod(path + suffix, DB_FILE_MODE)


_REASONS = (
    (("database or disk is full", "no space left on device", "could not extend file",
      "disk full", "diskfull", "quota exceeded"), "the database's disk is full"),
    (("readonly database", "read-only", "read only"), "the database cannot be written (read-only)"),
    (("disk i/o error",), "the database's disk failed (I/O error)"),
    (("database is locked", "database table is locked"), "the database is busy"),
)


def storage_reason(exc: BaseException) -> str:
    """Why the database could not do its work, in words safe to show a client; ends with
    "try again later" (the failed transaction was rolled back: nothing changed)."""
    if isinstance(exc, PoolTimeoutError):
        return "the database is busy (no free connection); try again later"
    orig = exc.orig if isinstance(exc, OperationalError) else exc
    text = str(orig).lower()
    sqlstate = str(getattr(orig, "sqlstate", "") or "")
    if sqlstate.startswith("53"):
        text += " disk full" if sqlstate == "53100" else ""
    for needles, reason in _REASONS:
        if any(n in text for n in needles):
            return f"{reason}; try again later"
    return "the database is unavailable; try again later"


def now_ms() -> int:
    return int(time.time() * 1000)


def first_row(engine: Engine, table: Table, **where: Any) -> dict[str, Any] | None:
    """The first row of ``table`` whose columns equal ``where``, as a dict."""
    query = select(table).where(*(table.c[name] == value for name, value in where.items()))
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return dict(row._mapping) if row is not None else None


def update_row(engine: Engine, table: Table, row_id: int, *, expect: str | None = None,
               **values: Any) -> bool:
    """Change one row (by ``id``) and stamp it ``updated``. With ``expect``, a compare-and-set
    in one statement: only if the row's ``state`` is still ``expect``; False if another request
    changed it first (the caller re-reads). A unique key that says no is a
    :class:`DuplicateError`."""
    where = [table.c.id == row_id]
    if expect is not None:
        where.append(table.c.state == expect)
    try:
        with engine.begin() as conn:
            result = conn.execute(update(table).where(*where).values(
                updated=now_ms(), **values))
    except IntegrityError as exc:
        raise DuplicateError(str(exc.orig)) from None
    return int(result.rowcount or 0) == 1
