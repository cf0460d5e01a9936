"""The load server's transaction log (seed step 887), through SQLAlchemy Core.

One row per load, every step committed before the next exchange. States: ``received`` (the
request is logged, the HSM has not answered) -> ``authorized`` (S2 issued: the card may load
itself) -> ``loaded`` | ``not_loaded``; ``received`` -> ``refused`` (the HSM refused S1, or the
server restarted before it answered: no S2 was issued) -> ``not_loaded``.
Unique keys: (bank, transaction id); (card, S1), so a replayed S1 is seen; (card, online
counter) among loaded rows, so one card counter is never loaded twice.

Every state change is one conditional UPDATE on the expected state (compare-and-set, rowcount
checked): a caller that loses a race re-reads the row. No request changes another load's row.
Every ``not_loaded`` row names its ``evidence``: ``no-s2`` (no S2 ever left the server),
``probe`` (the card completed the load's zero-value probe at the load's own counter) or
``counter-used:<txn id>`` (the probe shows the counter moved past the load's, and that load
was proven loaded at the load's counter). The probe a load is waiting for is in ``probe_*``.

On load nodes (leases.py; schema 2) ``node`` names the node that logged a request, so another
node settles it when that node dies (:meth:`LoadDb.recover`), and the writes of an HSM's S2
(:meth:`LoadDb.advance` to ``authorized``, :meth:`LoadDb.record_probe`) carry the HSM lease's
fence: a stale token changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    bindparam,
    exists,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from ...kit.db import DuplicateError, now_ms, reading, step
from ...kit.schema import Schema, open_schema
from .leases import FENCE, Fence

metadata = MetaData()

FINAL = ("loaded", "not_loaded", "refused")

loads = Table(
    "loads", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("bank_id", String(16), nullable=False),
    Column("txn_id", String(32), nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason", String(200), nullable=False, default=""),
    Column("amount", BigInteger, nullable=False),
    Column("currency_code", Integer, nullable=False),
    Column("issuer_id", String(16)),
    Column("card_serial", String(20), nullable=False),
    Column("online_counter", Integer),
    Column("balance", BigInteger),
    Column("txn_type", Integer),
    Column("key_version", Integer),
    Column("algorithm_id", Integer),
    Column("random", String(8)),
    Column("s1", String(8)),
    Column("txn_date", String(8)),
    Column("txn_time", String(6)),
    Column("s2", String(8)),
    Column("s3", String(8)),
    Column("request_digest", String(64)),
    Column("command", LargeBinary),
    Column("result_digest", String(64)),
    Column("answer", LargeBinary),
    Column("evidence", String(200), nullable=False, default=""),
    Column("probe_counter", Integer),
    Column("probe_balance", BigInteger),
    Column("probe_random", String(8)),
    Column("probe_s1", String(8)),
    Column("probe_date", String(8)),
    Column("probe_time", String(6)),
    Column("probe_s2", String(8)),
    Column("probe_digest", String(64)),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    Column("node", String(100)),            # the node that logged the request (leases.py)
    UniqueConstraint("bank_id", "txn_id", name="uq_load_bank_txn"),
    UniqueConstraint("card_serial", "s1", name="uq_load_card_s1"),
)
Index("uq_load_card_counter", loads.c.card_serial, loads.c.online_counter, unique=True,
      sqlite_where=text("state = 'loaded'"), postgresql_where=text("state = 'loaded'"))


def _add_node_column(conn: Connection) -> None:
    """Schema 1 -> 2: ``loads.node``, the node that logged a request (NULL before)."""
    found = inspect(conn)
    if found.has_table("loads") and "node" not in {
            c["name"] for c in found.get_columns("loads")}:
        conn.execute(text("ALTER TABLE loads ADD COLUMN node VARCHAR(100)"))


SCHEMA = Schema("load", 2, metadata, {1: _add_node_column})


# The hot statements, built once (issue 16): building a statement and its cache key each call
# cost ~30 us of the ~40 a simple query took. An UPDATE's SET columns come from the parameter
# names that are columns (SQLAlchemy compiles and caches one statement per set of names); the
# WHERE clause's parameters are named p_* so they never collide with a column.
_GET = select(loads).where(loads.c.bank_id == bindparam("p_bank"),
                           loads.c.txn_id == bindparam("p_txn"))
_INSERT = insert(loads)
_ADVANCE = update(loads).where(loads.c.id == bindparam("p_id"),
                               loads.c.state == bindparam("p_expect"))
_ADVANCE_FENCED = _ADVANCE.where(FENCE)
_SETTABLE = frozenset(loads.c.keys()) - {"id", "created", "updated"}


def make_engine(url: str) -> Engine:
    """An engine for ``url``, its schema version checked (kit/schema.py: created,
    adopted or upgraded; a newer one refused with SchemaError)."""
    return open_schema(url, SCHEMA)


def _columns(values: dict[str, Any]) -> None:
    """Refuse a name that is not a column of ``loads`` (a typo would otherwise be a parameter
    the prebuilt statement ignores: the value lost without a word)."""
    for name in values:
        if name not in _SETTABLE:
            raise TypeError(f"not a column a load's row may be given: {name}")


@dataclass
class LoadDb:
    engine: Engine

    def get(self, bank_id: str, txn_id: str) -> dict[str, Any] | None:
        with reading(self.engine, alone=True) as conn:
            row = conn.execute(_GET, {"p_bank": bank_id, "p_txn": txn_id}).first()
        return dict(row._mapping) if row is not None else None

    def insert(self, values: dict[str, Any]) -> int:
        _, row_id = self.get_or_insert(values, look=False)
        assert row_id is not None
        return row_id

    def get_or_insert(self, values: dict[str, Any], insert_new: bool = True,
                      look: bool = True) -> tuple[dict[str, Any] | None, int | None]:
        """In one step: the row of ``values``' (bank, transaction) if there is one (``look``),
        else (``insert_new``) ``values`` logged as a new row: (row, None), (None, its id), or
        (None, None). A unique key that says no (a replayed S1) is a :class:`DuplicateError`."""
        stamp = now_ms()
        _columns(values)
        try:
            with step(self.engine, alone=True) as conn:
                if look:
                    row = conn.execute(_GET, {"p_bank": values["bank_id"],
                                              "p_txn": values["txn_id"]}).first()
                    if row is not None or not insert_new:
                        return (dict(row._mapping) if row is not None else None), None
                result = conn.execute(_INSERT, {"created": stamp, "updated": stamp, **values})
                key = result.inserted_primary_key
                assert key is not None
                return None, int(key[0])
        except IntegrityError as exc:
            raise DuplicateError(str(exc.orig)) from None

    def advance(self, row_id: int, expect: str, fence: Fence | None = None,
                **values: Any) -> bool:
        """Compare-and-set: change the row only if it is still in state ``expect`` (and, with
        ``fence``, only while that HSM lease is current: one statement). False if another
        request changed it first or the lease was lost; a unique key that says no is a
        :class:`DuplicateError`."""
        _columns(values)
        params = {"p_id": row_id, "p_expect": expect, "updated": now_ms(), **values}
        try:
            with step(self.engine, alone=True) as conn:
                if fence is None:
                    result = conn.execute(_ADVANCE, params)
                else:
                    result = conn.execute(_ADVANCE_FENCED, {**params, **fence.params()})
        except IntegrityError as exc:
            raise DuplicateError(str(exc.orig)) from None
        return int(result.rowcount or 0) == 1

    def record_probe(self, row_id: int, digest: str, fence: Fence | None = None,
                     **probe: Any) -> bool:
        """Keep the probe issued for a load still ``authorized`` (a new one replaces an older
        one). False if the load was decided meanwhile, the same result bytes already recorded
        their probe (the caller answers that one), or ``fence``'s HSM lease was lost."""
        where = [loads.c.id == row_id, loads.c.state == "authorized",
                 or_(loads.c.probe_digest.is_(None), loads.c.probe_digest != digest)]
        with step(self.engine, alone=True) as conn:
            result = conn.execute(update(loads).where(
                *where, *([FENCE] if fence is not None else [])).values(
                updated=now_ms(), probe_digest=digest, **probe),
                fence.params() if fence is not None else {})
        return bool(result.rowcount == 1)

    def loaded_at(self, card_serial: str, counter: int, other_than: int) -> dict[str, Any] | None:
        """The load proven ``loaded`` at this card counter, other than row ``other_than``."""
        query = select(loads).where(
            loads.c.card_serial == card_serial, loads.c.online_counter == counter,
            loads.c.state == "loaded", loads.c.id != other_than)
        with reading(self.engine, alone=True) as conn:
            row = conn.execute(query).first()
        return dict(row._mapping) if row is not None else None

    def close_by_probe(self, row_id: int, probe_s2: str, used_by: int | None,
                       **values: Any) -> bool:
        """``authorized`` -> ``not_loaded`` on a verified probe, in one statement whose WHERE
        holds the whole rule: the probe is still the one verified, and either it consumed the
        load's own counter (``used_by`` None), or it is past it and row ``used_by`` of the
        same card is ``loaded`` at the load's counter."""
        conditions = [loads.c.id == row_id, loads.c.state == "authorized",
                      loads.c.probe_s2 == probe_s2]
        if used_by is None:
            conditions.append(loads.c.probe_counter == loads.c.online_counter)
        else:
            other = loads.alias("other")
            conditions += [loads.c.probe_counter > loads.c.online_counter, exists().where(
                other.c.id == used_by, other.c.id != loads.c.id, other.c.state == "loaded",
                other.c.card_serial == loads.c.card_serial,
                other.c.online_counter == loads.c.online_counter)]
        with step(self.engine, alone=True) as conn:
            result = conn.execute(update(loads).where(*conditions).values(
                state="not_loaded", updated=now_ms(), **values))
        return bool(result.rowcount == 1)

    def recover(self, alive: list[str] | None = None) -> int:
        """On start: requests the HSM never answered issued no S2, so no card loaded them.
        With ``alive`` (nodes sharing the database, leases.py): only other nodes' requests."""
        where = [loads.c.state == "received"]
        if alive is not None:
            where.append(or_(loads.c.node.is_(None), loads.c.node.not_in(alive)))
        with step(self.engine) as conn:
            result = conn.execute(update(loads).where(*where).values(
                state="refused", reason="load server restarted before the HSM answered"
                if alive is None else "its node stopped before the HSM answered",
                updated=now_ms()))
            return int(result.rowcount or 0)

    def rows(self, state: str | None = None) -> list[dict[str, Any]]:
        query = select(loads).order_by(loads.c.id)
        if state is not None:
            query = query.where(loads.c.state == state)
        with reading(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(query)]
