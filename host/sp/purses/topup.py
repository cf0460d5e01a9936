"""Topping a leased purse up from the provider's bank, through the ordinary load flow
(``load.client.load``: the bank debits the provider's account, the load server's HSM
authorises the card's CREDIT FOR LOAD).

When: a purse is topped up while the pool holds it, (1) BEFORE a payment when its balance is
under the threshold or under the payment's amount (when the caller names the amount), and
(2) AFTER a payment that left it under the threshold, so the next order finds it ready. How
much: the configured top-up amount, or what the payment needs if more, never above what the
card's balance limit leaves room for. Every top-up is a row of ``sp_purse_loads`` (moved on
step by step by the purse's journal), and the purse's row takes the balance and counters the
card shows afterwards.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from ...load import client as LC
from ...terminal.online import PaymentRefused
from ...terminal.purse import TerminalError
from .cards import read_state
from .db import PurseBook
from .leased import Lease

log = logging.getLogger(__name__)


def top_up_amount(lease: Lease, amount: int, need: int) -> int:
    """What to load: ``amount`` or ``need`` (minor units short of a payment) if more, capped
    by the balance limit's headroom."""
    return max(0, min(lease.limit - lease.balance, max(amount, need)))


def top_up(lease: Lease, book: PurseBook, http: httpx.Client, *, bank_url: str, account: str,
           secret: str, currency_code: int, amount: int, need: int = 0) -> dict[str, Any]:
    """Load the purse; what happened, as recorded (``outcome``: loaded | not loaded |
    refused | open | full). Never raises for a refusal or a broken connection: the payment
    goes on without the top-up (a load left open is resumed before the purse pays again)."""
    value = top_up_amount(lease, amount, need)
    if value <= 0:
        return {"outcome": "full", "amount": 0, "reason": "the balance limit leaves no room"}
    before = lease.balance
    load_id = book.start_load(lease.serial, None, value, currency_code, before)
    lease.journal.load_id = load_id
    record: dict[str, Any] = {"load_id": load_id, "amount": value, "balance_before": before}
    try:
        outcome = LC.load(bank_url, lease.reader, account=account, secret=secret,
                          amount=value, journal=lease.journal, http=http)
        record.update(outcome=outcome.outcome, txn_id=outcome.txn_id, reason=outcome.reason)
    except PaymentRefused as exc:
        record.update(outcome="refused" if exc.who == "bank" else "open", reason=exc.reason)
    except (TerminalError, httpx.HTTPError) as exc:
        record.update(outcome="open", reason=str(exc) or type(exc).__name__)
    finally:
        lease.journal.load_id = None
    if record["outcome"] in ("refused", "open"):
        row = {"state": record["outcome"], "reason": record["reason"]}
        if record["outcome"] == "open":   # the journal's own steps may have gone further
            row.pop("state")
        book.load_step(load_id=load_id, **row)
        log.warning("purse %s: top-up of %d %s: %s", lease.serial, value,
                    record["outcome"], record["reason"])
    try:
        lease.take_state(read_state(lease.reader))
    except TerminalError as exc:   # the card went away: its row is re-read at the next lease
        record["reason"] = f"{record.get('reason', '')}; card not re-read: {exc}"
    record["balance_after"] = lease.balance
    book.load_step(load_id=load_id, balance_after=lease.balance)
    return record
