"""The schema version of each svcard database, stamped at creation and checked at every open.

Every database a server or tool owns (payment, merchant, load, bank, clearing) records its
schema version in a small table, ``svcard_schema``: one row per component, so one PostgreSQL
database may hold several components' tables. A table, not SQLite's ``PRAGMA user_version``:
it reads the same on SQLite and PostgreSQL, and one database can carry a version per component.

:func:`prepare` opens a database for its owner, as ONE locked transaction (SQLite ``BEGIN
IMMEDIATE``; on PostgreSQL a transaction-scoped advisory lock, and DDL is transactional there
too), so two processes opening the same new database cannot both decide it:

* no stamp and none of the component's tables: a new database; its tables are created and
  stamped with this code's version;
* no stamp but some of its tables (made before stamps existed): adopted as version 1;
* an older version: upgraded step by step (``Schema.upgrades``; none yet: version 1 is the first);
* a NEWER version: :class:`SchemaError`, one line naming the component, the database (password
  masked), its version and ours; the transaction is rolled back, so nothing changed.

Then any table of the component that is missing is created. :func:`check` is the read-only
counterpart for tools that only read a database: it refuses a newer version and writes nothing.

Hand-written on purpose: a version stamp and a refusal need no migration framework; when a real
schema change comes, its step goes in ``upgrades`` (or Alembic takes over from this stamp).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata as package_metadata

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    insert,
    inspect,
    select,
    text,
    update,
)

from .command_line import EXIT_INPUT
from .db import make_engine, now_ms, open_existing, require_tables

TABLE = "svcard_schema"
ADOPTED_VERSION = 1   # a database made before stamps existed holds version 1's tables

_stamps = MetaData()
stamps = Table(
    TABLE, _stamps,
    Column("component", String(32), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("written_by", String(40), nullable=False),   # the svcard version that stamped it
    Column("updated", BigInteger, nullable=False),
)

# pg_advisory_xact_lock key that serialises opening ("svcard" + "SV")
_PG_LOCK = 0x7376636172645356

Upgrade = Callable[[Connection], None]


class SchemaError(Exception):
    """A database this svcard cannot use as it is (a newer schema, or no way to upgrade an
    older one). The message is one line naming the database (password masked); nothing was
    changed. The command line maps it to exit 3 (:data:`exit_code`)."""

    exit_code = EXIT_INPUT


@dataclass(frozen=True)
class Schema:
    """One component's tables and the version this code writes.

    ``upgrades[n]`` takes the component's tables from version ``n`` to ``n + 1`` inside the
    open's transaction (a connection, DDL and data alike)."""

    component: str
    version: int
    metadata: MetaData
    upgrades: Mapping[int, Upgrade] = field(default_factory=dict)


def svcard_version() -> str:
    try:
        return package_metadata.version("svcard")
    except package_metadata.PackageNotFoundError:
        return "unknown"


def masked(engine: Engine) -> str:
    """The engine's URL with any password replaced by ``***``."""
    return engine.url.render_as_string(hide_password=True)


def open_schema(url: str, schema: Schema) -> Engine:
    """An engine for ``url`` with ``schema``'s database prepared (:func:`prepare`). The
    tables are made by :func:`prepare`, after the version check, not by the engine."""
    engine = make_engine(url, MetaData())
    try:
        prepare(engine, schema)
    except BaseException:
        engine.dispose()
        raise
    return engine


def prepare(engine: Engine, schema: Schema) -> int:
    """Create, adopt, upgrade or refuse ``engine``'s database for ``schema`` (see the module
    docstring), in one locked transaction; the version it is at afterwards."""
    with engine.connect() as conn:
        _lock(conn)
        _stamps.create_all(conn)
        found = _stamped(conn, schema.component)
        if found is None:
            inspector = inspect(conn)
            if any(inspector.has_table(name) for name in schema.metadata.tables):
                found = ADOPTED_VERSION
            else:
                found = schema.version   # new: the tables below are made at this version
            conn.execute(insert(stamps).values(component=schema.component, version=found,
                                               written_by=svcard_version(), updated=now_ms()))
        _refuse_newer(engine, schema, found)
        while found < schema.version:
            step = schema.upgrades.get(found)
            if step is None:
                raise SchemaError(
                    f"{schema.component} database {masked(engine)} has schema version "
                    f"{found}, which this svcard (schema version {schema.version}) cannot "
                    f"upgrade; nothing was changed")
            step(conn)
            found += 1
            conn.execute(update(stamps).where(stamps.c.component == schema.component).values(
                version=found, written_by=svcard_version(), updated=now_ms()))
        schema.metadata.create_all(conn)
        conn.commit()
    return found


def check(engine: Engine, schema: Schema) -> int | None:
    """For a tool that only reads: the database's version of ``schema`` (None when it was
    never stamped), refusing a newer one with :class:`SchemaError`. Writes nothing."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(TABLE):
            return None
        found = _stamped(conn, schema.component)
    if found is not None:
        _refuse_newer(engine, schema, found)
    return found


def open_for_reading(url: str, tables: tuple[str, ...], what: str, schema: Schema) -> Engine:
    """A read-only engine on the existing database at ``url`` holding ``tables``
    (:func:`~svcard.host.kit.db.open_existing`), once its version of ``schema`` is known not
    to be newer than this svcard's (else :class:`SchemaError`, the engine disposed)."""
    engine = open_existing(url, (), what)
    try:
        check(engine, schema)   # first: a newer schema may have other tables
        require_tables(engine, url, tables, what)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _lock(conn: Connection) -> None:
    """Hold the database's write lock (SQLite) or svcard's open lock (PostgreSQL) until the
    transaction ends."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})


def _stamped(conn: Connection, component: str) -> int | None:
    version = conn.execute(select(stamps.c.version).where(
        stamps.c.component == component)).scalar()
    return None if version is None else int(version)


def _refuse_newer(engine: Engine, schema: Schema, found: int) -> None:
    if found > schema.version:
        raise SchemaError(
            f"{schema.component} database {masked(engine)} has schema version {found}, newer "
            f"than this svcard's {schema.version}: upgrade svcard (or use another database); "
            f"nothing was changed")
