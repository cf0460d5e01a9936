"""The bank server's ledger (SQLAlchemy Core): customer accounts in integer minor units and one
row per load. A load debits the account and records the load in one database transaction;
the load server's confirmation then marks it ``confirmed`` or, for "not loaded", re-credits the
account and marks it ``refunded`` (again one transaction, guarded on the state so a
confirmation counts once)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from svcard.host.db import DuplicateError, first_row, now_ms
from svcard.host.db import make_engine as make_db_engine

metadata = MetaData()

accounts = Table(
    "accounts", metadata,
    Column("account_id", String(32), primary_key=True),
    Column("holder", String(100), nullable=False),
    Column("secret_hash", String(64), nullable=False),
    Column("balance", BigInteger, nullable=False),
    Column("currency_code", Integer, nullable=False),
    Column("created", BigInteger, nullable=False),
)

bank_loads = Table(
    "bank_loads", metadata,
    Column("txn_id", String(32), primary_key=True),
    Column("request_id", String(64), unique=True),   # the client's idempotency key
    Column("account_id", String(32), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("card_serial", String(20), nullable=False),
    Column("state", String(16), nullable=False),   # debited -> confirmed | refunded
    Column("reason", String(200), nullable=False, default=""),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
)


class BankError(Exception):
    """A bank operation refused; the message says why (never a key or secret)."""


def make_engine(url: str) -> Engine:
    return make_db_engine(url, metadata)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class BankDb:
    engine: Engine

    # --- accounts ---------------------------------------------------------------------------
    def create_account(self, account_id: str, holder: str, currency_code: int,
                       balance: int = 0, secret: str | None = None) -> str:
        """A new account; returns its secret (shown once; only its hash is kept)."""
        if balance < 0:
            raise BankError("an opening balance is not negative")
        secret = secret or secrets.token_hex(8)
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(accounts).values(
                    account_id=account_id, holder=holder, secret_hash=_hash(secret),
                    balance=balance, currency_code=currency_code, created=now_ms()))
        except IntegrityError:
            raise BankError(f"account {account_id!r} already exists") from None
        return secret

    def fund(self, account_id: str, amount: int) -> int:
        if amount <= 0:
            raise BankError("a deposit is a positive number of minor units")
        with self.engine.begin() as conn:
            done = conn.execute(update(accounts).where(accounts.c.account_id == account_id)
                                .values(balance=accounts.c.balance + amount)).rowcount
            if not done:
                raise BankError(f"no account {account_id!r}")
            return int(conn.execute(select(accounts.c.balance).where(
                accounts.c.account_id == account_id)).scalar_one())

    def account(self, account_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(accounts).where(
                accounts.c.account_id == account_id)).first()
        if row is None:
            return None
        out = dict(row._mapping)
        del out["secret_hash"]
        return out

    def accounts(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(accounts).order_by(accounts.c.account_id)).all()
        return [{k: v for k, v in r._mapping.items() if k != "secret_hash"} for r in rows]

    def check_secret(self, account_id: str, secret: str) -> bool:
        with self.engine.connect() as conn:
            stored = conn.execute(select(accounts.c.secret_hash).where(
                accounts.c.account_id == account_id)).scalar()
        return stored is not None and hmac.compare_digest(stored, _hash(secret))

    # --- loads ------------------------------------------------------------------------------
    def debit_for_load(self, account_id: str, txn_id: str, amount: int, card_serial: str,
                       request_id: str | None = None) -> None:
        """Step 875: debit the account and record the load, together or not at all."""
        stamp = now_ms()
        with self.engine.begin() as conn:
            done = conn.execute(update(accounts).where(
                accounts.c.account_id == account_id, accounts.c.balance >= amount,
            ).values(balance=accounts.c.balance - amount)).rowcount
            if not done:
                raise BankError("insufficient funds in the account")
            try:
                conn.execute(insert(bank_loads).values(
                    txn_id=txn_id, request_id=request_id, account_id=account_id, amount=amount,
                    card_serial=card_serial, state="debited", reason="", created=stamp,
                    updated=stamp))
            except IntegrityError:
                raise DuplicateError("transaction id or request id already used") from None

    def load(self, txn_id: str) -> dict[str, Any] | None:
        return first_row(self.engine, bank_loads, txn_id=txn_id)

    def load_by_request(self, request_id: str) -> dict[str, Any] | None:
        return first_row(self.engine, bank_loads, request_id=request_id)

    def register(self, txn_id: str, loaded: bool, reason: str) -> bool:
        """Step 892. False if the load was already registered (nothing changes then)."""
        stamp = now_ms()
        with self.engine.begin() as conn:
            row = conn.execute(select(bank_loads).where(bank_loads.c.txn_id == txn_id)
                               .with_for_update()).first()
            if row is None or row.state != "debited":
                return False
            done = conn.execute(update(bank_loads).where(
                bank_loads.c.txn_id == txn_id, bank_loads.c.state == "debited",
            ).values(state="confirmed" if loaded else "refunded", reason=reason[:200],
                     updated=stamp)).rowcount
            if not done:
                return False
            if not loaded:
                conn.execute(update(accounts).where(accounts.c.account_id == row.account_id)
                             .values(balance=accounts.c.balance + row.amount))
        return True

    def totals(self) -> dict[str, int]:
        """Amounts by load state, and the sum of all account balances."""
        with self.engine.connect() as conn:
            out = {state: int(total or 0) for state, total in conn.execute(
                select(bank_loads.c.state, func.sum(bank_loads.c.amount))
                .group_by(bank_loads.c.state))}
            out["accounts"] = int(conn.execute(select(func.sum(accounts.c.balance)))
                                  .scalar() or 0)
        return out

    def loads(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(
                select(bank_loads).order_by(bank_loads.c.created))]
