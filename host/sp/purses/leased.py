"""One leased purse: its reader (connected for the lease only), its journal and its row, and
what is done to it before it pays: the resume of anything an interruption left open.

A purse is opened for each lease and closed at its end, so several SP processes sharing the
database (and the journal folder) can take turns with one card: the lease row says whose turn
it is, and a ``virtual:`` image's file lock or a PC/SC reader is held only meanwhile.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from ....reader import Reader
from ...load import client as LC
from ...pay import client as PC
from ...terminal.online import PaymentRefused
from ...terminal.purse import TerminalError
from .cards import MAX_COUNTER, PurseState, read_state
from .config import PursePoolConfig
from .db import PurseBook
from .recording import RecordingJournal

log = logging.getLogger(__name__)


@dataclass
class Lease:
    serial: str
    owner: str
    lease_id: int
    order_ref: str
    reader: Reader
    journal: RecordingJournal
    row: dict[str, Any]
    changes: dict[str, Any] = field(default_factory=dict)   # row columns to write at release
    paid: tuple[str, dict[str, Any]] | None = None   # (order ref, outcome) to book at release
    renewed: float = field(default_factory=time.monotonic)   # when the lease was last extended
    max_amount: int | None = None   # the most the order it pays for may cost (minor units)

    @property
    def balance(self) -> int:
        return int(self.changes.get("balance", self.row["balance"]))

    @property
    def limit(self) -> int:
        return int(self.changes.get("balance_limit", self.row["balance_limit"]))

    def counters(self) -> tuple[int, int]:
        return (int(self.changes.get("offline_counter", self.row["offline_counter"])),
                int(self.changes.get("online_counter", self.row["online_counter"])))

    def take_state(self, state: PurseState) -> None:
        self.changes.update(balance=state.balance, balance_limit=state.limit,
                            offline_counter=state.offline_counter,
                            online_counter=state.online_counter)

    def draining(self, config: PursePoolConfig) -> bool:
        """Within ``drain_margin`` counters of its retirement: its balance is spent on orders
        and never topped up again, so little is left on the card when it retires."""
        return draining(self.counters(), config)

    def retire_if_worn(self, margin: int) -> bool:
        """Mark the purse retired when either counter is within ``margin`` of 65535."""
        offline, online = self.counters()
        worn = [name for name, value in (("offline", offline), ("online", online))
                if MAX_COUNTER - value <= margin]
        if worn:
            left = f"; {self.balance} left on the card" if self.balance else ""
            self.changes.update(state="retired", reason=(
                f"{' and '.join(worn)} counter within {margin} of {MAX_COUNTER} "
                f"(offline {offline}, online {online}){left}"))
        return bool(worn)


def draining(counters: tuple[int, int], config: PursePoolConfig) -> bool:
    return config.drain_margin > 0 and \
        MAX_COUNTER - max(counters) <= config.retire_margin + config.drain_margin


def lease_order(row: dict[str, Any], amount: int | None, low: int,
                config: PursePoolConfig) -> tuple[bool, bool]:
    """The order purses are tried in: those able to pay now first (a draining purse needs only
    the amount, the others ``low``: the amount or the top-up threshold), draining ones first."""
    drains = draining((int(row["offline_counter"]), int(row["online_counter"])), config)
    return int(row["balance"]) < ((amount or 1) if drains else low), not drains


def resume_open(lease: Lease, book: PurseBook, http: httpx.Client) -> str | None:
    """Before the purse pays again: finish (or close) every payment and top-up its journal
    holds open, and bring its row and its orders' rows up to the card. None if the purse may
    be used now; else why not (something is still open, or its journal is not here)."""
    journal = lease.journal
    open_entries = journal.unfinished(lease.serial)
    if open_entries:
        journal.order_ref = journal.load_id = None
        try:
            done = PC.resume(lease.reader, journal=journal, http=http)
            done += LC.resume_loads(lease.reader, journal=journal, http=http)
        except (PaymentRefused, TerminalError, httpx.HTTPError) as exc:
            return f"resuming its open transactions failed: {exc}"
        log.info("purse %s: resumed %s", lease.serial, [d.get("outcome") for d in done])
        lease.take_state(read_state(lease.reader))
        still = journal.unfinished(lease.serial)
        if still:
            return (f"{len(still)} transaction(s) still open after a resume "
                    f"(e.g. {still[0]['txn_id']} at {still[0].get('state')})")
    for row in book.open_payments(lease.serial):
        if row["state"] == "started":   # never reached the draw: the card saw nothing
            book.payment_step(order=row["order_ref"], expect=("started",), state="failed",
                              reason="interrupted before the draw: nothing paid")
            continue
        txn = str(row["txn_id"] or "")
        if journal.is_open(txn):
            continue
        entry = journal.entry(txn)
        if entry is not None:   # final in the journal; the books missed its last step (and
            journal.replay(txn, str(entry["state"]), entry)   # the purse's row its state)
            lease.take_state(read_state(lease.reader))
            continue
        return (f"order {row['order_ref']} is {row['state']} with transaction "
                f"{txn}, which this pool's journal does not hold (is the journal folder "
                f"shared by every SP process?)")
    return None


def rotate_journal(lease: Lease, book: PurseBook, max_bytes: int) -> int:
    """As the purse is given back: its journal's finished transactions rotated away once the
    journal passes ``max_bytes``, keeping those whose rows in the books are still open (a
    resume finds them). Lines moved; a failure is logged, never raised (the journal stays)."""
    journal = lease.journal
    try:
        if journal.path.stat().st_size <= max_bytes:
            return 0
        keep = {str(r["txn_id"]) for r in book.open_payments(lease.serial) if r["txn_id"]}
        for load in book.open_loads(lease.serial):
            keep |= {str(load["txn_id"]), f"req-{load['request_id']}"}
        return journal.rotate(keep, max_bytes)
    except Exception as exc:   # a full disk, the books down: rotated at a later give-back
        log.warning("purse %s: journal not rotated: %s", lease.serial, exc)
        return 0
