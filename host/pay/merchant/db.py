"""The merchant's orders (SQLAlchemy Core): SQLite by default, PostgreSQL by URL.

An order is a row from checkout on, so a restart loses nothing: open orders can still be
confirmed, paid ones still answer "already used". No key is stored: DK is derived again from the
shared key and the transaction id. Open orders are bounded in count, overall and per client
address, by ONE conditional INSERT (on PostgreSQL under a transaction-scoped advisory lock, so
two checkouts cannot both take the last slot); expired open orders are swept by one DELETE.
Goods are released by one conditional UPDATE (``WHERE state = 'open'``): of 20 concurrent
copies of a confirmation exactly one changes the row, and only that one releases the goods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    literal,
    select,
    text,
    update,
)

from ...kit.db import first_row, reading, step
from ...kit.schema import Schema, open_schema

metadata = MetaData()

# states: open -> paid (FIG. 5/6/8: proven by the PSAM or the card's MAC2) | released_unproven
# (FIG. 7: a registered client terminal vouched for the card's MAC2; proven only once the card's
# MAC2 and TAC reach the payment server). Open orders past their time are deleted.
OPEN, PAID, UNPROVEN = "open", "paid", "released_unproven"
RELEASED = (PAID, UNPROVEN)

orders = Table(
    "orders", metadata,
    Column("txn_id", String(32), primary_key=True),
    Column("sku", String(64), nullable=False),
    Column("item", String(200), nullable=False),
    Column("goods", String(500), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("variant", Integer, nullable=False),
    Column("purpose", Integer, nullable=False),
    Column("client_terminal", String(16), nullable=False),  # hex, "" when none
    Column("client_address", String(64), nullable=False),
    Column("state", String(20), nullable=False),
    Column("expires", BigInteger, nullable=False),        # ms: the ticket's own expiry
    Column("confirm_until", BigInteger, nullable=False),  # ms: the last confirmation taken
    Column("receipt", Text, nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
)
Index("ix_orders_state_until", orders.c.state, orders.c.confirm_until)
Index("ix_orders_client_state", orders.c.client_address, orders.c.state)

# pg_advisory_xact_lock key of the checkout bound ("svcard" + "MO")
_CHECKOUT_LOCK = 0x7376636172644D4F

Admission = Literal["ok", "full", "client"]


SCHEMA = Schema("merchant", 1, metadata)


def make_engine(url: str) -> Engine:
    """An engine for ``url``, its schema version checked (kit/schema.py: created,
    adopted or upgraded; a newer one refused with SchemaError)."""
    return open_schema(url, SCHEMA)


def _open_count(*where: Any) -> Any:
    return (select(func.count()).select_from(orders)
            .where(orders.c.state == OPEN, *where).scalar_subquery())


@dataclass
class OrderDb:
    engine: Engine

    def create(self, values: dict[str, Any], max_open: int, max_per_client: int) -> Admission:
        """Insert an open order if fewer than ``max_open`` orders are open and fewer than
        ``max_per_client`` of them are this client address's: one statement."""
        row = {**values, "state": OPEN, "receipt": "", "updated": values["created"]}
        columns = list(row)
        source = select(*(literal(row[c], orders.c[c].type).label(c) for c in columns)).where(
            _open_count() < max_open,
            _open_count(orders.c.client_address == row["client_address"]) < max_per_client)
        with step(self.engine) as conn:
            if self.engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _CHECKOUT_LOCK})
            # RETURNING, not rowcount: drivers disagree on INSERT ... SELECT's rowcount
            if conn.execute(insert(orders).from_select(columns, source).returning(
                    orders.c.txn_id)).first() is not None:
                return "ok"
            total = conn.execute(select(_open_count())).scalar_one()
        return "full" if total >= max_open else "client"

    def sweep(self, now: int) -> int:
        """Delete the open orders no confirmation can reach any more; how many."""
        with step(self.engine) as conn:
            return int(conn.execute(delete(orders).where(
                orders.c.state == OPEN, orders.c.confirm_until < now)).rowcount)

    def get(self, txn_id: str) -> dict[str, Any] | None:
        return first_row(self.engine, orders, txn_id=txn_id)

    def release(self, txn_id: str, state: str, receipt: str, now: int) -> bool:
        """Open -> ``state`` if still open and in time: True for exactly one caller."""
        with step(self.engine) as conn:
            return int(conn.execute(update(orders).where(
                orders.c.txn_id == txn_id, orders.c.state == OPEN,
                orders.c.confirm_until >= now).values(
                state=state, receipt=receipt, updated=now)).rowcount) == 1

    def next_free(self, now: int, client_address: str | None = None) -> int:
        """Seconds until the first open order (of this client address) can be swept."""
        where = [orders.c.state == OPEN]
        if client_address is not None:
            where.append(orders.c.client_address == client_address)
        with reading(self.engine) as conn:
            first = conn.execute(select(func.min(orders.c.confirm_until)).where(
                *where)).scalar()
        return max(1, (int(first) - now + 999) // 1000) if first is not None else 1

    def counts(self) -> dict[str, int]:
        with reading(self.engine) as conn:
            rows = conn.execute(select(orders.c.state, func.count()).group_by(
                orders.c.state)).all()
        return {str(state): int(n) for state, n in rows}
