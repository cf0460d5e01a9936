"""The financial system's books (seed 003 FIG. 1 and 4, financial system 40/80): SQLite by
default, PostgreSQL by URL.

* ``wf_cards``: each prepaid representative card: its 16-digit number, ``virtual`` or
  ``real``, its balance in minor units of one currency, its secret as a keyed digest, the
  failed secret tries, and the gateway's opaque ``applicant`` (a keyed digest of the member:
  the financial system never learns who holds a card).
* ``wf_accounts`` and ``wf_credit``: bank accounts (balance) and credit cards (limit and
  what is used), each with a secret digest; ``wf_links`` records which applicant proved it
  holds one (its secret), so only those can be charged from. Five wrong secrets in a row lock
  an account or credit card against linking (as they lock a card).
* ``wf_movements``: every change of money, one row per unique ``ref`` (the gateway's charge
  reference, a purchase's id, an agent's top-up reference): a repeated request finds its row
  and never moves money twice. ``result`` is ``done`` or ``declined`` (and why).
* ``wf_issues``: each card application by its ``ref``, so a retried one is not a second card.
* ``wf_outbox``: each movement done, to report to the payment gateway (FIG. 6 step d12),
  written in the movement's own transaction and marked sent once the gateway took it: a
  crash loses no report, and a report sent twice is recorded once (by its ref).

Schema version 2 (``svcard_schema``, see ``kit/schema.py``): version 1 databases, or ones
made before stamps, are upgraded at open by widening ``wf_movements.source`` to 48.
"""

from __future__ import annotations

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
    inspect,
)

from ...kit.schema import Schema, open_schema

metadata = MetaData()
ACTIVE, BLOCKED = "active", "blocked"
DONE, DECLINED = "done", "declined"

cards = Table(
    "wf_cards", metadata,
    Column("number", String(16), primary_key=True),
    Column("kind", String(8), nullable=False),
    Column("state", String(8), nullable=False),
    Column("balance", BigInteger, nullable=False),
    Column("currency", Integer, nullable=False),
    Column("secret_digest", String(64), nullable=False),
    Column("failures", Integer, nullable=False),
    Column("applicant", String(64), nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
)

accounts = Table(
    "wf_accounts", metadata,
    Column("number", String(16), primary_key=True),
    Column("balance", BigInteger, nullable=False),
    Column("currency", Integer, nullable=False),
    Column("secret_digest", String(64), nullable=False),
    Column("failures", Integer, nullable=False),           # wrong secrets in a row
    Column("updated", BigInteger, nullable=False),
)

credit = Table(
    "wf_credit", metadata,
    Column("number", String(16), primary_key=True),
    Column("credit_limit", BigInteger, nullable=False),
    Column("used", BigInteger, nullable=False),
    Column("currency", Integer, nullable=False),
    Column("secret_digest", String(64), nullable=False),
    Column("failures", Integer, nullable=False),
    Column("updated", BigInteger, nullable=False),
)

links = Table(
    "wf_links", metadata,
    Column("kind", String(8), primary_key=True),        # "account" | "credit"
    Column("number", String(16), primary_key=True),
    Column("applicant", String(64), primary_key=True),
    Column("created", BigInteger, nullable=False),
)

movements = Table(
    "wf_movements", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ref", String(64), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),          # cash | account | credit | debit
    Column("card", String(16), nullable=False),
    Column("source", String(48), nullable=False),        # account, credit card, agent:ID, mall:ID
    Column("amount", BigInteger, nullable=False),
    Column("currency", Integer, nullable=False),
    Column("digest", String(64), nullable=False),        # of the request: a reused ref differs
    Column("result", String(8), nullable=False),
    Column("reason", String(200), nullable=False),
    Column("at", BigInteger, nullable=False),
)

issues = Table(
    "wf_issues", metadata,
    Column("ref", String(64), primary_key=True),
    Column("number", String(16), nullable=False),
    Column("at", BigInteger, nullable=False),
)

# embodiment 3 with a real card: the VAN approvals given, one per purchase (``pay:PURCHASE``):
# a mall's request asked again is answered "repeated"
van_purse = Table(
    "wf_van_purse", metadata,
    Column("ref", String(64), primary_key=True),
    Column("at", BigInteger, nullable=False),
)

outbox = Table(
    "wf_outbox", metadata,
    Column("ref", String(64), primary_key=True),
    Column("body", Text, nullable=False),               # the report, JSON
    Column("sent", Integer, nullable=False),            # 0 pending, 1 taken by the gateway
    Column("at", BigInteger, nullable=False),
)
Index("ix_wf_outbox_sent", outbox.c.sent, outbox.c.at)



def _widen_source(conn: Connection) -> None:
    """Version 1 -> 2: ``wf_movements.source`` from 40 to 48 characters (``mall:ID`` and
    ``agent:ID`` with a 40-character id). Databases made before the change kept varchar(40),
    which PostgreSQL enforces; SQLite does not check lengths, so it has nothing to do."""
    if conn.dialect.name == "postgresql" and inspect(conn).has_table(movements.name):
        conn.exec_driver_sql(f"ALTER TABLE {movements.name} ALTER COLUMN source "
                             "TYPE varchar(48)")


# version 2: wf_movements.source widened to 48 (an older database is upgraded at its open)
SCHEMA = Schema("wallet-fin", 2, metadata, upgrades={1: _widen_source})


def make_engine(url: str) -> Engine:
    return open_schema(url, SCHEMA)
