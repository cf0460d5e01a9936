"""The bank server's ledger (SQLAlchemy Core): customer accounts in integer minor units and one
row per load. A load debits the account and records the load in one database transaction;
the load server's confirmation then marks it ``confirmed`` or, for "not loaded", re-credits the
account and marks it ``refunded`` (again one transaction, guarded on the state so a
confirmation counts once).

Account secrets are kept as salted scrypt hashes, ``scrypt$ln=14,r=8,p=1$SALT$HASH`` (base64,
the cost parameters in the stored text so they can be raised later); a row still holding an old
unsalted SHA-256 hash (64 hex digits) is checked that way once and rewritten as scrypt at its
first successful check. Wrong secrets are counted per account in ``secret_failures`` (so a
restart does not forget them): after ``max_failures`` consecutive failures every attempt, the
right secret too, is refused until ``locked_until``, a delay that doubles with each further
failure (see :class:`SecretPolicy`). Claiming an attempt is one compare-and-set on the failure
count, made before the secret is checked, so 20 concurrent guesses get no more tries than 20
sequential ones.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError

from ...kit.db import DuplicateError, now_ms, reading, step
from ...kit.schema import Schema, open_schema

metadata = MetaData()

accounts = Table(
    "accounts", metadata,
    Column("account_id", String(32), primary_key=True),
    Column("holder", String(100), nullable=False),
    Column("secret_hash", String(200), nullable=False),
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
    # the issuer (hex) whose balance limit the start applied, sealed into the ticket; "" for
    # none, NULL for a load made before schema 2 (a repeated start of it is priced again)
    Column("issuer_id", String(16)),
    Column("state", String(16), nullable=False),   # debited -> confirmed | refunded
    Column("reason", String(200), nullable=False, default=""),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
)


# Consecutive wrong secrets per account; a row only once an account has failed.
secret_failures = Table(
    "secret_failures", metadata,
    Column("account_id", String(32), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("locked_until", BigInteger, nullable=False),   # ms; 0 = not locked
    Column("updated", BigInteger, nullable=False),
)


class BankError(Exception):
    """A bank operation refused; the message says why (never a key or secret)."""


def _add_issuer_column(conn: Connection) -> None:
    """Schema 1 -> 2: ``bank_loads.issuer_id`` (NULL for the loads already there)."""
    found = inspect(conn)
    if found.has_table("bank_loads") and "issuer_id" not in {
            c["name"] for c in found.get_columns("bank_loads")}:
        conn.execute(text("ALTER TABLE bank_loads ADD COLUMN issuer_id VARCHAR(16)"))


SCHEMA = Schema("bank", 2, metadata, {1: _add_issuer_column})

# A load's statements, built once (issue 16: building a statement and its cache key each call
# cost three quarters of a simple query's CPU). WHERE parameters are named p_*, apart from
# the columns.
SECRET_HASH = select(accounts.c.secret_hash).where(
    accounts.c.account_id == bindparam("p_account"))
LOAD_BY_TXN = select(bank_loads).where(bank_loads.c.txn_id == bindparam("p_txn"))
LOAD_BY_REQUEST = select(bank_loads).where(bank_loads.c.request_id == bindparam("p_request"))
FAILURES = select(secret_failures).where(secret_failures.c.account_id == bindparam("p_account"))
_DEBIT = update(accounts).where(accounts.c.account_id == bindparam("p_account"),
                                accounts.c.balance >= bindparam("p_amount")).values(
    balance=accounts.c.balance - bindparam("p_amount"))
_RECORD = insert(bank_loads)


def make_engine(url: str) -> Engine:
    """An engine for ``url``, its schema version checked (kit/schema.py: created,
    adopted or upgraded; a newer one refused with SchemaError)."""
    engine = open_schema(url, SCHEMA)
    if engine.dialect.name != "sqlite":  # widen a pre-scrypt secret_hash column (VARCHAR(64))
        column = next(c for c in inspect(engine).get_columns("accounts")
                      if c["name"] == "secret_hash")
        if (getattr(column["type"], "length", None) or 200) < 200:
            with engine.begin() as conn:
                conn.execute(text("ALTER TABLE accounts ALTER COLUMN secret_hash "
                                  "TYPE VARCHAR(200)"))
    return engine


SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P = 14, 8, 1    # 16 MiB and about 50 ms per check
_SCRYPT_MAXMEM = 64 * 1024 * 1024


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(secret: str, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, n=1 << log_n, r=r, p=p,
                          maxmem=_SCRYPT_MAXMEM, dklen=32)


def hash_secret(secret: str) -> str:
    """A salted scrypt hash of ``secret`` with its parameters, for the ``accounts`` table."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(secret, salt, SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt$ln={SCRYPT_LOG_N},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_secret(stored: str, secret: str) -> bool:
    """True if ``secret`` matches a stored hash (scrypt, or a legacy unsalted SHA-256)."""
    if len(stored) == 64 and "$" not in stored:  # legacy: sha256 hex
        legacy = hashlib.sha256(secret.encode()).hexdigest()
        return hmac.compare_digest(stored, legacy)
    try:
        scheme, params, salt, digest = stored.split("$")
        values = dict(item.split("=") for item in params.split(","))
        log_n, r, p = int(values["ln"]), int(values["r"]), int(values["p"])
        if scheme != "scrypt" or not (1 <= log_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
            return False
        return hmac.compare_digest(_scrypt(secret, _unb64(salt), log_n, r, p), _unb64(digest))
    except (ValueError, KeyError):
        return False


def needs_rehash(stored: str) -> bool:
    return not stored.startswith(f"scrypt$ln={SCRYPT_LOG_N},r={SCRYPT_R},p={SCRYPT_P}$")


# checked against when the account does not exist, so a miss costs what a hit costs
DUMMY_HASH = hash_secret(secrets.token_hex(8))


@dataclass(frozen=True)
class SecretPolicy:
    """After ``max_failures`` consecutive wrong secrets an account is locked for
    ``base_delay`` seconds, doubled with each further failure up to ``max_delay``."""

    max_failures: int = 5
    base_delay: float = 30.0
    max_delay: float = 3600.0

    def delay_ms(self, failures: int) -> int:
        if failures < self.max_failures:
            return 0
        steps = min(failures - self.max_failures, 32)
        return int(min(self.base_delay * (2 ** steps), self.max_delay) * 1000)


class SecretLocked(BankError):
    """The account takes no attempt now; ``retry_after`` seconds until it does."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("too many wrong secrets for this account: try again later")
        self.retry_after = retry_after


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
            with step(self.engine) as conn:
                conn.execute(insert(accounts).values(
                    account_id=account_id, holder=holder, secret_hash=hash_secret(secret),
                    balance=balance, currency_code=currency_code, created=now_ms()))
        except IntegrityError:
            raise BankError(f"account {account_id!r} already exists") from None
        return secret

    def fund(self, account_id: str, amount: int) -> int:
        if amount <= 0:
            raise BankError("a deposit is a positive number of minor units")
        with step(self.engine) as conn:
            done = conn.execute(update(accounts).where(accounts.c.account_id == account_id)
                                .values(balance=accounts.c.balance + amount)).rowcount
            if not done:
                raise BankError(f"no account {account_id!r}")
            return int(conn.execute(select(accounts.c.balance).where(
                accounts.c.account_id == account_id)).scalar_one())

    def account(self, account_id: str) -> dict[str, Any] | None:
        with reading(self.engine) as conn:
            row = conn.execute(select(accounts).where(
                accounts.c.account_id == account_id)).first()
        if row is None:
            return None
        out = dict(row._mapping)
        del out["secret_hash"]
        return out

    def accounts(self) -> list[dict[str, Any]]:
        with reading(self.engine) as conn:
            rows = conn.execute(select(accounts).order_by(accounts.c.account_id)).all()
        return [{k: v for k, v in r._mapping.items() if k != "secret_hash"} for r in rows]

    def check_secret(self, account_id: str, secret: str) -> bool:
        """Only the hash check (no throttling): for tools. Servers use
        :meth:`claim_attempt`, :meth:`secret_hash`, :func:`verify_secret` and
        :meth:`secret_ok`."""
        stored = self.secret_hash(account_id)
        return verify_secret(stored if stored is not None else DUMMY_HASH, secret) and \
            stored is not None

    def secret_hash(self, account_id: str) -> str | None:
        with reading(self.engine) as conn:
            stored = conn.execute(SECRET_HASH, {"p_account": account_id}).scalar()
        return None if stored is None else str(stored)

    def remembered_secret_ok(self, account_id: str, now: int) -> float:
        """A secret the server verified a moment ago was given again: 0 if it may be used
        (the failure count then restarts, as for any right secret), else the seconds the
        account is still locked. One read when nothing has failed."""
        with step(self.engine) as conn:
            row = conn.execute(FAILURES, {"p_account": account_id}).first()
            if row is None or (row.failures == 0 and row.locked_until == 0):
                return 0.0
            if row.locked_until > now:
                return float(row.locked_until - now) / 1000
            conn.execute(update(secret_failures).where(
                secret_failures.c.account_id == account_id,
                secret_failures.c.failures == row.failures,
                secret_failures.c.locked_until == row.locked_until,
            ).values(failures=0, locked_until=0, updated=now))
        return 0.0

    def claim_attempt(self, account_id: str, policy: SecretPolicy, now: int) -> None:
        """Count one attempt at the account's secret as a failure *before* it is checked (a
        right secret then clears it, :meth:`secret_ok`); :class:`SecretLocked` if the account
        is locked. One compare-and-set on the failure count: concurrent attempts each claim
        their own count, and the one that reaches the limit locks out the rest."""
        for _ in range(100):
            try:
                if self._claim_once(account_id, policy, now):
                    return
            except IntegrityError:
                continue  # a concurrent first attempt made the row: read it again
        raise SecretLocked(1.0)  # the row kept moving under us: too many concurrent tries

    def _claim_once(self, account_id: str, policy: SecretPolicy, now: int) -> bool:
        with step(self.engine) as conn:
            row = conn.execute(select(secret_failures).where(
                secret_failures.c.account_id == account_id)).first()
            if row is None:
                conn.execute(insert(secret_failures).values(
                    account_id=account_id, failures=1,
                    locked_until=now + policy.delay_ms(1) if policy.delay_ms(1) else 0,
                    updated=now))
                return True
            if row.locked_until > now:
                raise SecretLocked((row.locked_until - now) / 1000)
            failures = row.failures + 1
            delay = policy.delay_ms(failures)
            return bool(conn.execute(update(secret_failures).where(
                secret_failures.c.account_id == account_id,
                secret_failures.c.failures == row.failures,
                secret_failures.c.locked_until == row.locked_until,
            ).values(failures=failures, updated=now,
                     locked_until=now + delay if delay else 0)).rowcount)

    def secret_ok(self, account_id: str, stored: str, secret: str) -> None:
        """The right secret: the failure count restarts, and a hash of an old kind is
        rewritten as scrypt (only if the row still holds the hash that was checked)."""
        with step(self.engine) as conn:
            conn.execute(update(secret_failures).where(
                secret_failures.c.account_id == account_id,
                (secret_failures.c.failures > 0) | (secret_failures.c.locked_until > 0),
            ).values(failures=0, locked_until=0, updated=now_ms()))
            if needs_rehash(stored):
                conn.execute(update(accounts).where(
                    accounts.c.account_id == account_id, accounts.c.secret_hash == stored,
                ).values(secret_hash=hash_secret(secret)))

    # --- loads ------------------------------------------------------------------------------
    def debit_for_load(self, account_id: str, txn_id: str, amount: int, card_serial: str,
                       request_id: str | None = None, issuer_id: str = "") -> None:
        """Step 875: debit the account and record the load (with the issuer, hex, whose limit
        priced it: a repeated start gets a ticket for that issuer only), together or not at
        all."""
        stamp = now_ms()
        with step(self.engine) as conn:
            done = conn.execute(_DEBIT, {"p_account": account_id, "p_amount": amount}).rowcount
            if not done:
                raise BankError("insufficient funds in the account")
            try:
                conn.execute(_RECORD, {
                    "txn_id": txn_id, "request_id": request_id, "account_id": account_id,
                    "amount": amount, "card_serial": card_serial, "issuer_id": issuer_id,
                    "state": "debited", "reason": "", "created": stamp, "updated": stamp})
            except IntegrityError:
                raise DuplicateError("transaction id or request id already used") from None

    def load(self, txn_id: str) -> dict[str, Any] | None:
        with reading(self.engine) as conn:
            row = conn.execute(LOAD_BY_TXN, {"p_txn": txn_id}).first()
        return dict(row._mapping) if row is not None else None

    def load_by_request(self, request_id: str) -> dict[str, Any] | None:
        with reading(self.engine) as conn:
            row = conn.execute(LOAD_BY_REQUEST, {"p_request": request_id}).first()
        return dict(row._mapping) if row is not None else None

    def register(self, txn_id: str, loaded: bool, reason: str) -> bool:
        """Step 892. False if the load was already registered (nothing changes then)."""
        stamp = now_ms()
        with step(self.engine) as conn:
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
        with reading(self.engine) as conn:
            out = {state: int(total or 0) for state, total in conn.execute(
                select(bank_loads.c.state, func.sum(bank_loads.c.amount))
                .group_by(bank_loads.c.state))}
            out["accounts"] = int(conn.execute(select(func.sum(accounts.c.balance)))
                                  .scalar() or 0)
        return out

    def loads(self) -> list[dict[str, Any]]:
        with reading(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(
                select(bank_loads).order_by(bank_loads.c.created))]
