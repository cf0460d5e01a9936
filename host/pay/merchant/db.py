"""The merchant's orders (SQLAlchemy Core): SQLite by default, PostgreSQL by URL.

An order is a row from checkout on, so a restart loses nothing: open orders can still be
confirmed, paid ones still answer "already used". No key is stored: DK is derived again from the
shared key and the transaction id. Open orders are bounded in count, overall and per client
address, by ONE conditional INSERT (on PostgreSQL under a transaction-scoped advisory lock, so
two checkouts cannot both take the last slot); expired open orders are swept by one DELETE.
Goods are released by one conditional UPDATE (``WHERE state = 'open'``): of 20 concurrent
copies of a confirmation exactly one changes the row. That UPDATE also stores the SHA-256 of
the confirmation's bytes (``confirmation``, schema 2): an EXACT repeat of the confirmation that
released an order (a client whose answer was lost asks again) is answered with the same goods
and receipt; any other confirmation for a released order stays refused.

The count of open orders that bounds checkout is a kept counter (``merchant_counters``, schema
2), changed in the same step as every change of an open order (create, release, sweep), so a
checkout costs the same with 10 or 10,000 orders open; the per-client count reads the
``(client_address, state)`` index, at most ``max_per_client`` entries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
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
    inspect,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError

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
    # schema 2: SHA-256 (hex) of the confirmation that released the order; NULL while open,
    # and for an order released before schema 2 (its repeat stays refused)
    Column("confirmation", String(64)),
)
Index("ix_orders_state_until", orders.c.state, orders.c.confirm_until)
Index("ix_orders_client_state", orders.c.client_address, orders.c.state)

# schema 2: kept counts; one row, name "open": the open orders (see the module docstring)
counters = Table(
    "merchant_counters", metadata,
    Column("name", String(16), primary_key=True),
    Column("value", BigInteger, nullable=False),
)
OPEN_COUNTER = "open"

# pg_advisory_xact_lock key of the checkout bound ("svcard" + "MO")
_CHECKOUT_LOCK = 0x7376636172644D4F

Admission = Literal["ok", "full", "client"]


def _add_confirmation_and_counter(conn: Connection) -> None:
    """Schema 1 -> 2: ``orders.confirmation`` (NULL for the orders already there; their
    repeats stay refused) and the open-order counter, counted once here."""
    found = inspect(conn)
    if not found.has_table("orders"):
        return   # made by create_all, the counter seeded by make_engine
    if "confirmation" not in {c["name"] for c in found.get_columns("orders")}:
        conn.execute(text("ALTER TABLE orders ADD COLUMN confirmation VARCHAR(64)"))
    counters.create(conn, checkfirst=True)
    _seed_counter(conn)


def _seed_counter(conn: Connection) -> None:
    """The open-order counter's row, counted from the orders, if it is missing."""
    if conn.execute(select(counters.c.value).where(
            counters.c.name == OPEN_COUNTER)).first() is None:
        conn.execute(insert(counters).values(name=OPEN_COUNTER, value=select(
            func.count()).select_from(orders).where(orders.c.state == OPEN).scalar_subquery()))


SCHEMA = Schema("merchant", 2, metadata, {1: _add_confirmation_and_counter})


def make_engine(url: str) -> Engine:
    """An engine for ``url``, its schema version checked (kit/schema.py: created,
    adopted or upgraded; a newer one refused with SchemaError), its counter row present."""
    engine = open_schema(url, SCHEMA)
    try:
        with engine.begin() as conn:
            _seed_counter(conn)
    except IntegrityError:   # another process opening the new database seeded it first
        pass
    except BaseException:
        engine.dispose()
        raise
    return engine


def confirmation_digest(body: bytes) -> str:
    """What is stored of the confirmation that released an order: SHA-256, hex."""
    return hashlib.sha256(body).hexdigest()


def _open_count(*where: Any) -> Any:
    return (select(func.count()).select_from(orders)
            .where(orders.c.state == OPEN, *where).scalar_subquery())


def _open_total() -> Any:
    """The open orders' count, from the counter (the count itself if its row is missing)."""
    return func.coalesce(select(counters.c.value).where(
        counters.c.name == OPEN_COUNTER).scalar_subquery(), _open_count())


def _count_open(conn: Connection, change: int) -> None:
    """Move the open-order counter by ``change`` in the caller's step (seeding it first if
    its row is missing: then the count already includes this step's change)."""
    if change and conn.execute(update(counters).where(counters.c.name == OPEN_COUNTER).values(
            value=counters.c.value + change)).rowcount != 1:
        _seed_counter(conn)


@dataclass
class OrderDb:
    engine: Engine

    def create(self, values: dict[str, Any], max_open: int, max_per_client: int) -> Admission:
        """Insert an open order if fewer than ``max_open`` orders are open and fewer than
        ``max_per_client`` of them are this client address's: one statement."""
        row = {**values, "state": OPEN, "receipt": "", "updated": values["created"]}
        columns = list(row)
        source = select(*(literal(row[c], orders.c[c].type).label(c) for c in columns)).where(
            _open_total() < max_open,
            _open_count(orders.c.client_address == row["client_address"]) < max_per_client)
        with step(self.engine) as conn:
            if self.engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _CHECKOUT_LOCK})
            # RETURNING, not rowcount: drivers disagree on INSERT ... SELECT's rowcount
            if conn.execute(insert(orders).from_select(columns, source).returning(
                    orders.c.txn_id)).first() is not None:
                _count_open(conn, 1)
                return "ok"
            total = conn.execute(select(_open_total())).scalar_one()
        return "full" if total >= max_open else "client"

    def sweep(self, now: int) -> int:
        """Delete the open orders no confirmation can reach any more; how many."""
        with step(self.engine) as conn:
            gone = int(conn.execute(delete(orders).where(
                orders.c.state == OPEN, orders.c.confirm_until < now)).rowcount)
            _count_open(conn, -gone)
        return gone

    def get(self, txn_id: str) -> dict[str, Any] | None:
        return first_row(self.engine, orders, txn_id=txn_id)

    def release(self, txn_id: str, state: str, receipt: str, now: int,
                confirmation: str = "") -> bool:
        """Open -> ``state`` if still open and in time, keeping the releasing confirmation's
        digest (:func:`confirmation_digest`): True for exactly one caller."""
        with step(self.engine) as conn:
            won = int(conn.execute(update(orders).where(
                orders.c.txn_id == txn_id, orders.c.state == OPEN,
                orders.c.confirm_until >= now).values(
                state=state, receipt=receipt, updated=now,
                confirmation=confirmation or None)).rowcount) == 1
            if won:
                _count_open(conn, -1)
        return won

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
