"""A purse's journal that also keeps the pool's books.

Each pool purse has its own client journal (``JOURNAL_DIR/SERIAL.jsonl``), written by the
ordinary client code (``pay.client``, ``load.client``). :class:`RecordingJournal` writes each
line exactly as :class:`~svcard.host.terminal.journal.Journal` does and then moves the pool's
rows on from what the line says, so the books follow the journal step by step, also when a
later :func:`~svcard.host.pay.client.resume` finishes a payment an interruption left:

* a payment's ``draw`` (before the draw request goes out) links the order being paid to its
  transaction id and counter; ``debited`` records the card's TAC; ``done`` marks it ``paid``
  (for the payment being made now the pool does that as it gives the purse back, with the
  outcome, in one transaction; if it never gets there the journal's ``done`` is replayed);
  ``abandoned``/``refused`` before the debit mark it ``failed`` (nothing paid); ``refused``
  after the debit marks it ``disputed`` (the card paid, the merchant did not take it: for the
  payment server's clearing and a person to settle); ``unproven`` marks it so.
* a top-up's ``load-starting`` links the pool's load row to its bank request id, the bank's
  answer to the load's transaction id, and ``load-confirmed`` records the outcome.

The journal line comes first: if the database cannot follow, the client stops before its next
card or network step, and the next lease's resume brings the books up to the journal.

**Rotation** (:meth:`RecordingJournal.rotate`): a purse pays tens of thousands of times, so its
journal would grow forever. Once it passes ``purses.journal_max_bytes`` the pool (holding the
purse's lease) moves the lines of every finished transaction out of it, into
``SERIAL.jsonl.done`` (the previous ``.done`` becomes ``.done.1`` once that passes eight times
the limit: a bounded history; the pool's books in the database keep every payment). A
transaction still open, one the books have not yet followed to its end (``keep``), and any
that ended after an open one began (whose resume may look for it) keep all their lines.
Under the journal's lock, the finished lines are appended to the archive first (synced), then
the journal is replaced in one rename by a file of the kept lines (synced before): a crash at
any point leaves the old journal or the new one, each holding every unfinished transaction
whole (at worst a finished one is in both files).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

from ....card.storage import write_atomically
from ....protocols import loadmsg as L
from ...terminal.journal import DONE_STATES, Journal
from .db import PurseBook

ARCHIVE_GENERATION = 8   # the archive is moved aside past this many journal limits


class AmountMismatch(Exception):
    """The merchant's checkout asks another amount than the one the SP means to pay, or
    sends the payment elsewhere than the merchant and the configured payment servers."""


def origin(url: str) -> str:
    """``scheme://host:port`` of ``url`` (lower case), or "" for an unusable one."""
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return ""
    if u.scheme not in ("http", "https") or not u.host:
        return ""
    return f"{u.scheme}://{u.host}:{u.port or (443 if u.scheme == 'https' else 80)}".lower()


class RecordingJournal(Journal):
    """A purse's journal; ``order_ref`` / ``load_id`` name the pool row the client code is
    working on now (set by the pool while it holds the purse's lease)."""

    def __init__(self, path: Path, book: PurseBook) -> None:
        super().__init__(path)
        self.book = book
        self.order_ref: str | None = None
        self.load_id: int | None = None
        self.counter: int | None = None    # the last payment's offline counter
        self.tac = ""                      # and the card's TAC for it
        self.txn_id = ""
        self.expected_amount: int | None = None   # the amount the SP means to pay, if named
        self.max_amount: int | None = None        # the most the SP pays for it, if named
        self.merchant_origin = ""                 # the checkout's origin: the status URL's
        self.payment_servers: tuple[str, ...] = ()   # origins the draw may go to (() = any)

    def write(self, txn_id: str, state: str, **data: Any) -> None:
        super().write(txn_id, state, **data)
        # the payment steps acted on and the load steps acted on share no name
        self._payment_step(txn_id, state, data)
        self._load_step(txn_id, state, data)

    def rotate(self, keep: Iterable[str] = (), max_bytes: int = 1 << 20,
               tear: Callable[[str], None] | None = None) -> int:
        """Move the lines of finished transactions (not in ``keep``) to the archive; how many
        lines moved. ``tear``: a test's crash point ("archived", then write_atomically's)."""
        held = set(keep)
        with self._locked():
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                return 0
            data = data[:data.rfind(b"\n") + 1]   # a torn tail: its step never ran
            lines: list[tuple[str | None, bytes]] = []
            state: dict[str, Any] = {}
            first: dict[str, int] = {}
            last: dict[str, int] = {}
            for i, line in enumerate(data.splitlines(keepends=True)):
                try:
                    record = json.loads(line)
                    name = str(record["txn_id"])
                except (ValueError, KeyError, TypeError):
                    lines.append((None, line))   # unreadable: a reader skips it too
                    continue
                state[name] = record.get("state")
                first.setdefault(name, i)
                last[name] = i
                lines.append((name, line))
            unfinished = {t for t, st in state.items() if st not in DONE_STATES}
            # only what ended before the first unfinished one began: a resume of that one may
            # look for a transaction it started (a top-up's bank request -> its load)
            cut = min((first[t] for t in unfinished), default=len(lines))
            held |= unfinished | {t for t in state if last[t] >= cut}
            gone = [line for t, line in lines if t is not None and t not in held]
            if not gone:
                return 0
            self._archive(b"".join(gone), max_bytes)
            if tear:
                tear("archived")
            write_atomically(self.path, b"".join(line for t, line in lines if t in held),
                             tear)
        return len(gone)

    def _archive(self, data: bytes, max_bytes: int) -> None:
        archive = self.path.with_name(self.path.name + ".done")
        try:
            if archive.stat().st_size > ARCHIVE_GENERATION * max_bytes:
                os.replace(archive, archive.with_name(archive.name + ".1"))
        except FileNotFoundError:
            pass
        fd = os.open(archive, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def replay(self, txn_id: str, state: str, data: dict[str, Any]) -> None:
        """Bring the books up to a journal line already written."""
        self._payment_step(txn_id, state, data)
        self._load_step(txn_id, state, data)

    def _payment_step(self, txn: str, state: str, data: dict[str, Any]) -> None:
        book = self.book
        if state == "draw":
            self.counter, self.tac, self.txn_id = int(data["counter"]), "", txn
            asked = int(data.get("params", {}).get("amount", -1))
            wrong = (f"the order says {self.expected_amount}"
                     if self.expected_amount is not None and asked != self.expected_amount
                     else f"the SP pays at most {self.max_amount}"
                     if self.max_amount is not None and asked > self.max_amount else "")
            if wrong:
                wrong = f"the merchant's checkout asks {asked} minor units, {wrong}"
            wrong = wrong or self._elsewhere(data.get("params", {}))
            if wrong:   # before the draw request goes out: closed here, the card never asked
                Journal.write(self, txn, "abandoned", reason="the checkout is not the "
                              "order's: not paid")
                raise AmountMismatch(f"{wrong}: not paid")
            if self.order_ref is not None:
                amount = int(data.get("params", {}).get("amount", 0))
                book.payment_step(order=self.order_ref, expect=("started",), txn_id=txn,
                                  counter=self.counter, amount=amount, state="drawing")
        elif state == "debited":
            self.tac = str(data.get("tac", ""))
            book.payment_step(txn=txn, expect=("drawing", "debited"), tac=self.tac,
                              state="debited")
        elif state == "done":   # after "refused": the merchant had released it already (409)
            if self.order_ref is not None and txn == self.txn_id:
                return   # the live payment: the pool books it paid as it gives the purse back
            values: dict[str, Any] = {"state": "paid", "reason": data.get("reason", "")}
            if data.get("goods") is not None:   # a resume's goods, kept for the relay
                values["outcome"] = {"goods": str(data["goods"]),
                                     "item": str(data.get("item") or ""),
                                     "receipt": dict(data.get("receipt") or {})}
            book.payment_step(txn=txn, expect=("drawing", "debited", "disputed"), **values)
        elif state == "abandoned":
            book.payment_step(txn=txn, expect=("drawing",), state="failed",
                              reason=data.get("reason", ""))
        elif state == "refused":
            reason = data.get("reason", "")
            if not book.payment_step(txn=txn, expect=("drawing",), state="failed",
                                     reason=reason):
                book.payment_step(txn=txn, expect=("debited",), state="disputed",
                                  reason=reason)
        elif state == "unproven":
            book.payment_step(txn=txn, expect=("drawing", "debited"), state="unproven",
                              reason=data.get("reason", ""))

    def _elsewhere(self, params: dict[str, Any]) -> str:
        """Why the checkout sends the SP's payment elsewhere ("" when it does not): its
        confirmation to another origin than the checkout's, its draw to a payment server
        the pool was not configured with."""
        status, payment = str(params.get("status_url", "")), str(params.get("payment_url", ""))
        if self.merchant_origin and origin(status) != self.merchant_origin:
            return (f"the checkout sends the confirmation to {origin(status)}, not to the "
                    f"merchant ({self.merchant_origin})")
        if self.payment_servers and origin(payment) not in self.payment_servers:
            return (f"the checkout names payment server {origin(payment)}, not one of "
                    f"purses.payment_servers")
        return ""

    def _load_step(self, txn: str, state: str, data: dict[str, Any]) -> None:
        book = self.book
        if state == "load-starting" and self.load_id is not None:
            book.load_step(load_id=self.load_id, request_id=str(data["request_id"]))
        elif state == "load-done" and txn.startswith("req-"):
            request_id = txn[4:]
            if "txn" in data:
                book.load_step(request=request_id, txn_id=str(data["txn"]), state="open")
            else:
                book.load_step(request=request_id, state="refused",
                               reason=data.get("reason", "the bank debited nothing"))
        elif state == "load-requested":
            book.load_step(txn=txn, online_counter=int(data["counter"]))
        elif state == "load-confirmed":
            loaded = int(data.get("outcome", -1)) == L.OUTCOME_LOADED
            book.load_step(txn=txn, state="loaded" if loaded else "not-loaded",
                           reason=data.get("reason", ""))
