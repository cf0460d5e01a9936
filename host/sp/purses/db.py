"""The purse pool's own tables in the SP's database (SQLAlchemy Core; SQLite or PostgreSQL).

* ``sp_purses``: one row per purse card: its reader spec, state (``ready`` | ``retired``), the
  balance and both counters as last seen, its opening balance (for the audit: loads + opening =
  debits + balances), and its lease (``lease_owner``, ``leased_until``).
* ``sp_purse_payments``: which purse paid what, one row per ``order_ref``: transaction id,
  counter, amount, TAC and state (``started`` -> ``drawing`` -> ``debited`` -> ``paid``, or
  ``failed`` (nothing paid) or ``unproven``).
* ``sp_purse_loads``: every top-up from the provider's bank, by request id and transaction id.
* ``sp_purse_leases``: every lease's interval (microseconds), for the audit and the tests.

A lease is ONE compare-and-set statement on the purse's row (free, or held by a lease that
expired or whose process on this host is gone, and ``ready``), so two threads or two SP
processes sharing the database never hold one purse at once.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

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
    and_,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from ...kit.db import DuplicateError, now_ms, reading, step
from ...kit.schema import Schema, prepare

metadata = MetaData()

purses = Table(
    "sp_purses", metadata,
    Column("serial", String(20), primary_key=True),
    Column("reader", String(300), nullable=False),
    Column("state", String(12), nullable=False),            # ready | retired
    Column("reason", String(200), nullable=False, default=""),
    Column("currency_code", Integer, nullable=False),
    Column("balance", BigInteger, nullable=False),
    Column("balance_limit", BigInteger, nullable=False),
    Column("opening_balance", BigInteger, nullable=False),
    Column("offline_counter", Integer, nullable=False),
    Column("online_counter", Integer, nullable=False),
    Column("lease_owner", String(100)),
    Column("lease_order", String(64)),
    Column("leased_until", BigInteger, nullable=False, default=0),   # ms; 0 = free
    Column("last_used", BigInteger, nullable=False, default=0),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
)

payments = Table(
    "sp_purse_payments", metadata,
    Column("order_ref", String(64), primary_key=True),
    Column("purse_serial", String(20), nullable=False),
    Column("txn_id", String(32), unique=True),
    Column("amount", BigInteger),
    Column("currency_code", Integer, nullable=False),
    Column("counter", Integer),
    Column("tac", String(8), nullable=False, default=""),
    Column("state", String(12), nullable=False),
    Column("reason", String(200), nullable=False, default=""),
    Column("outcome", Text, nullable=False, default="{}"),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
)
Index("sp_purse_payments_by_purse", payments.c.purse_serial, payments.c.state)

loads = Table(
    "sp_purse_loads", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("purse_serial", String(20), nullable=False),
    Column("request_id", String(32), unique=True),
    Column("txn_id", String(32), unique=True),
    Column("amount", BigInteger, nullable=False),
    Column("currency_code", Integer, nullable=False),
    Column("state", String(12), nullable=False),   # started | loaded | not-loaded | refused | open
    Column("online_counter", Integer),
    Column("balance_before", BigInteger),
    Column("balance_after", BigInteger),
    Column("reason", String(200), nullable=False, default=""),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
)

leases = Table(
    "sp_purse_leases", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("purse_serial", String(20), nullable=False),
    Column("owner", String(100), nullable=False),
    Column("order_ref", String(64), nullable=False),
    Column("acquired_us", BigInteger, nullable=False),
    Column("released_us", BigInteger),
)

SCHEMA = Schema("sp_purses", 1, metadata)
# "void": the SP failed the order (nothing paid) and closed its claim: never paid afterwards
FINAL_PAYMENT_STATES = ("paid", "failed", "disputed", "unproven", "void")
OPEN_PAYMENT_STATES = ("started", "drawing", "debited")


def now_us() -> int:
    return time.time_ns() // 1000


def new_owner() -> str:
    """This pool object's lease owner name: host, process id and a nonce."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{os.urandom(6).hex()}"


def owner_gone(owner: str | None) -> bool:
    """The owner is a process on this host that no longer runs (its leases are free)."""
    if not owner:
        return False
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname()[:60] or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _new_id(key: Any) -> int:
    if key is None:   # never for an insert of one row with an autoincrement key
        raise RuntimeError("the database gave no id for a new row")
    return int(key[0])


class PurseBook:
    """The pool's rows. Every check-then-act is one statement or one transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        prepare(engine, SCHEMA)

    # --- purses -----------------------------------------------------------------------------

    def purse(self, serial: str) -> dict[str, Any] | None:
        with reading(self.engine) as conn:
            row = conn.execute(select(purses).where(purses.c.serial == serial)).first()
        return dict(row._mapping) if row is not None else None

    def purse_by_reader(self, reader: str) -> dict[str, Any] | None:
        with reading(self.engine) as conn:
            row = conn.execute(select(purses).where(purses.c.reader == reader)).first()
        return dict(row._mapping) if row is not None else None

    def all_purses(self) -> list[dict[str, Any]]:
        with reading(self.engine) as conn:
            rows = conn.execute(select(purses).order_by(purses.c.serial)).all()
        return [dict(r._mapping) for r in rows]

    def register(self, serial: str, reader: str, *, currency_code: int, balance: int,
                 limit: int, offline_counter: int, online_counter: int) -> bool:
        """Add a purse seen for the first time (its balance now is its opening balance); a
        purse already known keeps its row and takes the reader spec. True if added."""
        now = now_ms()
        try:
            with step(self.engine) as conn:
                conn.execute(insert(purses).values(
                    serial=serial, reader=reader, state="ready", reason="",
                    currency_code=currency_code, balance=balance, balance_limit=limit,
                    opening_balance=balance, offline_counter=offline_counter,
                    online_counter=online_counter, leased_until=0, last_used=0, created=now,
                    updated=now))
            return True
        except IntegrityError:
            with step(self.engine) as conn:
                conn.execute(update(purses).where(purses.c.serial == serial).values(
                    reader=reader, updated=now))
            return False

    def candidates(self, *, min_balance: int = 0) -> list[dict[str, Any]]:
        """Ready purses with at least ``min_balance``, least recently used first (their lease
        may be held: :meth:`lease` decides)."""
        with reading(self.engine) as conn:
            rows = conn.execute(select(purses).where(
                purses.c.state == "ready", purses.c.balance >= min_balance).order_by(
                purses.c.last_used, purses.c.serial)).all()
        return [dict(r._mapping) for r in rows]

    def lease(self, row: dict[str, Any], owner: str, order_ref: str, ttl_ms: int, *,
              retired_too: bool = False) -> int | None:
        """Take ``row``'s purse for ``order_ref`` (one compare-and-set): the lease record's id,
        or None if it is held, retired (unless ``retired_too``) or was taken first."""
        now = now_ms()
        free = or_(purses.c.lease_owner.is_(None), purses.c.leased_until < now)
        if owner_gone(row.get("lease_owner")):   # its process on this host is gone
            free = or_(free, purses.c.lease_owner == row["lease_owner"])
        with step(self.engine) as conn:
            taken = conn.execute(update(purses).where(
                purses.c.serial == row["serial"],
                purses.c.state.in_(("ready", "retired") if retired_too else ("ready",)),
                free).values(
                lease_owner=owner, lease_order=order_ref, leased_until=now + ttl_ms,
                last_used=now, updated=now)).rowcount
            if taken != 1:
                return None
            result = conn.execute(insert(leases).values(
                purse_serial=row["serial"], owner=owner, order_ref=order_ref,
                acquired_us=now_us()))
            return _new_id(result.inserted_primary_key)

    def release(self, serial: str, owner: str, lease_id: int, *,
                paid: tuple[str, dict[str, Any]] | None = None, **state: Any) -> bool:
        """Give the purse back, with its new balance/counters/state, and (``paid``: order
        ref, outcome) book the payment made under the lease paid, in one transaction; False
        if the lease had been taken over (it expired)."""
        now = now_ms()
        with step(self.engine) as conn:
            if paid is not None:
                conn.execute(update(payments).where(
                    payments.c.order_ref == paid[0],
                    payments.c.state.in_(("drawing", "debited", "disputed", "paid"))).values(
                    state="paid", outcome=json.dumps(paid[1], default=str)[:60_000],
                    updated=now))
            conn.execute(update(leases).where(leases.c.id == lease_id).values(
                released_us=now_us()))
            done = conn.execute(update(purses).where(
                purses.c.serial == serial, purses.c.lease_owner == owner).values(
                lease_owner=None, lease_order=None, leased_until=0, updated=now,
                **state)).rowcount
        return done == 1

    def renew(self, serial: str, owner: str, ttl_ms: int) -> bool:
        """Extend the lease ``owner`` holds on the purse; False if it holds it no more (it
        expired and another took it: the purse is not to be touched)."""
        now = now_ms()
        with step(self.engine) as conn:
            done = conn.execute(update(purses).where(
                purses.c.serial == serial, purses.c.lease_owner == owner).values(
                leased_until=now + ttl_ms, updated=now)).rowcount
        return done == 1

    def summary(self) -> dict[int, dict[str, int]]:
        """Per currency, the pool's side of the audit: purses' opening balances, top-ups
        loaded, debits (paid, and disputed: the card paid), balances as last seen, and how
        many payments and top-ups are still open or unproven. Closed books: ``opening +
        loaded == debits + balances``."""
        out: dict[int, dict[str, int]] = {}

        def slot(code: int) -> dict[str, int]:
            return out.setdefault(int(code), dict.fromkeys(
                ("opening", "loaded", "debits", "balances", "open_payments", "open_loads"), 0))

        with reading(self.engine) as conn:
            for code, opening, balance in conn.execute(select(
                    purses.c.currency_code, func.sum(purses.c.opening_balance),
                    func.sum(purses.c.balance)).group_by(purses.c.currency_code)):
                slot(code).update(opening=int(opening), balances=int(balance))
            for code, state, total, count in conn.execute(select(
                    payments.c.currency_code, payments.c.state, func.sum(payments.c.amount),
                    func.count()).group_by(payments.c.currency_code, payments.c.state)):
                if state in ("paid", "disputed"):
                    slot(code)["debits"] += int(total or 0)
                elif state not in ("failed", "void"):
                    slot(code)["open_payments"] += int(count)
            for code, state, total, count in conn.execute(select(
                    loads.c.currency_code, loads.c.state, func.sum(loads.c.amount),
                    func.count()).group_by(loads.c.currency_code, loads.c.state)):
                if state == "loaded":
                    slot(code)["loaded"] += int(total or 0)
                elif state in ("started", "open"):
                    slot(code)["open_loads"] += int(count)
        return out

    def lease_intervals(self) -> list[dict[str, Any]]:
        with reading(self.engine) as conn:
            rows = conn.execute(select(leases).order_by(leases.c.id)).all()
        return [dict(r._mapping) for r in rows]

    # --- payments ---------------------------------------------------------------------------

    def payment(self, order_ref: str) -> dict[str, Any] | None:
        with reading(self.engine) as conn:
            row = conn.execute(select(payments).where(payments.c.order_ref == order_ref)).first()
        return dict(row._mapping) if row is not None else None

    def open_payments(self, serial: str) -> list[dict[str, Any]]:
        with reading(self.engine) as conn:
            rows = conn.execute(select(payments).where(
                payments.c.purse_serial == serial,
                payments.c.state.in_(OPEN_PAYMENT_STATES))).all()
        return [dict(r._mapping) for r in rows]

    def start_payment(self, order_ref: str, serial: str, currency_code: int) -> None:
        """Claim ``order_ref`` for a payment by ``serial`` (one statement): a new row, or a
        ``failed`` one taken again. :class:`DuplicateError` if it is paid, being paid or
        unproven."""
        now = now_ms()
        try:
            with step(self.engine) as conn:
                conn.execute(insert(payments).values(
                    order_ref=order_ref, purse_serial=serial, currency_code=currency_code,
                    state="started", created=now, updated=now))
            return
        except IntegrityError:
            pass
        with step(self.engine) as conn:
            again = conn.execute(update(payments).where(
                payments.c.order_ref == order_ref, payments.c.state == "failed").values(
                purse_serial=serial, txn_id=None, counter=None, amount=None, tac="",
                state="started", reason="", outcome="{}", updated=now)).rowcount
        if again != 1:
            raise DuplicateError(order_ref)

    def payment_step(self, *, order: str | None = None, txn: str | None = None,
                     expect: tuple[str, ...] = (), **values: Any) -> bool:
        """Move a payment row (by ``order`` ref or by ``txn`` id) on; with ``expect``, only
        from those states."""
        where = [payments.c.order_ref == order] if order is not None else [
            payments.c.txn_id == txn]
        if expect:
            where.append(payments.c.state.in_(expect))
        if "outcome" in values and not isinstance(values["outcome"], str):
            values["outcome"] = json.dumps(values["outcome"], default=str)[:60_000]
        if "reason" in values:
            values["reason"] = str(values["reason"])[:200]
        with step(self.engine) as conn:
            done = conn.execute(update(payments).where(and_(*where)).values(
                updated=now_ms(), **values)).rowcount
        return done == 1

    def all_payments(self) -> list[dict[str, Any]]:
        with reading(self.engine) as conn:
            rows = conn.execute(select(payments).order_by(payments.c.created)).all()
        return [dict(r._mapping) for r in rows]

    # --- top-ups ----------------------------------------------------------------------------

    def start_load(self, serial: str, request_id: str | None, amount: int,
                   currency_code: int, balance: int) -> int:
        now = now_ms()
        with step(self.engine) as conn:
            result = conn.execute(insert(loads).values(
                purse_serial=serial, request_id=request_id, amount=amount,
                currency_code=currency_code, state="started", balance_before=balance,
                reason="", created=now, updated=now))
        return _new_id(result.inserted_primary_key)

    def load_step(self, *, load_id: int | None = None, request: str | None = None,
                  txn: str | None = None, **values: Any) -> bool:
        """Move a top-up row (by id, bank ``request`` id or ``txn`` id) on."""
        if load_id is not None:
            where = loads.c.id == load_id
        elif request is not None:
            where = loads.c.request_id == request
        else:
            where = loads.c.txn_id == txn
        if "reason" in values:
            values["reason"] = str(values["reason"])[:200]
        with step(self.engine) as conn:
            done = conn.execute(update(loads).where(where).values(
                updated=now_ms(), **values)).rowcount
        return done == 1

    def open_loads(self, serial: str) -> list[dict[str, Any]]:
        """The purse's top-ups not yet decided (``started`` or ``open``)."""
        with reading(self.engine) as conn:
            rows = conn.execute(select(loads).where(
                loads.c.purse_serial == serial, loads.c.state.in_(("started", "open")))).all()
        return [dict(r._mapping) for r in rows]

    def all_loads(self) -> list[dict[str, Any]]:
        with reading(self.engine) as conn:
            rows = conn.execute(select(loads).order_by(loads.c.id)).all()
        return [dict(r._mapping) for r in rows]
