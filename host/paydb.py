"""The payment server's transaction database (SQLAlchemy Core): SQLite by default, PostgreSQL by
URL. Every step of a payment is a committed row change before the next exchange.

Unique keys make every request idempotent and every replay visible: (merchant, transaction id);
(PSAM, terminal transaction number); (card, card counter) among payments not voided. A draw whose
card counter equals that of an unfinished payment proves the earlier debit never happened (a
debit moves the counter), so the earlier payment is voided.
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

# states: received -> issued (FIG. 5/6, waiting for the debit response) or released (FIG. 7/8:
# the PSAM recorded it at once) -> confirmed | failed; voided (never debited); busy (no PSAM)
FINAL = ("confirmed", "failed", "voided")

payments = Table(
    "payments", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("merchant_id", String(16), nullable=False),
    Column("txn_id", String(32), nullable=False),
    Column("variant", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason", String(200), nullable=False, default=""),
    Column("amount", BigInteger, nullable=False),
    Column("currency_code", Integer, nullable=False),
    Column("card_serial", String(20), nullable=False),
    Column("card_counter", Integer, nullable=False),
    Column("psam_id", String(20)),
    Column("ttn", BigInteger),
    Column("txn_date", String(8)),
    Column("txn_time", String(6)),
    Column("mac1", String(8)),
    Column("expected_mac2", String(8)),
    Column("card_mac2", String(8)),
    Column("tac", String(8)),
    Column("draw_digest", String(64), nullable=False),
    Column("debit_command", LargeBinary),
    Column("response_digest", String(64)),
    Column("result", LargeBinary),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    UniqueConstraint("merchant_id", "txn_id", name="uq_merchant_txn"),
    UniqueConstraint("psam_id", "ttn", name="uq_psam_ttn"),
)
Index("uq_card_counter", payments.c.card_serial, payments.c.card_counter, unique=True,
      sqlite_where=text("state NOT IN ('voided', 'busy')"),
      postgresql_where=text("state NOT IN ('voided', 'busy')"))


def make_engine(url: str) -> Engine:
    return make_db_engine(url, metadata)


@dataclass
class PaymentDb:
    engine: Engine

    def get(self, merchant_id: str, txn_id: str) -> dict[str, Any] | None:
        return first_row(self.engine, payments, merchant_id=merchant_id, txn_id=txn_id)

    def by_psam_ttn(self, psam_id: str, ttn: int) -> dict[str, Any] | None:
        return first_row(self.engine, payments, psam_id=psam_id, ttn=ttn)

    def insert_received(self, values: dict[str, Any]) -> int:
        """Void unfinished payments of the same card counter, then record the draw."""
        stamp = now_ms()
        try:
            with self.engine.begin() as conn:
                conn.execute(update(payments).where(
                    payments.c.card_serial == values["card_serial"],
                    payments.c.card_counter == values["card_counter"],
                    payments.c.state.in_(("received", "issued", "released")),
                ).values(state="voided", reason="card counter reused: never debited",
                         updated=stamp))
                result = conn.execute(insert(payments).values(
                    state="received", reason="", created=stamp, updated=stamp, **values))
                key = result.inserted_primary_key
                assert key is not None
                return int(key[0])
        except IntegrityError as exc:
            raise DuplicateError(str(exc.orig)) from None

    def retry_busy(self, row_id: int, values: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(payments).where(payments.c.id == row_id).values(
                state="received", reason="", updated=now_ms(), **values))

    def set(self, row_id: int, **values: Any) -> None:
        update_row(self.engine, payments, row_id, **values)

    def recover(self) -> int:
        """On start: draws that never reached a PSAM answer are void. Returns how many."""
        with self.engine.begin() as conn:
            result = conn.execute(update(payments).where(
                payments.c.state.in_(("received", "busy"))).values(
                state="voided", reason="payment server restarted before the PSAM answered",
                updated=now_ms()))
            return int(result.rowcount or 0)

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(payments.c.state)).all()
        out: dict[str, int] = {}
        for (state,) in rows:
            out[state] = out.get(state, 0) + 1
        return out
