"""The payment server's transaction database (SQLAlchemy Core): SQLite by default, PostgreSQL by
URL. Every step of a payment is a committed row change before the next exchange.

The rules (docs/security.md):

* **Only authenticated data moves a payment or lets it hold a unique key.** A draw's card
  serial, counter, expiry and balance are what the client *says*: they are recorded, never
  trusted, so a draw never voids, fails or blocks another payment. The card is authenticated
  only by its MAC2 (checked by the PSAM, or compared with the MAC2 the PSAM expects), so the
  unique (card, card counter) index covers ``confirmed`` rows only. The other unique keys are
  (merchant, transaction id), whose envelope the merchant sealed, and (PSAM, terminal
  transaction number), which the PSAM numbered.
* **Every check-then-act is one statement.** A state change is a conditional UPDATE
  (``... WHERE id = ? AND state = ?``) whose rowcount says who won (:meth:`PaymentDb.advance`);
  the loser re-reads the row. Nothing is decided on a row read earlier and written after an
  ``await``. This holds on SQLite and on PostgreSQL at READ COMMITTED.

States: ``received`` (draw recorded, no PSAM answer yet) -> ``issued`` (FIG. 5/6: waiting for
the card's MAC2) or ``released`` (FIG. 7/8: the PSAM recorded it at INIT SAM and the goods may
go) -> ``confirmed`` (the card's MAC2 verified). ``failed``: the PSAM refused the draw.
``busy``: no PSAM was free (the same draw may retry). ``voided``: the server restarted before the
PSAM answered. A card's "refused" report or a wrong MAC2 changes no state: only the column
``client_report`` records it.

Hand-off to clearing: ``batch``/``batch_number`` name the batch a PSAM record went out in and
``proof_handed`` says whether the card's TAC went with it (in the record, or in the batch's
"proofs"); a payment confirmed after its batch left is handed later in a late-proofs file.
"""

from __future__ import annotations

from collections.abc import Iterable
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

from ...kit.db import DuplicateError, first_row, now_ms, reading, step, update_row
from ...kit.schema import Schema, open_schema

metadata = MetaData()

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
    Column("client_report", String(200)),   # unauthenticated: recorded, never acted on
    Column("batch", String(120)),           # the batch file its PSAM record went out in
    Column("batch_number", BigInteger),
    Column("proof_handed", Integer, nullable=False, default=0),  # its TAC went to clearing
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    UniqueConstraint("merchant_id", "txn_id", name="uq_merchant_txn"),
    UniqueConstraint("psam_id", "ttn", name="uq_psam_ttn"),
)
# (card, counter) is authenticated only by the card's MAC2: unique among confirmed payments
Index("uq_card_counter_confirmed", payments.c.card_serial, payments.c.card_counter, unique=True,
      sqlite_where=text("state = 'confirmed'"),
      postgresql_where=text("state = 'confirmed'"))


SCHEMA = Schema("payment", 1, metadata)


def make_engine(url: str) -> Engine:
    """An engine for ``url``, its schema version checked (kit/schema.py: created,
    adopted or upgraded; a newer one refused with SchemaError)."""
    return open_schema(url, SCHEMA)


@dataclass
class PaymentDb:
    engine: Engine

    def get(self, merchant_id: str, txn_id: str) -> dict[str, Any] | None:
        return first_row(self.engine, payments, merchant_id=merchant_id, txn_id=txn_id)

    def by_id(self, row_id: int) -> dict[str, Any] | None:
        return first_row(self.engine, payments, id=row_id)

    def by_psam_ttn(self, psam_id: str, ttn: int) -> dict[str, Any] | None:
        return first_row(self.engine, payments, psam_id=psam_id, ttn=ttn)

    def insert_received(self, values: dict[str, Any]) -> int:
        """Record a draw (state ``received``). It touches no other row: its card fields are
        unauthenticated. A second draw of the same transaction is a :class:`DuplicateError`."""
        stamp = now_ms()
        try:
            with step(self.engine) as conn:
                result = conn.execute(insert(payments).values(
                    state="received", reason="", proof_handed=0, created=stamp, updated=stamp,
                    **values))
                key = result.inserted_primary_key
                assert key is not None
                return int(key[0])
        except IntegrityError as exc:
            raise DuplicateError(str(exc.orig)) from None

    def advance(self, row_id: int, from_state: str, **values: Any) -> bool:
        """Compare-and-set: change the row only if it is still in ``from_state``, in one
        statement. True if this call changed it; False if another request got there first (the
        caller re-reads). A unique key that says no is a :class:`DuplicateError`."""
        return update_row(self.engine, payments, row_id, expect=from_state, **values)

    def note(self, row_id: int, state: str, report: str) -> None:
        """Record an unauthenticated client report on a row still in ``state`` (no state
        change, no unique key: it only tells the operator what the client said)."""
        with step(self.engine) as conn:
            conn.execute(update(payments).where(
                payments.c.id == row_id, payments.c.state == state,
            ).values(client_report=report[:200], updated=now_ms()))

    def set(self, row_id: int, **values: Any) -> None:
        update_row(self.engine, payments, row_id, **values)

    def recover(self) -> int:
        """On start: draws that never reached a PSAM answer are void. Returns how many."""
        with step(self.engine) as conn:
            result = conn.execute(update(payments).where(
                payments.c.state.in_(("received", "busy"))).values(
                state="voided", reason="payment server restarted before the PSAM answered",
                updated=now_ms()))
            return int(result.rowcount or 0)

    # --- hand-off to clearing -----------------------------------------------------------
    def mark_handed(self, psam_id: str, batch: str, batch_number: int,
                    records: Iterable[tuple[int, bool]]) -> None:
        """The records (TTN, whether the card's TAC went with it) of one batch file."""
        stamp = now_ms()
        with step(self.engine) as conn:
            for ttn, handed in records:
                conn.execute(update(payments).where(
                    payments.c.psam_id == psam_id, payments.c.ttn == ttn,
                ).values(batch=batch, batch_number=batch_number,
                         proof_handed=1 if handed else 0, updated=stamp))

    def late_proofs(self) -> list[dict[str, Any]]:
        """Confirmed payments whose PSAM record went to clearing without their TAC."""
        query = select(payments).where(
            payments.c.state == "confirmed", payments.c.tac.is_not(None),
            payments.c.batch.is_not(None), payments.c.proof_handed == 0,
        ).order_by(payments.c.psam_id, payments.c.ttn)
        with reading(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def mark_proofs_handed(self, row_ids: list[int]) -> None:
        with step(self.engine) as conn:
            conn.execute(update(payments).where(
                payments.c.id.in_(row_ids), payments.c.proof_handed == 0,
            ).values(proof_handed=1, updated=now_ms()))

    def counts(self) -> dict[str, int]:
        with reading(self.engine) as conn:
            rows = conn.execute(select(payments.c.state)).all()
        out: dict[str, int] = {}
        for (state,) in rows:
            out[state] = out.get(state, 0) + 1
        return out
