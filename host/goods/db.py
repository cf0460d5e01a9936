"""The goods parties' databases (SQLAlchemy Core; SQLite by default, PostgreSQL by URL), one
schema per party, each party in its own database.

Every state change is one compare-and-set on a row's ``state`` inside one
:func:`~svcard.host.kit.db.step`; every row is keyed by the order (``order_ref`` unique), so a
replayed or raced message finds the row it would make.

* merchant ``goods_merchant_orders``: ``routed`` -> ``paid`` | ``declined``; ``paid`` ->
  ``refunded``.
* payment ``goods_payment_orders``: ``routed`` -> ``authorising`` -> ``paid`` | ``declined``;
  ``paid`` -> ``refunded``.
* authentication ``goods_devices`` (a device's public key by its id) and ``goods_auth_orders``:
  ``offered`` -> ``authorised`` -> ``paid`` | ``declined``; ``goods_auth_seals``: each sealed
  PIN an authorisation carried (its digest, per order) until ``expires``, so a copy of one is
  known after a restart too (``paid``: a copy is answered again; otherwise refused).
* institution ``goods_accounts`` (balance, the card it pays for, its PIN's hash and failures)
  and ``goods_bank_payments``: ``paid`` -> ``refunded``; a debit and its payment row are one
  step.
* fulfilment ``goods_goods``: ``pending`` (paid, no write issued) -> ``issued`` (a write
  handed out for a challenge; re-issued after ``issue_lease``) -> ``written``; only a
  ``pending`` good is refunded (``refunding`` -> ``refunded``): a write once handed out may be
  on the card, so it is completed at pick-up, never refunded.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from ..kit.schema import Schema, open_schema

ROUTED, AUTHORISING, PAID, DECLINED, REFUNDED = (
    "routed", "authorising", "paid", "declined", "refunded")
OFFERED, AUTHORISED = "offered", "authorised"
PENDING, ISSUED, WRITTEN, REFUNDING = "pending", "issued", "written", "refunding"
# the purse pays: the order ``debiting`` (a composite purchase opened on the card) ->
# ``purse_paid`` (the card's MAC2 matched the PSAM's) | ``expired`` (never committed: nothing
# was taken, nothing to refund; a late proof still makes it ``purse_paid``); the fulfilment
# server's good ``capp`` (its record MAC'd for a session) -> ``written`` | ``expired``
DEBITING, PURSE_PAID, EXPIRED, CAPP = "debiting", "purse_paid", "expired", "capp"
OPEN, FAILED, COMMITTED = "open", "failed", "committed"   # a purse session at the payment server


def _stamps() -> list[Column[int]]:
    return [Column("created", BigInteger, nullable=False),
            Column("updated", BigInteger, nullable=False)]


def _order_cols() -> list[Column[object]]:
    return [Column("id", Integer, primary_key=True, autoincrement=True),
            Column("order_ref", String(32), nullable=False, unique=True),
            Column("state", String(12), nullable=False)]


merchant_md = MetaData()
merchant_orders = Table(
    "goods_merchant_orders", merchant_md, *_order_cols(),
    Column("sku", String(32), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency_code", Integer, nullable=False),
    Column("device", String(32), nullable=False),
    Column("customer_ref", String(64), nullable=False),   # recorded, never trusted
    *_stamps())

merchant_quotas = Table(   # orders per device per minute (one row per device, fixed window)
    "goods_merchant_quotas", merchant_md,
    Column("key", String(64), primary_key=True),
    Column("since", BigInteger, nullable=False),          # ms: the window's start
    Column("used", Integer, nullable=False))

payment_md = MetaData()
payment_orders = Table(
    "goods_payment_orders", payment_md, *_order_cols(),
    Column("merchant", String(32), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency_code", Integer, nullable=False),
    Column("device", String(32), nullable=False),
    Column("digital_order", Text, nullable=False),        # the merchant's signed text
    Column("merchant_signature", String(128), nullable=False),
    Column("card", String(20), nullable=True),
    Column("confirmation", Text, nullable=True),          # the institution's signed text
    Column("confirmation_signature", String(128), nullable=True),
    Column("answer", Text, nullable=True),                # "kept": the fulfilment has it
    Column("merchant_told", String(12), nullable=True),   # the last state the merchant took
    *_stamps())

purse_sessions = Table(   # one composite purchase opened on a card for an order
    "goods_purse_sessions", payment_md,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("order_ref", String(32), nullable=False, index=True),
    Column("card", String(20), nullable=False),
    Column("counter", Integer, nullable=False),           # the card's offline counter
    Column("random", String(8), nullable=False),          # the card's random of the session
    Column("state", String(12), nullable=False),          # open -> committed | failed
    Column("psam", String(20), nullable=True),            # the PSAM's serial
    Column("ttn", BigInteger, nullable=True),             # its terminal transaction number
    Column("expected_mac2", String(8), nullable=True),    # never leaves this server
    Column("mac2", String(8), nullable=True),
    Column("tac", String(8), nullable=True),
    Column("told", Boolean, nullable=False),              # the fulfilment server has it
    UniqueConstraint("card", "counter", "random"),
    *_stamps())



def _session_keys(name: str, md: MetaData) -> Table:
    """A card session by what its keys see: the serial's rightmost 8 bytes (PBOC diversifies
    every card key by them), offline counter, random. Unique, so a serial differing only in
    its first two bytes (the same card to the card's keys) cannot give one session to two
    orders."""
    return Table(name, md,
                 Column("factor", String(16), primary_key=True),
                 Column("counter", Integer, primary_key=True),
                 Column("random", String(8), primary_key=True),
                 Column("order_ref", String(32), nullable=False),
                 Column("created", BigInteger, nullable=False))


purse_session_keys = _session_keys("goods_purse_session_keys", payment_md)
purse_session_tries = Table(   # wrong MAC2s a session was tried with (a MAC2 is 4 bytes)
    "goods_purse_session_tries", payment_md,
    Column("session", Integer, primary_key=True),          # goods_purse_sessions.id
    Column("own", Integer, nullable=False),                # from its order's device
    Column("others", Integer, nullable=False))             # from any other device

auth_md = MetaData()
devices = Table(
    "goods_devices", auth_md,
    Column("device", String(32), primary_key=True),
    Column("public_key", String(64), nullable=False),
    Column("label", String(64), nullable=False),          # recorded, never trusted
    *_stamps())
auth_orders = Table(
    "goods_auth_orders", auth_md, *_order_cols(),
    Column("device", String(32), nullable=False, index=True),
    Column("first_message", Text, nullable=False),
    Column("first_signature", String(128), nullable=False),
    Column("authorisation", String(64), nullable=True),   # digest of the device's message
    Column("answer", Text, nullable=True),
    *_stamps())
auth_quotas = Table(   # new devices registered per client address per minute
    "goods_auth_quotas", auth_md,
    Column("key", String(64), primary_key=True),
    Column("since", BigInteger, nullable=False),
    Column("used", Integer, nullable=False))
auth_seals = Table(
    "goods_auth_seals", auth_md,
    Column("order_ref", String(32), primary_key=True),
    Column("seal", String(64), primary_key=True),           # SHA-256 of the sealed PIN
    Column("paid", Boolean, nullable=False),
    Column("expires", BigInteger, nullable=False, index=True),   # ms
)

bank_md = MetaData()
accounts = Table(
    "goods_accounts", bank_md,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account", String(32), nullable=False, unique=True),
    Column("card", String(20), nullable=False, unique=True),
    Column("pin_hash", String(200), nullable=False),
    Column("pin_failures", Integer, nullable=False),
    Column("balance", BigInteger, nullable=False),
    Column("currency_code", Integer, nullable=False),
    Column("state", String(12), nullable=False),
    *_stamps())
bank_payments = Table(
    "goods_bank_payments", bank_md, *_order_cols(),
    Column("account", String(32), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency_code", Integer, nullable=False),
    Column("merchant", String(32), nullable=False),
    *_stamps())

fulfil_md = MetaData()
goods = Table(
    "goods_goods", fulfil_md, *_order_cols(),
    Column("card", String(20), nullable=False, index=True),
    Column("device", String(32), nullable=False),
    Column("merchant", String(32), nullable=False),
    Column("record", String(80), nullable=False),
    Column("sfi", Integer, nullable=False),
    Column("deadline", BigInteger, nullable=False),       # ms
    Column("issued_at", BigInteger, nullable=True),       # ms of the last write handed out
    Column("issued_to", String(32), nullable=True),       # the device it was handed to
    Column("writes", Integer, nullable=False),            # writes handed out
    Column("amount", BigInteger, nullable=False),
    Column("currency_code", Integer, nullable=False),
    *_stamps())
purse_goods = Table(   # goods paid by the purse: never in goods_goods, never refunded
    "goods_purse_goods", fulfil_md, *_order_cols(),
    Column("card", String(20), nullable=False, index=True),
    Column("device", String(32), nullable=False),
    Column("merchant", String(32), nullable=False),
    Column("record", String(80), nullable=False),
    Column("sfi", Integer, nullable=False),
    Column("counter", Integer, nullable=False),           # every session of it has this one
    Column("deadline", BigInteger, nullable=False),       # ms: ``capp`` past it -> expired
    Column("amount", BigInteger, nullable=False),
    Column("currency_code", Integer, nullable=False),
    *_stamps())
capp_sessions = Table(   # each card session (random, counter) MAC'd for one order only
    "goods_capp_sessions", fulfil_md,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("order_ref", String(32), nullable=False, index=True),
    Column("card", String(20), nullable=False),
    Column("counter", Integer, nullable=False),
    Column("random", String(8), nullable=False),
    UniqueConstraint("card", "counter", "random"),
    Column("created", BigInteger, nullable=False))
capp_session_keys = _session_keys("goods_capp_session_keys", fulfil_md)

SCHEMAS = {
    "merchant": Schema("goods-merchant", 1, merchant_md),
    "payment": Schema("goods-payment", 1, payment_md),
    "auth": Schema("goods-auth", 1, auth_md),
    "bank": Schema("goods-bank", 1, bank_md),
    "fulfil": Schema("goods-fulfil", 1, fulfil_md),
}


def make_engine(url: str, role: str) -> Engine:
    """The database of party ``role`` at ``url``, its schema created or checked."""
    return open_schema(url, SCHEMAS[role])
