"""Database plumbing shared by the servers and the tools: SQLite (WAL, synchronous FULL) or
PostgreSQL by URL, through SQLAlchemy Core. :func:`make_engine` is a server's (the database
created if missing); :func:`open_existing` a tool's that only READS one (it must exist and
hold the tables read; SQLite ``mode=ro``/``immutable``, PostgreSQL a read-only session).
Either raises :class:`DatabaseError`: one line naming the database (password masked). A
SQLite file is mode 0600. :func:`storage_reason` says why a database failed, unquoted.
Steps use :func:`step` and :func:`reading`: on a SQLite server's writer thread
(:class:`.http.SqlRunner`) they share the :class:`StepGroup`'s one transaction (group
commit), each :func:`step` block in a SAVEPOINT (rolled back alone).
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, MetaData, Table, create_engine, event, inspect, select, update
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from .command_line import EXIT_INPUT

DB_FILE_MODE = 0o600
URL_FORMS = "sqlite:///FILE or postgresql+psycopg://USER@HOST/DB"


class DuplicateError(Exception):
    """A unique key said no: the request is a replay or a race."""


class DatabaseError(Exception):
    """A database that cannot be opened (or, for a reader, does not exist): one line naming
    the database (password masked) and the problem; exit 3 on the command line."""

    exit_code = EXIT_INPUT


def masked_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (also when it does not parse)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError, TypeError):
        return re.sub(r"(://[^/@:]*:)[^@/]*@", r"\1***@", url)


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except (ArgumentError, ValueError, TypeError):
        raise DatabaseError(f"{masked_url(url)}: not a database URL (expected "
                            f"{URL_FORMS})") from None


def _why(exc: BaseException, url: URL) -> str:
    """The driver's own first line (at open time: no SQL parameters in it), any password
    masked, bounded."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    text = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    return (text.replace(str(url.password), "***") if url.password else text)[:200]


def make_engine(url: str, metadata: MetaData) -> Engine:
    """An engine for ``url`` with ``metadata``'s tables created if missing (a SQLite file is
    created too). A database that cannot be opened is a :class:`DatabaseError`."""
    parsed = _parse(url)
    if parsed.get_backend_name() == "sqlite":
        _private_sqlite_file(url, parsed)
        engine = _create(url, parsed, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            _switch_to_wal(cur)
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()
    else:
        engine = _create(url, parsed, pool_size=20, max_overflow=10)
    try:
        with engine.connect():
            pass
        metadata.create_all(engine)
    except DBAPIError as exc:
        engine.dispose()
        raise DatabaseError(f"{masked_url(url)}: cannot open the database: "
                            f"{_why(exc, parsed)}") from None
    return engine


def open_existing(url: str, tables: Iterable[str], what: str = "database") -> Engine:
    """An engine to READ the existing database at ``url``, which must hold ``tables``.

    SQLite: the file must exist, and is opened read-only (``mode=ro``, see
    :func:`_sqlite_read_mode`), so a mistyped path is an error and never a new empty database;
    PostgreSQL: every transaction read-only. Nothing is created.
    ``what`` names the database in messages (e.g. "payment server database")."""
    parsed = _parse(url)
    name = masked_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database or ""
        if not path or path == ":memory:" or path.startswith("file:"):
            raise DatabaseError(f"{name}: give the {what} as sqlite:///FILE (an existing file)")
        if not os.path.exists(path):
            raise DatabaseError(f"{name}: no such {what}: {path} does not exist")
        if not os.path.isfile(path):
            raise DatabaseError(f"{name}: {path} is not a file")
        uri = Path(path).absolute().as_uri() + _sqlite_read_mode(path)

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=30)

        # the engine keeps the URL as given (messages name it); connections are read-only
        engine = _create(url, parsed, creator=connect)
    else:
        engine = _create(url, parsed, pool_size=5, max_overflow=5)
        event.listen(engine, "connect", _read_only_session)
    try:
        require_tables(engine, url, tables, what)
    except DatabaseError:
        engine.dispose()
        raise
    return engine


def require_tables(engine: Engine, url: str, tables: Iterable[str], what: str) -> None:
    """Refuse (:class:`DatabaseError`) a database at ``url`` that cannot be opened or lacks one
    of ``tables``: it is not a ``what``."""
    try:
        with engine.connect() as conn:
            inspector = inspect(conn)
            missing = [t for t in tables if not inspector.has_table(t)]
    except DBAPIError as exc:
        raise DatabaseError(f"{masked_url(url)}: cannot open the {what}: "
                            f"{_why(exc, _parse(url))}") from None
    if missing:
        raise DatabaseError(f"{masked_url(url)}: not a {what} (no table {', '.join(missing)})")


def _sqlite_read_mode(path: str) -> str:
    """URI parameters opening ``path`` read-only, leaving nothing beside it (``mode=ro`` alone
    makes a WAL database's ``-wal``/``-shm`` files). No ``-wal`` (nor ``-journal``) beside it:
    nobody writes it, so ``immutable`` (no lock, no file); else plain ``mode=ro``."""
    written = any(os.path.exists(path + suffix) for suffix in ("-wal", "-journal"))
    return "?mode=ro" if written else "?mode=ro&immutable=1"


def _read_only_session(dbapi_conn: Any, _record: Any) -> None:
    """A reader's PostgreSQL session: every transaction in it read-only, so a reading tool
    cannot change a row even by mistake (the server refuses any write)."""
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
    finally:
        cursor.close()
    dbapi_conn.commit()


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite ``url`` (None for another kind, in memory or a ``file:`` URI)."""
    parsed = _parse(url)
    path = parsed.database or ""
    plain = path and path != ":memory:" and not path.startswith("file:")
    return Path(path) if parsed.get_backend_name() == "sqlite" and plain else None


def must_exist(url: str, what: str = "database") -> None:
    """Refuse a SQLite ``url`` whose file does not exist (``bank account fund``)."""
    if (path := sqlite_file(url)) is not None and not path.is_file():
        raise DatabaseError(f"{masked_url(url)}: no such {what}: {path} does not exist")


def _switch_to_wal(cur: Any, patience: float = 30.0) -> None:
    """``PRAGMA journal_mode=WAL``, asked again while a new file's first switch is "locked"."""
    deadline = time.monotonic() + patience
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _create(url: str, target: URL, **options: Any) -> Engine:
    """``create_engine`` with its failures (unknown kind, driver not installed, options it
    does not take) as one-line :class:`DatabaseError`\\ s."""
    name = masked_url(url)
    try:  # hide_parameters: a statement's error never quotes its values (secrets, hashes)
        return create_engine(target, hide_parameters=True, **options)
    except ImportError as exc:
        module, hint = exc.name or "its driver", ""
        if module.startswith("psycopg") and target.get_backend_name() == "postgresql":
            hint = " (pip install 'svcard[postgres]'; URL postgresql+psycopg://...)"
        elif target.get_backend_name() == "postgresql":
            hint = (" (svcard's PostgreSQL driver is psycopg: pip install 'svcard[postgres]', "
                    "URL postgresql+psycopg://...)")
        raise DatabaseError(f"{name}: the database driver {module} is not installed"
                            f"{hint}") from None
    except ArgumentError:
        raise DatabaseError(f"{name}: not a database svcard can use (expected "
                            f"{URL_FORMS})") from None
    except (TypeError, ValueError) as exc:
        raise DatabaseError(f"{name}: not a usable database URL ({exc})") from None


def _private_sqlite_file(url: str, parsed: URL) -> None:
    """Create the SQLite file of ``url`` as 0600 (or narrow an existing one to 0600)."""
    path = parsed.database
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, DB_FILE_MODE)
    except FileNotFoundError:
        raise DatabaseError(f"{masked_url(url)}: cannot create the "
                            f"database: no folder {os.path.dirname(path) or '.'}") from None
    except OSError as exc:
        raise DatabaseError(f"{masked_url(url)}: cannot create the "
                            f"database {path}: {exc.strerror}") from None
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
    sqlstate = str(getattr(orig, "sqlstate", "") or "")
    text = str(orig).lower() + (" disk full" if sqlstate == "53100" else "")
    for needles, reason in _REASONS:
        if any(n in text for n in needles):
            return f"{reason}; try again later"
    return "the database is unavailable; try again later"


def now_ms() -> int:
    return int(time.time() * 1000)


class StepGroup:
    """Steps sharing a transaction per engine on the SQLite writer thread. ``depth``: open
    :func:`step` blocks; ``foreign``: a step began its own; ``failed``: an end failed."""

    def __init__(self) -> None:
        self.conns: dict[Engine, Connection] = {}
        self.depth, self.foreign, self.failed = 0, False, False

    def lost(self) -> bool:
        """The group's work cannot be committed: an end failed, or SQLite ended a transaction
        by itself (a full disk, an I/O error), also if the step that met the error caught it."""
        try:
            return self.failed or not all(getattr(c.connection.dbapi_connection,
                                                  "in_transaction", False)
                                          for c in self.conns.values())
        except Exception:  # a connection closed or invalidated under the step
            return True

    def connection(self, engine: Engine) -> Connection:
        if engine not in self.conns:
            if not event.contains(engine, "begin", _foreign_begin):
                event.listen(engine, "begin", _foreign_begin)
            conn = self.conns[engine] = engine.connect()
            try:  # the write lock at once: no step meets a stale snapshot
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            except BaseException:
                self.end(commit=False)
                raise
        return self.conns[engine]

    def end(self, commit: bool = True) -> None:
        """Commit (one fsync per engine) or roll back every open group transaction."""
        conns, self.conns = self.conns, {}
        try:
            for conn in conns.values():
                conn.commit() if commit else conn.rollback()
        except BaseException:
            self.failed = True  # each driver connection closed: SQLite drops what it held
            raise
        finally:
            for conn in conns.values():
                with contextlib.suppress(Exception):
                    conn.invalidate() if self.failed else conn.close()


writer_state = threading.local()  # .group: the writer thread's StepGroup (set by SqlRunner)


def current_group() -> StepGroup | None:
    """The group the calling thread runs steps in (None off the writer thread)."""
    return getattr(writer_state, "group", None)


@contextlib.contextmanager
def step(engine: Engine, alone: bool = False) -> Iterator[Connection]:
    """The step's connection, in a transaction committed if the block ends well, rolled back if
    it raises: the group's, in a SAVEPOINT, on the writer thread; else ``engine.begin()``, or with
    ``alone`` (the one write is the last statement; no earlier read needs a READ COMMITTED
    transaction's hold) PostgreSQL autocommit: one round trip a statement (issue 16)."""
    group = current_group() if engine.dialect.name == "sqlite" else None
    if group is None:
        if alone and engine.dialect.name == "postgresql":   # psycopg: a local flag, no query
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                yield conn
                conn.commit()   # no round trip in autocommit; "commit" listeners see a step
            return
        with engine.begin() as conn:
            yield conn
        return
    conn, group.depth = group.connection(engine), group.depth + 1
    raw: Any = conn.connection.dbapi_connection   # a bare SAVEPOINT: ~2 us; begin_nested ~50
    name = f"svcard_step_{group.depth}"
    try:
        raw.execute(f"SAVEPOINT {name}")
        yield conn
        raw.execute(f"RELEASE {name}")
    except BaseException:
        with contextlib.suppress(Exception):   # none left if SQLite ended the transaction
            raw.execute(f"ROLLBACK TO {name}")
            raw.execute(f"RELEASE {name}")
        raise
    finally:
        group.depth -= 1


@contextlib.contextmanager
def reading(engine: Engine, alone: bool = False) -> Iterator[Connection]:
    """A connection to read through: the group's if it has written (it sees those writes), a
    plain ``engine.connect()`` otherwise (no write lock taken), with ``alone`` (no lock read,
    no snapshot shared by statements) in PostgreSQL autocommit: no BEGIN, no ROLLBACK."""
    group = current_group() if engine.dialect.name == "sqlite" else None
    if group is not None and (conn := group.conns.get(engine)) is not None:
        yield conn
        return
    with engine.connect() as plain:
        yield plain.execution_options(isolation_level="AUTOCOMMIT") if (
            alone and engine.dialect.name == "postgresql") else plain


def _foreign_begin(conn: Connection) -> None:
    """A transaction begun on the writer thread on another connection than the group's: the
    group's work is committed first (it sees it, waits for no lock); inside a step, an error."""
    group = current_group()
    own = group.conns.get(conn.engine) if group is not None else None
    if group is None or own is None or own is conn:
        return
    if group.depth:
        raise RuntimeError("a transaction of its own inside kit.db.step(): use its connection")
    group.end()
    group.foreign = True


def first_row(engine: Engine, table: Table, **where: Any) -> dict[str, Any] | None:
    """The first row of ``table`` whose columns equal ``where``, as a dict."""
    query = select(table).where(*(table.c[name] == value for name, value in where.items()))
    with reading(engine) as conn:
        row = conn.execute(query).first()
    return dict(row._mapping) if row is not None else None


def update_row(engine: Engine, table: Table, row_id: int, *, expect: str | None = None,
               **values: Any) -> bool:
    """Change one row (by ``id``) and stamp it ``updated``. With ``expect``, a compare-and-set
    in one statement: only if the row's ``state`` is still ``expect``; False if another request
    changed it first (the caller re-reads). A unique key that says no is a
    :class:`DuplicateError`."""
    where = [table.c.id == row_id] + ([table.c.state == expect] if expect is not None else [])
    try:
        with step(engine, alone=True) as conn:
            result = conn.execute(update(table).where(*where).values(
                updated=now_ms(), **values))
    except IntegrityError as exc:
        raise DuplicateError(str(exc.orig)) from None
    return int(result.rowcount or 0) == 1
