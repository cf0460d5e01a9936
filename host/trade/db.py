"""The trading-session servers' books (SQLAlchemy Core): SQLite by default, PostgreSQL by URL.
Each server has its own database and schema component.

Customer account manager (``trade-am``):

* ``trade_am_customers``: a customer's Ed25519 public key, account currency, credit limit and
  ``reserved``: the sum of the deposits of its sessions that are not ended. The credit check
  and the reservation are ONE conditional ``UPDATE`` of this row
  (``reserved + deposit <= credit_limit``), in the same transaction as the session's row.
* ``trade_am_sessions``: one per initiation, unique ``(customer, txn)`` (a replayed initiation
  finds its session) and unique ``session`` (``AM.sequence``). States: ``initiating`` ->
  ``open`` (the mediating agent acknowledged) | ``refused`` (it said no, signed: the
  reservation is given back) | ``in_doubt`` (no signed answer: the reservation is kept).

Mediating trusted agent (``trade-acquirer``):

* ``trade_acq_sessions``: one per amended initiation, unique ``session``: the deposit in both
  currencies, the rate fixed for the session, the merchant's acknowledgement. States:
  ``informing`` -> ``open`` | ``refused``.
* ``trade_acq_postings``: the acquirer's double-entry books in minor units (the conversion,
  its rounding leftover); every booking's postings sum to zero in each currency.

Merchant agent (``trade-merchant``):

* ``trade_ma_sessions``: one per information message, unique ``session``: the deposit in the
  merchant's currency, the session's public key and pseudonym, then the customer's commitment
  (root, length, unit) and the highest PayWord link held. States: ``informed`` -> ``open``
  (commitment taken) -> ``spent`` (the last link) | ``terminated``.
* ``trade_ma_purchases``: every purchase: link index (unique per session), units, the signed
  order and its signature (the evidence).
* ``trade_ma_offers`` (FIG. 4): a digital product offered for a purchase: the signed
  description, the ciphertext under K2, K2 sealed to the trusted party, and the customer's
  acceptance with the sealed answer relayed.

FIG. 4's trusted party is the mediating agent: ``trade_acq_deliveries`` holds each order's
K2 (sealed to the agent's own X25519 key) and, once, the acceptance that released it and the
answer given (unique per order, and each acceptance's unique id once over all orders);
``trade_acq_links`` the paying link of a product bought fairly (released in the same step).
``trade_ma_pending``: a product purchase whose link awaits the trusted party's release.
"""

from __future__ import annotations

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
    Text,
    UniqueConstraint,
)

from ..kit.schema import Schema, open_schema

# states
INITIATING, OPEN, REFUSED, IN_DOUBT = "initiating", "open", "refused", "in_doubt"
INFORMING, INFORMED, SPENT, TERMINATED = "informing", "informed", "spent", "terminated"
CLEARED = "cleared"                          # FIG. 3: the records compared, money moved
RESERVING = (INITIATING, OPEN, IN_DOUBT)     # account-manager states that hold credit

am_meta = MetaData()
am_customers = Table(
    "trade_am_customers", am_meta,
    Column("id", String(32), primary_key=True),
    Column("public_key", String(64), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("credit_limit", BigInteger, nullable=False),
    Column("reserved", BigInteger, nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
)
am_sessions = Table(
    "trade_am_sessions", am_meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session", String(48), unique=True),
    Column("customer", String(32), nullable=False),
    Column("txn", String(64), nullable=False),
    Column("digest", String(64), nullable=False),           # sha256 of the initiation's body
    Column("merchant", String(32), nullable=False),
    Column("operator", String(32), nullable=False),
    Column("pseudonym", String(40), nullable=False),
    Column("session_key", String(64), nullable=False),
    Column("deposit", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("order_info", Text, nullable=False),             # JSON
    Column("state", String(12), nullable=False),
    Column("reason", String(300), nullable=False),
    Column("opened", Text),                                 # the signed answer (JSON)
    Column("expires", BigInteger, nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    UniqueConstraint("customer", "txn", name="uq_trade_am_sessions_txn"),
)
Index("ix_trade_am_sessions_customer_state", am_sessions.c.customer, am_sessions.c.state)

acq_meta = MetaData()
acq_sessions = Table(
    "trade_acq_sessions", acq_meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session", String(48), nullable=False, unique=True),
    Column("account_manager", String(32), nullable=False),
    Column("txn", String(64), nullable=False),
    Column("digest", String(64), nullable=False),           # sha256 of the amended message
    Column("merchant", String(32), nullable=False),
    Column("pseudonym", String(40), nullable=False),
    Column("session_key", String(64), nullable=False),
    Column("deposit_customer", BigInteger, nullable=False),
    Column("currency_customer", String(3), nullable=False),
    Column("deposit_merchant", BigInteger, nullable=False),
    Column("currency_merchant", String(3), nullable=False),
    Column("rate", String(80), nullable=False),             # "num/den", exact
    Column("rounding", BigInteger, nullable=False),         # minor units of the customer's
    Column("table_issuer", String(32), nullable=False),
    Column("state", String(12), nullable=False),
    Column("reason", String(300), nullable=False),
    Column("merchant_ack", Text),                           # the merchant's signed ack
    Column("answer", Text),                                 # our signed ack (JSON)
    Column("expires", BigInteger, nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
)
acq_postings = Table(
    "trade_acq_postings", acq_meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session", String(48), nullable=False),
    Column("event", String(20), nullable=False),
    Column("account", String(64), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("minor", BigInteger, nullable=False),
    Column("at", BigInteger, nullable=False),
)
Index("ix_trade_acq_postings_session", acq_postings.c.session)
acq_records = Table(        # FIG. 3: each side's signed transaction record, one per side
    "trade_acq_records", acq_meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session", String(48), nullable=False),
    Column("side", String(10), nullable=False),             # customer | merchant
    Column("signer", String(32), nullable=False),
    Column("digest", String(64), nullable=False),           # sha256 of the record's body
    Column("body", Text, nullable=False),
    Column("signature", String(128), nullable=False),       # the customer's or merchant's
    Column("envelope", Text, nullable=False),               # the forwarding AM's signed word
    Column("at", BigInteger, nullable=False),
    UniqueConstraint("session", "side", name="uq_trade_acq_records_side"),
)
acq_clearings = Table(      # the clearing information, made in the step that clears
    "trade_acq_clearings", acq_meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session", String(48), nullable=False, unique=True),
    Column("account_manager", String(32), nullable=False),
    Column("merchant", String(32), nullable=False),
    Column("outcome", String(12), nullable=False),          # agreed | one-sided | disputed
    Column("info", Text, nullable=False),                   # the signed clearing information
    Column("signature", String(128), nullable=False),
    Column("am_done", Integer, nullable=False),             # the AM's signed receipt came
    Column("mam_done", Integer, nullable=False),            # the merchant AM's receipt came
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
)
Index("ix_trade_acq_sessions_state", acq_sessions.c.state, acq_sessions.c.expires)
acq_deliveries = Table(     # FIG. 4: the trusted party's K2, one per order (trust/party.py)
    "trade_acq_deliveries", acq_meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session", String(48), nullable=False),
    Column("order_digest", String(64), nullable=False),     # sha256 of the signed order
    Column("merchant", String(32), nullable=False),
    Column("description", Text, nullable=False),            # the merchant's signed text
    Column("signature", String(128), nullable=False),
    Column("sealed", Text, nullable=False),                 # K2 sealed to this party (hex)
    Column("accepted", String(32), unique=True),            # the acceptance's unique id
    Column("acceptance", Text),                             # the customer's signed word
    Column("answer", Text),                                 # K2 sealed to K1 (hex), once
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    UniqueConstraint("session", "order_digest", name="uq_trade_acq_deliveries_order"),
)

acq_links = Table(          # FIG. 4 fair exchange: a product's paying link, released with K2
    "trade_acq_links", acq_meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session", String(48), nullable=False),
    Column("order_digest", String(64), nullable=False),
    Column("held", String(64), nullable=False),             # the merchant's link before it
    Column("units", Integer, nullable=False),               # links the order pays
    Column("link", String(64)),                             # the customer's, set at release
    UniqueConstraint("session", "order_digest", name="uq_trade_acq_links_order"),
)

ma_meta = MetaData()
ma_sessions = Table(
    "trade_ma_sessions", ma_meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session", String(48), nullable=False, unique=True),
    Column("digest", String(64), nullable=False),           # sha256 of the information msg
    Column("pseudonym", String(40), nullable=False),
    Column("session_key", String(64), nullable=False),
    Column("deposit", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("expires", BigInteger, nullable=False),
    Column("state", String(12), nullable=False),
    Column("commitment", Text),                             # the signed commitment (JSON)
    Column("length", Integer),
    Column("unit", BigInteger),
    Column("held_index", Integer, nullable=False),
    Column("held_link", String(64), nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
)
ma_purchases = Table(
    "trade_ma_purchases", ma_meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session", String(48), nullable=False),
    Column("link_index", Integer, nullable=False),
    Column("units", Integer, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("item", String(64), nullable=False),
    Column("link", String(64), nullable=False),
    Column("order_body", Text, nullable=False),
    Column("order_signature", String(128), nullable=False),
    Column("at", BigInteger, nullable=False),
    UniqueConstraint("session", "link_index", name="uq_trade_ma_purchases_index"),
)
ma_records = Table(         # FIG. 3: the merchant's record, made once when the session ends
    "trade_ma_records", ma_meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session", String(48), nullable=False, unique=True),
    Column("ended", String(12), nullable=False),
    Column("body", Text, nullable=False),
    Column("signature", String(128), nullable=False),
    Column("sent", Integer, nullable=False),                # the acquirer took it
    Column("at", BigInteger, nullable=False),
)

ma_offers = Table(          # FIG. 4: the merchant's offer of a digital product per purchase
    "trade_ma_offers", ma_meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session", String(48), nullable=False),
    Column("link_index", Integer, nullable=False),
    Column("description", Text, nullable=False),            # signed, names K2's commitment
    Column("signature", String(128), nullable=False),
    Column("ciphertext", LargeBinary, nullable=False),      # the product under K2
    Column("sealed", Text, nullable=False),                 # K2 sealed to the trusted party
    Column("lodged", Integer, nullable=False),              # the trusted party took K2
    Column("acceptance", Text),                             # the customer's, as evidence
    Column("answer", Text),                                 # K2 sealed to K1, relayed
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    UniqueConstraint("session", "link_index", name="uq_trade_ma_offers_index"),
)

ma_pending = Table(         # FIG. 4 fair exchange: a product ordered, its link not yet paid
    "trade_ma_pending", ma_meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session", String(48), nullable=False, unique=True),   # one at a time
    Column("link_index", Integer, nullable=False),
    Column("units", Integer, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("item", String(64), nullable=False),
    Column("held", String(64), nullable=False),             # the held link it pays on from
    Column("order_body", Text, nullable=False),
    Column("order_signature", String(128), nullable=False),
    Column("at", BigInteger, nullable=False),
)

am_withdrawals = Table(     # claim 11: the withdrawal record for the customer's billing
    "trade_am_withdrawals", am_meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session", String(48), nullable=False, unique=True),
    Column("customer", String(32), nullable=False),
    Column("deposit", BigInteger, nullable=False),
    Column("returned", BigInteger, nullable=False),
    Column("amount", BigInteger, nullable=False),           # deposit - returned: charged
    Column("currency", String(3), nullable=False),
    Column("outcome", String(12), nullable=False),
    Column("info", Text, nullable=False),                   # the acquirer's clearing info
    Column("signature", String(128), nullable=False),
    Column("at", BigInteger, nullable=False),
)

am_purse = Table(          # issue 15 point 7: a deposit paid by the customer's purse card
    "trade_am_purse", am_meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("order_id", String(32), nullable=False, unique=True),   # the seed-002 txn id
    Column("customer", String(32), nullable=False),
    Column("txn", String(64), nullable=False),              # the initiation's txn
    Column("initiation", Text, nullable=False),             # its checked fields (JSON)
    Column("digest", String(64), nullable=False),
    Column("amount", BigInteger, nullable=False),           # the deposit, customer currency
    Column("currency", String(3), nullable=False),
    Column("params", Text, nullable=False),                 # the checkout parameters (JSON)
    Column("state", String(12), nullable=False),            # ordered -> paid -> open|refused
    Column("confirmation", String(64), nullable=False),     # sha256 of the one that paid
    Column("card_serial", String(20), nullable=False),      # the card that paid: from result M
    Column("card_counter", Integer, nullable=False),
    Column("tac", String(8), nullable=False),
    Column("session", String(48)),
    Column("rest", BigInteger, nullable=False),             # to load back onto the card
    Column("load_state", String(10), nullable=False),       # none | due | started | loaded
    Column("load_txn", String(32), nullable=False),
    Column("load_request", String(64), nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    UniqueConstraint("customer", "txn", name="uq_trade_am_purse_txn"),
)

mam_meta = MetaData()
mam_deposits = Table(       # claim 11: the deposit record for the merchant's billing
    "trade_mam_deposits", mam_meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session", String(48), nullable=False, unique=True),
    Column("merchant", String(32), nullable=False),
    Column("acquirer", String(32), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("outcome", String(12), nullable=False),
    Column("info", Text, nullable=False),
    Column("signature", String(128), nullable=False),
    Column("at", BigInteger, nullable=False),
)

AM_SCHEMA = Schema("trade-am", 1, am_meta)
ACQ_SCHEMA = Schema("trade-acquirer", 1, acq_meta)
MA_SCHEMA = Schema("trade-merchant", 1, ma_meta)
MAM_SCHEMA = Schema("trade-merchant-account", 1, mam_meta)


def am_engine(url: str) -> Engine:
    return open_schema(url, AM_SCHEMA)


def acq_engine(url: str) -> Engine:
    return open_schema(url, ACQ_SCHEMA)


def ma_engine(url: str) -> Engine:
    return open_schema(url, MA_SCHEMA)


def mam_engine(url: str) -> Engine:
    return open_schema(url, MAM_SCHEMA)
