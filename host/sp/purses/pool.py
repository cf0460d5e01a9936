"""The provider's purse pool: the SP pays merchants with its own purse cards.

:meth:`PursePool.pay` leases one purse that can pay, runs the ordinary card payment
(``pay.client.pay``: the merchant sees an ordinary card payment) with it, records which purse
paid what under ``order_ref``, tops the purse up from the provider's bank when it runs low
(see :mod:`.topup`: before a payment it cannot cover, and after one that left it under the
threshold) and retires it when a counter nears 65535, then gives it back.

Leases live in the database (:mod:`.db`: one compare-and-set on the purse's row, with an expiry
and the owner's host and process id), not in a queue of this process: two SP processes sharing
the database never use one purse at once, and a lease whose process died is free again at once
on the same host, or after ``lease_ttl`` seconds from another. A purse's reader is opened for a
lease only. Its journal (``journal_dir/SERIAL.jsonl``) must be shared by every SP process using
it: an interrupted payment or top-up is resumed from it before the purse pays again.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy

from ....protocols import sw as SW
from ...kit.db import DuplicateError, now_ms
from ...pay import client as PC
from ...pay.client import PaymentOutcome
from ...terminal.purse import Declined
from ...terminal.reader_specs import open_reader
from .cards import read_state
from .config import (
    PaymentInDoubt,
    PoolBusy,
    PoolExhausted,
    PoolPaymentOutcome,
    PursePoolConfig,
    PursePoolError,
    check_input,
    from_row,
)
from .db import PurseBook, new_owner, owner_gone
from .leased import Lease, lease_order, resume_open, rotate_journal
from .recording import AmountMismatch, RecordingJournal, origin
from .topup import top_up

__all__ = ["PaymentInDoubt", "PoolBusy", "PoolExhausted", "PoolPaymentOutcome", "PursePool",
           "PursePoolConfig", "PursePoolError"]
log = logging.getLogger(__name__)
RETRY_SWS = (SW.INSUFFICIENT_FUNDS, SW.COUNTER_AT_MAXIMUM)   # at INITIALIZE: nothing paid
POLL = 0.05   # seconds between looks at the database for a purse another process gives back


def held(row: dict[str, Any], now: int) -> bool:
    """The purse ``row`` is leased by a live owner until after ``now`` (ms)."""
    owner = row.get("lease_owner")
    return (owner is not None and (row.get("leased_until") or 0) >= now
            and not owner_gone(owner))


class PursePool:
    """A pool of purse cards behind reader specs, sharing the SP's database."""

    def __init__(self, config: PursePoolConfig, book: PurseBook, journal_dir: Path) -> None:
        self.config = config
        self.book = book
        self.journal_dir = journal_dir
        self.owner = new_owner()
        self._journals: dict[str, RecordingJournal] = {}
        self._journals_lock = threading.Lock()
        self._given_back = threading.Condition()

    @classmethod
    def open(cls, config: PursePoolConfig, engine: sqlalchemy.Engine, *,
             journal_dir: Path, http: httpx.Client | None = None) -> PursePool:
        """Create the pool's tables if missing and register every configured purse not yet
        known (reading its serial, balance, limit and counters from the card; its balance
        now is its opening balance). With ``http``: also resume now whatever an interruption
        left open in a purse's journal (else that happens at the purse's next lease)."""
        journal_dir.mkdir(parents=True, exist_ok=True)
        pool = cls(config, PurseBook(engine), journal_dir)
        for spec in config.readers:
            if pool.book.purse_by_reader(spec) is None:
                pool._register(spec)
        if http is not None:
            pool.resume_all(http)
        return pool

    def _register(self, spec: str) -> None:
        try:
            with open_reader(spec) as reader:
                state = read_state(reader)
        except Exception as exc:   # a missing image, reader or card: the configuration's
            raise PursePoolError(f"purses.readers: {spec}: the purse cannot be read: "
                                 f"{exc}") from None
        if state.currency_code != self.config.currency_code:
            raise PursePoolError(f"purse {state.serial} ({spec}) holds currency "
                                 f"{state.currency_code}, the pool pays in "
                                 f"{self.config.currency_code}")
        self.book.register(state.serial, spec, currency_code=state.currency_code,
                           balance=state.balance, limit=state.limit,
                           offline_counter=state.offline_counter,
                           online_counter=state.online_counter)
        log.info("purse %s registered (%s), balance %d", state.serial, spec, state.balance)

    def journal(self, serial: str) -> RecordingJournal:
        with self._journals_lock:
            if serial not in self._journals:
                self._journals[serial] = RecordingJournal(
                    self.journal_dir / f"{serial}.jsonl", self.book)
            return self._journals[serial]

    # --- leases -----------------------------------------------------------------------------

    def _take(self, row: dict[str, Any], order_ref: str, stack: ExitStack,
              retired_too: bool = False) -> Lease | None:
        lease_id = self.book.lease(row, self.owner, order_ref,
                                   int(self.config.lease_ttl * 1000), retired_too=retired_too)
        if lease_id is None:
            return None
        lease = Lease(row["serial"], self.owner, lease_id, order_ref,
                      open_reader(row["reader"]), self.journal(row["serial"]), row)
        stack.callback(self._give_back, lease)
        try:
            stack.enter_context(lease.reader)
        except Exception as exc:
            raise PursePoolError(f"purse {lease.serial}: its reader {row['reader']} cannot "
                                 f"be opened: {exc}") from None
        return lease

    def _renew(self, lease: Lease) -> bool:
        """Before each card step that moves money: the lease extended (when a quarter of its
        time has gone since it was last), or lost (False)."""
        ttl = self.config.lease_ttl
        if time.monotonic() - lease.renewed < ttl / 4:
            return True
        if self.book.renew(lease.serial, lease.owner, int(ttl * 1000)):
            lease.renewed = time.monotonic()
            return True
        log.warning("purse %s: the lease expired and was taken over; not used", lease.serial)
        return False

    def _give_back(self, lease: Lease) -> None:
        rotate_journal(lease, self.book, self.config.journal_max_bytes)
        if not self.book.release(lease.serial, lease.owner, lease.lease_id, paid=lease.paid,
                                 **lease.changes):
            log.warning("purse %s: the lease had expired before it was given back",
                        lease.serial)
        with self._given_back:   # one waiter per purse given back, not a herd racing for it
            self._given_back.notify()

    def _lease(self, order_ref: str, amount: int | None, skip: set[str],
               stack: ExitStack, deadline: float) -> Lease:
        """A leased purse that may pay ``amount`` (after a top-up if need be)."""
        while True:
            rows = [r for r in self.book.candidates() if r["serial"] not in skip]
            low = max(amount or 1, self.config.topup_threshold)
            if amount is not None:   # never able to hold the amount: not a candidate
                rows = [r for r in rows if r["balance_limit"] >= amount]
            rows.sort(key=lambda r: lease_order(r, amount, low, self.config))   # then LRU
            if not rows:
                raise PoolExhausted(self._exhausted(amount, skip))
            now = now_ms()
            for row in rows:
                if held(row, now):   # seen held just now: no compare-and-set to lose
                    continue
                try:
                    lease = self._take(row, order_ref, stack)
                except PursePoolError as exc:   # its reader is gone: the others may pay
                    log.warning("%s", exc)
                    skip.add(row["serial"])
                    continue
                if lease is not None:
                    return lease
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PoolBusy(f"no purse came free within {self.config.lease_timeout:g} s "
                               f"({len(rows)} able to pay, all in use)")
            with self._given_back:
                self._given_back.wait(min(POLL, remaining))

    def _exhausted(self, amount: int | None, skip: set[str]) -> str:
        purses = self.book.all_purses()
        retired = sum(p["state"] == "retired" for p in purses)
        what = f"{amount} minor units" if amount is not None else "this order"
        return (f"no purse can pay {what}: {retired} of {len(purses)} retired, "
                f"{len(skip)} too low or unusable after a top-up attempt; nothing was paid")

    # --- paying -----------------------------------------------------------------------------

    def pay(self, checkout_url: str, *, http: httpx.Client, order_ref: str,
            amount: int | None = None, max_amount: int | None = None) -> PoolPaymentOutcome:
        """Pay the merchant's checkout with one leased purse, recorded under ``order_ref``
        (the same ``order_ref`` again: its recorded outcome, never a second payment; one that
        failed before any debit: paid afresh; one left open: settled first). ``amount``
        (minor units; the SP knows it, it made the wholesale order) lets the pool choose a
        purse that can pay it, top one up first if none can, and refuse a checkout asking any
        other amount before the card is asked; ``max_amount``: a checkout asking more is
        refused the same way. Blocking: call it from a worker thread.

        Raises :class:`PursePoolError` (:class:`PoolExhausted`, :class:`PoolBusy`): nothing
        was paid; :class:`PaymentInDoubt`: the card may have paid and the merchant was not
        reached (ask again later, same ``order_ref``); anything else (a database down): the
        outcome is unknown, ask again later."""
        check_input(checkout_url, order_ref, amount, max_amount)
        done = self._earlier(order_ref, http)
        if done is not None:
            return done
        deadline = time.monotonic() + self.config.lease_timeout
        skip: set[str] = set()
        while True:
            with ExitStack() as stack:
                lease = self._lease(order_ref, amount, skip, stack, deadline)
                lease.max_amount = max_amount
                outcome = self._pay_with(lease, checkout_url, http, order_ref, amount)
                if outcome is not None:
                    return outcome
                skip.add(lease.serial)

    def _pay_with(self, lease: Lease, checkout_url: str, http: httpx.Client, order_ref: str,
                  amount: int | None) -> PoolPaymentOutcome | None:
        """One leased purse's attempt; None: this purse cannot pay it (try another)."""
        cfg = self.config
        why = resume_open(lease, self.book, http)
        if why is not None:
            log.warning("purse %s not used: %s", lease.serial, why)
            return None
        topups = []
        if lease.retire_if_worn(cfg.retire_margin) or not self._renew(lease):
            return None
        need = max(cfg.topup_threshold, amount or 1)
        if lease.balance < need and not lease.draining(cfg):   # (draining: spent, not loaded)
            topups.append(self._top_up(lease, http, need=(amount or 0) - lease.balance))
        if lease.balance < (amount or 1):
            return None
        for attempt in (1, 2):
            if not self._renew(lease):
                return None
            try:
                paid, resumed = self._card_payment(lease, checkout_url, http, order_ref,
                                                   amount)
            except Declined as exc:   # refused at INITIALIZE: nothing paid, try again
                lease.take_state(read_state(lease.reader))
                if exc.sw == SW.COUNTER_AT_MAXIMUM:
                    lease.retire_if_worn(cfg.retire_margin)
                    return None
                if attempt == 2 or lease.draining(cfg):
                    return None
                before = lease.balance   # the amount was not named: top up, try once more
                topups.append(self._top_up(lease, http))
                if lease.balance <= before:
                    return None
                continue
            break
        journal = lease.journal
        if not resumed:   # (a resumed payment's purse was read again from the card)
            lease.changes.update(balance=paid.balance_after, offline_counter=(
                journal.counter if journal.counter is not None else lease.counters()[0]) + 1)
        outcome = paid
        outcome.balance_after = lease.balance
        outcome.topups = topups
        if lease.balance < cfg.topup_threshold and not lease.draining(cfg) and \
                not lease.retire_if_worn(cfg.retire_margin):
            outcome.topups.append(self._top_up(lease, http))
        lease.retire_if_worn(cfg.retire_margin)
        lease.paid = (order_ref, outcome.to_json())   # booked paid as the purse is given back
        return outcome

    def _card_payment(self, lease: Lease, checkout_url: str, http: httpx.Client,
                      order_ref: str, amount: int | None) -> tuple[PoolPaymentOutcome, bool]:
        """The ordinary card payment under ``order_ref``'s row (claimed first: one payment
        per order): (its outcome, whether it was finished by a resume). Cut off midway, the
        purse's journal is resumed at once; what the row then says decides: ``failed`` ->
        :class:`PursePoolError` (nothing paid), ``paid`` -> the outcome, else
        :class:`PaymentInDoubt`. A card's 9401/9402 at INITIALIZE is raised as it is."""
        try:
            self.book.start_payment(order_ref, lease.serial, self.config.currency_code)
        except DuplicateError:
            raise PaymentInDoubt(f"order {order_ref} is paid or being paid already") from None
        journal = lease.journal
        journal.order_ref, journal.counter, journal.tac = order_ref, None, ""
        journal.expected_amount, journal.max_amount = amount, lease.max_amount
        journal.merchant_origin = origin(checkout_url)
        journal.payment_servers = tuple(origin(u) for u in self.config.payment_servers)
        try:
            paid = PC.pay(checkout_url, lease.reader, journal=journal, http=http)
            return self._with_purse(paid, lease, order_ref), False
        except AmountMismatch as exc:
            self.book.payment_step(order=order_ref, expect=("started",), state="failed",
                                   reason=str(exc))
            raise PursePoolError(str(exc)) from None
        except Exception as exc:
            cause = exc
        finally:
            journal.order_ref = journal.expected_amount = journal.max_amount = None
        self.book.payment_step(order=order_ref, expect=("started",), state="failed",
                               reason=f"refused before the draw: {cause}")
        if isinstance(cause, Declined) and cause.sw in RETRY_SWS and \
                self._order_state(order_ref) == "failed":
            raise cause
        try:
            why = resume_open(lease, self.book, http)
        except Exception as exc:   # the books or the card failed too: the order stays open
            why = f"{type(exc).__name__}: {exc}"
        row = self.book.payment(order_ref) or {}
        if row.get("state") == "failed":
            raise PursePoolError(f"nothing was paid: {row.get('reason') or cause}") from cause
        if row.get("state") == "paid":
            return from_row(row), True
        raise PaymentInDoubt(f"order {order_ref}: the payment was cut off ({cause}) and is "
                             f"{row.get('state')} ({why or 'resumed, still open'}); ask again "
                             f"later") from cause

    def _with_purse(self, paid: PaymentOutcome, lease: Lease,
                    order_ref: str) -> PoolPaymentOutcome:
        journal = lease.journal
        return PoolPaymentOutcome(**paid.__dict__, order_ref=order_ref,
                                  purse_serial=lease.serial, counter=journal.counter or 0,
                                  tac=journal.tac)

    def _order_state(self, order_ref: str) -> str:
        row = self.book.payment(order_ref)
        return str(row["state"]) if row else ""

    def _top_up(self, lease: Lease, http: httpx.Client, need: int = 0) -> dict[str, Any]:
        cfg = self.config
        if not self._renew(lease):
            return {"outcome": "skipped", "amount": 0, "reason": "the lease was lost"}
        return top_up(lease, self.book, http, bank_url=cfg.bank_url, account=cfg.account,
                      secret=cfg.secret, currency_code=cfg.currency_code,
                      amount=cfg.topup_amount, need=need)

    def _earlier(self, order_ref: str, http: httpx.Client) -> PoolPaymentOutcome | None:
        """The recorded outcome of an order paid before; an order an interruption left open
        is first settled on its purse. None: pay it (never paid, or failed with nothing
        paid)."""
        row = self.book.payment(order_ref)
        if row is not None and row["state"] in ("started", "drawing", "debited"):
            self._settle(row["purse_serial"], http)
            row = self.book.payment(order_ref)
        if row is not None and row["state"] == "void":
            raise PursePoolError(f"order {order_ref} was failed by the SP: never paid")
        if row is None or row["state"] == "failed":
            return None
        if row["state"] == "paid":
            return from_row(row)
        raise PaymentInDoubt(f"order {order_ref} is {row['state']} on purse "
                             f"{row['purse_serial']} (transaction {row['txn_id']}): "
                             f"{row['reason'] or 'not settled yet'}; not paid again")

    def _settle(self, serial: str, http: httpx.Client) -> str | None:
        """Lease ``serial`` (waiting for it) and resume what its journal holds open."""
        deadline = time.monotonic() + self.config.lease_timeout
        while True:
            row = self.book.purse(serial)
            if row is None:
                return f"purse {serial} is not in the pool"
            with ExitStack() as stack:   # a retired purse too: its last steps may be open
                lease = self._take(row, f"resume:{serial}", stack, retired_too=True)
                if lease is not None:
                    return resume_open(lease, self.book, http)
            if time.monotonic() > deadline:
                return f"purse {serial} did not come free within {self.config.lease_timeout:g} s"
            with self._given_back:
                self._given_back.wait(POLL)

    def resume_all(self, http: httpx.Client) -> dict[str, str | None]:
        """Resume every purse with an open journal entry or an open order: {serial: None
        when clean, else why not}."""
        report: dict[str, str | None] = {}
        for row in self.book.all_purses():
            if self.journal(row["serial"]).unfinished(row["serial"]) or \
                    self.book.open_payments(row["serial"]):
                report[row["serial"]] = self._settle(row["serial"], http)
        return report

    # --- reading ----------------------------------------------------------------------------

    def books(self) -> dict[int, dict[str, int]]:
        """The pool's side of the audit, per currency (:meth:`PurseBook.summary`)."""
        return self.book.summary()

    def status(self) -> list[dict[str, Any]]:
        """Every purse: serial, reader, balance, opening balance, offline and online
        counters, state (ready | leased | retired) and why."""
        now = int(time.time() * 1000)
        return [{"serial": p["serial"], "reader": p["reader"], "balance": p["balance"],
                 "opening_balance": p["opening_balance"], "limit": p["balance_limit"],
                 "currency_code": p["currency_code"],
                 "offline_counter": p["offline_counter"], "online_counter": p["online_counter"],
                 "state": "leased" if p["state"] == "ready" and p["lease_owner"]
                 and p["leased_until"] > now else p["state"], "reason": p["reason"]}
                for p in self.book.all_purses()]

    def close(self) -> None:
        """Nothing is held between leases (readers are opened per lease)."""
