"""The payment gateway's database (seed 003 FIG. 1 database 31, FIG. 4 database 71).

* ``wg_wallet``: the electronic wallet of each member: its prepaid cards (``card``), bank
  accounts (``account``) and credit cards (``credit``) by number. An instrument is in one
  wallet only.
* ``wg_purchases``: the purchase information a member's wallet sent with the card chosen
  (FIG. 4 step b5), kept until the mall asks approval of it: mall, the mall's order id and
  customer id, the product list's digest, amount, currency, the page's nonce and expiry.
  ``(mall, mall_order)`` is unique. States: ``chosen`` (embodiment 1: the secret checked by
  the wallet) or ``filled`` (embodiments 2 and 3: the card's details filled into the mall's
  form; the secret is checked when the mall asks) -> ``approving`` (matched, the debit asked;
  its ref is the purchase id, so asking again never debits twice) -> ``approved`` |
  ``declined``.
* ``wg_journal``: every money movement on a card the financial system reported (FIG. 6 step
  d12; it reports every one: cash, charges, debits of all three embodiments), by its unique
  ref, with the member whose wallet holds the card: what the daily statements are made of.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Engine, Index, Integer, MetaData, String, Table

from ...kit.schema import Schema, open_schema

metadata = MetaData()
CHOSEN, APPROVING, APPROVED, DECLINED = "chosen", "approving", "approved", "declined"
FILLED = "filled"

wallet = Table(
    "wg_wallet", metadata,
    Column("kind", String(8), primary_key=True),          # card | account | credit
    Column("number", String(16), primary_key=True),
    Column("member", String(40), nullable=False),
    Column("card_kind", String(8), nullable=False),       # virtual | real | "" (not a card)
    Column("added", BigInteger, nullable=False),
)
Index("ix_wg_wallet_member", wallet.c.member)

purchases = Table(
    "wg_purchases", metadata,
    Column("id", String(32), primary_key=True),
    Column("member", String(40), nullable=False),
    Column("card", String(16), nullable=False),
    Column("mall", String(40), nullable=False),
    Column("mall_order", String(40), nullable=False),
    Column("customer", String(40), nullable=False),
    Column("products_digest", String(64), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency", Integer, nullable=False),
    Column("nonce", String(32), nullable=False),
    Column("expires", BigInteger, nullable=False),
    Column("state", String(10), nullable=False),
    Column("reason", String(200), nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
)
Index("uq_wg_purchases_order", purchases.c.mall, purchases.c.mall_order, unique=True)

journal = Table(
    "wg_journal", metadata,
    Column("ref", String(64), primary_key=True),
    Column("member", String(40), nullable=False),          # "" if no wallet holds the card
    Column("card", String(16), nullable=False),
    Column("kind", String(8), nullable=False),             # cash | account | credit | debit
    Column("amount", BigInteger, nullable=False),          # signed: a debit is negative
    Column("currency", Integer, nullable=False),
    Column("balance", BigInteger, nullable=False),         # the card's balance after it
    Column("counterparty", String(48), nullable=False),    # mall:ID, agent:ID, account/credit
    Column("mall_order", String(40), nullable=False),
    Column("at", BigInteger, nullable=False),              # the financial system's time, ms
    Column("day", String(10), nullable=False),             # YYYY-MM-DD, UTC
    Column("received", BigInteger, nullable=False),
)
Index("ix_wg_journal_day", journal.c.day, journal.c.member)

SCHEMA = Schema("wallet-gateway", 1, metadata)


def make_engine(url: str) -> Engine:
    return open_schema(url, SCHEMA)
