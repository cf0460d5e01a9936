"""The load server's transaction log (seed step 887), through SQLAlchemy Core.

One row per load, every step committed before the next exchange. States: ``received`` (the
request is logged, the HSM has not answered) -> ``authorized`` (S2 issued: the card may load
itself) -> ``loaded`` | ``not_loaded``; ``refused`` (the HSM refused S1: no S2 was issued).
Unique keys: (bank, transaction id); (card, S1), so a replayed S1 is seen; (card, online
counter) among loaded rows, so one card counter is never loaded twice.
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
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError

from svcard.host.db import DuplicateError, first_row, now_ms, update_row
from svcard.host.db import make_engine as make_db_engine

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
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    UniqueConstraint("bank_id", "txn_id", name="uq_load_bank_txn"),
    UniqueConstraint("card_serial", "s1", name="uq_load_card_s1"),
)
Index("uq_load_card_counter", loads.c.card_serial, loads.c.online_counter, unique=True,
      sqlite_where=text("state = 'loaded'"), postgresql_where=text("state = 'loaded'"))


def make_engine(url: str) -> Engine:
    return make_db_engine(url, metadata)


@dataclass
class LoadDb:
    engine: Engine

    def get(self, bank_id: str, txn_id: str) -> dict[str, Any] | None:
        return first_row(self.engine, loads, bank_id=bank_id, txn_id=txn_id)

    def insert(self, values: dict[str, Any]) -> int:
        stamp = now_ms()
        try:
            with self.engine.begin() as conn:
                result = conn.execute(insert(loads).values(created=stamp, updated=stamp,
                                                           **values))
                key = result.inserted_primary_key
                assert key is not None
                return int(key[0])
        except IntegrityError as exc:
            raise DuplicateError(str(exc.orig)) from None

    def authorize(self, row_id: int, card_serial: str, counter: int, **values: Any) -> int:
        """S2 issued. The same card counter in an earlier load still ``authorized`` proves that
        load never happened (a load moves the counter): it becomes ``not_loaded``. Returns how
        many were closed so."""
        stamp = now_ms()
        with self.engine.begin() as conn:
            closed = conn.execute(update(loads).where(
                loads.c.card_serial == card_serial, loads.c.online_counter == counter,
                loads.c.state == "authorized", loads.c.id != row_id,
            ).values(state="not_loaded", reason="card counter reused: never loaded",
                     updated=stamp)).rowcount
            conn.execute(update(loads).where(loads.c.id == row_id).values(
                state="authorized", updated=stamp, **values))
        return int(closed or 0)

    def set(self, row_id: int, **values: Any) -> None:
        update_row(self.engine, loads, row_id, **values)

    def recover(self) -> int:
        """On start: requests the HSM never answered issued no S2, so no card loaded them."""
        with self.engine.begin() as conn:
            result = conn.execute(update(loads).where(loads.c.state == "received").values(
                state="refused", reason="load server restarted before the HSM answered",
                updated=now_ms()))
            return int(result.rowcount or 0)

    def rows(self, state: str | None = None) -> list[dict[str, Any]]:
        query = select(loads).order_by(loads.c.id)
        if state is not None:
            query = query.where(loads.c.state == state)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]
