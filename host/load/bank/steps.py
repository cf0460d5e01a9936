"""The bank's database work for one load in as few writer calls as the checks allow (issue 16:
every call through the SQLite writer costs a thread hand-off and a transaction of its own).

A load start used four calls (the secret's hash, the account's failure count, the earlier load
with the same request id, the debit); :func:`start_view` reads the first three in one, and
:func:`remembered_start` adds the debit when the server remembers the client's secret: one
call. A confirmation used three (the load,
the registration, the account's balance); :func:`register_confirmed` checks the confirmation
against the load, registers it and reads the balance in one step. Nothing is decided on what
:func:`start_view` read before the client is authenticated, and every change is still made by
one compare-and-set step (:func:`~svcard.host.kit.db.step`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select, update

from ...kit.db import now_ms, reading, step
from .db import LOAD_BY_REQUEST, LOAD_BY_TXN, BankDb, accounts, bank_loads, secret_failures

# built once (issue 16); WHERE parameters are named p_*, apart from the columns
_LOCK_LOAD = LOAD_BY_TXN.with_for_update()
_BALANCE = select(accounts.c.balance).where(accounts.c.account_id == bindparam("p_account"))
# the account's hash and failure count in one statement (no account: no row)
_SECRET_STATE = select(accounts.c.secret_hash, secret_failures.c.failures,
                       secret_failures.c.locked_until).select_from(accounts.outerjoin(
                           secret_failures,
                           secret_failures.c.account_id == accounts.c.account_id)).where(
    accounts.c.account_id == bindparam("p_account"))
# the registration's whole check in its WHERE: the debited load of this amount and card
_REGISTER = update(bank_loads).where(
    bank_loads.c.txn_id == bindparam("p_txn"), bank_loads.c.state == "debited",
    bank_loads.c.amount == bindparam("p_amount"),
    bank_loads.c.card_serial == bindparam("p_card")).returning(
    bank_loads.c.account_id, bank_loads.c.amount)
_REFUND = update(accounts).where(accounts.c.account_id == bindparam("p_account")).values(
    balance=accounts.c.balance + bindparam("p_amount")).returning(accounts.c.balance)


@dataclass(frozen=True)
class StartView:
    """What a load start reads before it authenticates the client."""

    stored: str | None                 # the account's secret hash (None: no such account)
    clean: bool                        # no failure counted, no lock: nothing to reset
    prior: dict[str, Any] | None       # the load made earlier with the same request id


def start_view(db: BankDb, account_id: str, request_id: str | None) -> StartView:
    with reading(db.engine) as conn:
        account = conn.execute(_SECRET_STATE, {"p_account": account_id}).first()
        prior = None if request_id is None else conn.execute(
            LOAD_BY_REQUEST, {"p_request": request_id}).first()
    if account is None:   # no such account: nothing to authenticate against
        return StartView(None, True, None if prior is None else dict(prior._mapping))
    return StartView(str(account.secret_hash), (account.failures or 0) == 0 and (
                     account.locked_until or 0) == 0,
                     None if prior is None else dict(prior._mapping))


def remembered_start(db: BankDb, account_id: str, stored: str, request_id: str | None,
                     txn_id: str, amount: int, card_serial: str, issuer_id: str,
                     ) -> StartView | None:
    """A load start from a client whose secret the server remembers (verified against
    ``stored``), already priced: if the account still holds ``stored``, counts no failure and
    has no load with ``request_id``, the debit (None; :class:`BankError` or
    :class:`DuplicateError` as :meth:`BankDb.debit_for_load`); else nothing changes and the
    start goes the long way with what was read. One writer call instead of two."""
    view = start_view(db, account_id, request_id)
    if view.stored != stored or not view.clean or view.prior is not None:
        return view
    db.debit_for_load(account_id, txn_id, amount, card_serial, request_id, issuer_id)
    return None


@dataclass(frozen=True)
class Registration:
    """What :func:`register_confirmed` did: ``outcome`` is ``registered``, ``missing`` (no such
    load), ``mismatch`` (another amount or card) or ``already`` (``state`` says how)."""

    outcome: str
    state: str = ""
    amount: int = 0
    balance: int | None = None         # the account's balance after a registration


def register_confirmed(db: BankDb, txn_id: str, amount: int, card_serial: str, loaded: bool,
                       reason: str) -> Registration:
    """Step 892 for a confirmation already opened and checked against the bank's key: if it
    matches the debited load (amount and card), mark the load confirmed, or refunded and the
    account credited again; one step, so a load is registered once however many race."""
    stamp = now_ms()
    with step(db.engine) as conn:
        won = conn.execute(_REGISTER, {
            "p_txn": txn_id, "p_amount": amount, "p_card": card_serial,
            "state": "confirmed" if loaded else "refunded", "reason": reason[:200],
            "updated": stamp}).first()
        if won is None:   # why not: read the load (its row locked, as a registration's is)
            row = conn.execute(_LOCK_LOAD, {"p_txn": txn_id}).first()
            if row is None:
                return Registration("missing")
            if (row.amount, row.card_serial) != (amount, card_serial):
                return Registration("mismatch")
            return Registration("already", row.state if row.state != "debited"
                                else "registered")
        balance = conn.execute(_REFUND, {"p_account": won.account_id, "p_amount": won.amount}
                               ).scalar() if not loaded else conn.execute(
            _BALANCE, {"p_account": won.account_id}).scalar()
    return Registration("registered", "", int(won.amount),
                        None if balance is None else int(balance))
