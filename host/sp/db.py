"""The service provider's books (SQLAlchemy Core): SQLite by default, PostgreSQL by URL.

Tables:

* ``customers``: an account per customer, its Ed25519 public key (the SP holds no customer
  secret), its credit limit and three running sums in minor units: ``reserved`` (orders being
  paid), ``open_total`` (billed lines not yet on a bill) and ``owed`` (bills issued, unpaid).
* ``orders``: one row per authenticated retail order, written BEFORE anything is paid. Its
  ``order_ref`` (unique) is the key the purse pool records the payment under, so a restart can
  ask again and never pays twice; ``(customer, order_key)`` is unique, so a replayed request
  finds its order. States: ``rejected`` (not billable, nothing paid) | ``paying`` (the intent:
  credit reserved) -> ``paid`` (the merchant was paid) -> ``billed`` (a bill line exists);
  ``paying`` -> ``failed`` (the pool said nothing was paid: the reservation is given back) or
  ``in_doubt`` (the payment's outcome is unknown: the reservation is kept, recovery asks the
  pool again under the same ``order_ref``).
* ``order_log``: the merchandising log, one row per event of every order, for disputes.
  Append-only: nothing here updates or deletes it, and the database refuses it too (a trigger
  on SQLite and on PostgreSQL).
* ``bill_lines``: the billing unit's record of each micropayment (retail price, wholesale
  amount paid, fee, discount, the amount billed), one per order (unique), ``bill_id`` set once
  it is on a bill.
* ``bills``: the aggregated bill of a customer: issued at the period's end or as soon as the
  open total reaches the configured maximum; ``paid`` once the customer has paid it.
"""

from __future__ import annotations

from sqlalchemy import (
    DDL,
    BigInteger,
    Column,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
)

from ..kit.schema import Schema, open_schema, prepare
from .purses import db as PDB

metadata = MetaData()

# order states
REJECTED, PAYING, PAID, BILLED, FAILED, IN_DOUBT = (
    "rejected", "paying", "paid", "billed", "failed", "in_doubt")
OPEN_STATES = (PAYING, IN_DOUBT)      # the reservation is still held
# customer states
ACTIVE, BLOCKED = "active", "blocked"
# bill states
ISSUED, SETTLED = "issued", "paid"

customers = Table(
    "sp_customers", metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(100), nullable=False),
    Column("public_key", String(64), nullable=False),      # Ed25519, hex
    Column("state", String(10), nullable=False),
    Column("block_reason", String(200), nullable=False),
    Column("credit_limit", BigInteger, nullable=False),    # minor units
    Column("reserved", BigInteger, nullable=False),
    Column("open_total", BigInteger, nullable=False),
    Column("owed", BigInteger, nullable=False),
    Column("currency_code", Integer, nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
)

orders = Table(
    "sp_orders", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("order_ref", String(40), nullable=False, unique=True),
    Column("customer", String(32), nullable=False),
    Column("order_key", String(64), nullable=False),
    Column("request_digest", String(64), nullable=False),
    Column("merchant", String(32), nullable=False),
    Column("sku", String(64), nullable=False),
    Column("item", String(200), nullable=False),
    Column("checkout_url", String(500), nullable=False),
    Column("retail", BigInteger, nullable=False),
    Column("fee", BigInteger, nullable=False),
    Column("pass_on_percent", Integer, nullable=False),
    Column("max_wholesale", BigInteger, nullable=False),
    Column("wholesale_agreed", BigInteger),                  # the only amount paid, if agreed
    Column("reserved", BigInteger, nullable=False),
    Column("currency_code", Integer, nullable=False),
    Column("state", String(10), nullable=False),
    Column("reason", String(300), nullable=False),
    Column("wholesale", BigInteger),                         # set when paid
    Column("merchant_txn", String(32)),
    Column("purse_serial", String(40)),
    Column("goods", Text),
    Column("receipt", Text),
    Column("attempts", Integer, nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    UniqueConstraint("customer", "order_key", name="uq_sp_orders_customer_key"),
)
Index("ix_sp_orders_state", orders.c.state)

order_log = Table(
    "sp_order_log", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("order_ref", String(40), nullable=False),
    Column("customer", String(32), nullable=False),
    Column("event", String(20), nullable=False),
    Column("detail", Text, nullable=False),                  # JSON
    Column("at", BigInteger, nullable=False),
)
Index("ix_sp_order_log_ref", order_log.c.order_ref)

bills = Table(
    "sp_bills", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("customer", String(32), nullable=False),
    Column("total", BigInteger, nullable=False),
    Column("lines", Integer, nullable=False),
    Column("currency_code", Integer, nullable=False),
    Column("trigger", String(10), nullable=False),           # "maximum" | "period" | "manual"
    Column("period_start", BigInteger, nullable=False),      # ms: the oldest line's period
    Column("issued", BigInteger, nullable=False),
    Column("due", BigInteger, nullable=False),
    Column("state", String(10), nullable=False),
    Column("updated", BigInteger, nullable=False),
)
Index("ix_sp_bills_customer_state", bills.c.customer, bills.c.state)

bill_lines = Table(
    "sp_bill_lines", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("order_ref", String(40), nullable=False, unique=True),
    Column("customer", String(32), nullable=False),
    Column("merchant", String(32), nullable=False),
    Column("sku", String(64), nullable=False),
    Column("item", String(200), nullable=False),
    Column("retail", BigInteger, nullable=False),
    Column("wholesale", BigInteger, nullable=False),
    Column("fee", BigInteger, nullable=False),
    Column("discount", BigInteger, nullable=False),
    Column("billed", BigInteger, nullable=False),
    Column("currency_code", Integer, nullable=False),
    Column("merchant_txn", String(32), nullable=False),
    Column("purse_serial", String(40), nullable=False),
    Column("bill_id", Integer, ForeignKey("sp_bills.id")),
    Column("created", BigInteger, nullable=False),
)
Index("ix_sp_bill_lines_open", bill_lines.c.customer, bill_lines.c.bill_id)

# FIG. 3B and the merchant's copy (server/pon.py): the public key each merchant signs its
# PON answers and order copies with (Ed25519, hex), set by ``svcard sp merchant-key``
merchant_keys = Table(
    "sp_merchant_keys", metadata,
    Column("merchant", String(32), primary_key=True),
    Column("public_key", String(64), nullable=False),
    Column("updated", BigInteger, nullable=False),
)

# the merchant's own order (a PON) an SP order pays: (merchant, merchant_ref) unique, so a
# merchant order is paid once; a row whose order failed with nothing paid is taken over
merchant_orders = Table(
    "sp_merchant_orders", metadata,
    Column("merchant", String(32), primary_key=True),
    Column("merchant_ref", String(32), primary_key=True),     # the PON
    Column("order_ref", String(40), nullable=False, unique=True),
    Column("kind", String(8), nullable=False),                # "pon" | "copy"
    Column("amount", BigInteger, nullable=False),             # the merchant's, minor units
    Column("created", BigInteger, nullable=False),
)

# the merchandising log is append-only in the database too
event.listen(order_log, "after_create", DDL(  # type: ignore[no-untyped-call]
    "CREATE TRIGGER sp_order_log_no_update BEFORE UPDATE ON sp_order_log "
    "BEGIN SELECT RAISE(ABORT, 'the merchandising log is append-only'); END"
).execute_if(dialect="sqlite"))
event.listen(order_log, "after_create", DDL(  # type: ignore[no-untyped-call]
    "CREATE TRIGGER sp_order_log_no_delete BEFORE DELETE ON sp_order_log "
    "BEGIN SELECT RAISE(ABORT, 'the merchandising log is append-only'); END"
).execute_if(dialect="sqlite"))
event.listen(order_log, "after_create", DDL(  # type: ignore[no-untyped-call]
    "CREATE FUNCTION sp_order_log_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'the merchandising log is append-only'; END $$; "
    "CREATE TRIGGER sp_order_log_append_only BEFORE UPDATE OR DELETE ON sp_order_log "
    "FOR EACH ROW EXECUTE FUNCTION sp_order_log_append_only()"
).execute_if(dialect="postgresql"))

SCHEMA = Schema("sp", 1, metadata)
TABLES = (customers.name, orders.name, order_log.name, bills.name, bill_lines.name)


def make_engine(url: str) -> Engine:
    """An engine for the SP database at ``url``, its schema version checked (created,
    adopted or upgraded; a newer one refused)."""
    engine = open_schema(url, SCHEMA)
    try:   # the pool's tables too: failing an order closes its claim there (payment.py)
        prepare(engine, PDB.SCHEMA)
    except BaseException:
        engine.dispose()
        raise
    return engine
