"""The helper's payments: one at a time for its card, each run in the background by the payment
client (:func:`..pay.client.resume`, then :func:`..pay.client.pay`, with the journal), and its live
state for the page to poll.

A payment's state is ``started`` -> (``pin``) -> ``paying`` -> ``paid`` | ``pending`` |
``refused`` | ``failed``, with a message a person can read. ``refused``: a card, terminal check
or server said no before the card was debited (nothing was paid); ``pending``: something failed
after the card's debit (a server error, busy or unreachable), so the card was debited (or may
have been) and the journal holds the payment open: the helper tries once right away to finish
it, and otherwise finishes it at its next payment; it must not be paid again. ``failed``: the
reader, the network or the helper itself, before the debit. The helper keeps the last
:data:`KEPT_JOBS` payments. A *load* (``start(bank_url, load=...)``, :mod:`.loads`) is a job of
the same kind, one at a time with the payments, ending ``loaded``, ``refused`` or ``failed``.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ...card.personalise import ProfileError
from ...card.storage import ImageError
from ...protocols import purse as P
from ...protocols import sw as SW
from ...reader import ReaderError
from ..pay import client as C
from ..pay.client_terminal import ClientTerminal
from ..terminal.journal import Journal
from ..terminal.online import (
    DEFAULT_RETRY_FOR,
    PaymentRefused,
    past_card_step,
    retrying_transport,
)
from ..terminal.purse import (
    Declined,
    TerminalCheckFailed,
    TerminalError,
    format_amount,
    select_purse,
)
from ..terminal.reader_specs import open_reader
from .loads import run_load

log = logging.getLogger("svcard.helper")

KEPT_JOBS = 32
FINAL = frozenset({"paid", "pending", "refused", "failed", "loaded"})

# what the client is doing, told by the request it is about to send
_STEPS = (("/v1/checkout/", "Getting the order from the shop"),
          ("/v1/draw", "The card is paying: asking the payment server"),
          ("/v1/debit-response", "The card has paid: the payment server checks it"),
          ("/v1/status/", "Confirming the payment with the shop"),
          ("/v1/proof", "Paid: sending the card's proof to the payment server"))


class WrongCard(TerminalCheckFailed):
    """The card in the reader is not the one the page named (``card_serial``)."""


@dataclass
class HelperCard:
    """The card the helper pays with, and how."""

    spec: str
    journal: Path
    purse: int = P.PURSE_EP
    pin: Callable[[], str] | None = field(default=None, repr=False)  # asks for the ED PIN
    terminal: ClientTerminal | None = None     # a registered client terminal (FIG. 7)
    timeout: float = 30.0                      # HTTP timeout, seconds
    retry_for: float = DEFAULT_RETRY_FOR       # a busy server (503) is asked again this long
    aid: bytes = P.DEFAULT_IEP_AID             # the purse application the helper selects


@dataclass
class Job:
    id: str
    checkout_url: str
    state: str = "started"
    message: str = "Starting the payment"
    result: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    card_serial: str | None = None    # pay only with this card (its purse serial, hex)

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "message": self.message, **self.result}


class Payments:
    """One payment at a time with the helper's card; the recent ones kept for polling."""

    def __init__(self, card: HelperCard) -> None:
        self.card = card
        self.lock = threading.Lock()
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.running: Job | None = None
        self.idle = threading.Event()
        self.idle.set()

    def start(self, checkout_url: str, load: dict[str, Any] | None = None,
              card_serial: str | None = None) -> Job | None:
        """A new payment running in the background, or None while the card is busy.
        ``load``: a load from the bank at ``checkout_url`` instead (account, secret, amount)."""
        with self.lock:
            if self.running is not None:
                return None
            job = Job(secrets.token_hex(16), checkout_url, card_serial=card_serial)
            self.running = job
            self.idle.clear()
            self.jobs[job.id] = job
            while len(self.jobs) > KEPT_JOBS:
                self.jobs.popitem(last=False)
        target = self._run if load is None else self._run_load
        args = (job,) if load is None else (job, load)
        threading.Thread(target=target, args=args, name=f"helper-pay-{job.id[:8]}",
                         daemon=True).start()
        return job

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self.lock:
            job = self.jobs.get(job_id)
            return None if job is None else job.view()

    def busy(self) -> bool:
        with self.lock:
            return self.running is not None

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until no payment is under way (at most ``timeout`` seconds)."""
        return self.idle.wait(timeout)

    def _set(self, job: Job, state: str, message: str,
             result: dict[str, Any] | None = None) -> None:
        with self.lock:
            job.state, job.message = state, message
            if result is not None:
                job.result = result
            if state in FINAL:
                self.running = None
                self.idle.set()

    def _run(self, job: Job) -> None:
        book = Journal(self.card.journal)
        try:
            result = self._pay(job, book)
        except Exception as exc:
            pending = _past_debit(book)
            if pending is None:
                self._failure(job, exc)
            else:
                self._set(job, "pending", _pending_text(exc, book, pending),
                          {"txn_id": pending})
        else:
            self._set(job, "paid", "Paid", result)
        log.info("payment %s: %s: %s", job.id, job.state, job.message)

    def _run_load(self, job: Job, load: dict[str, Any]) -> None:
        book = Journal(self.card.journal)
        try:
            result = run_load(self.card, book, job.checkout_url, load["account"],
                              load["secret"], int(load["amount"]),
                              lambda state, text: self._set(job, state, text))
        except Exception as exc:
            self._failure(job, exc)
            if job.state == "failed" or job.state == "refused":
                self._set(job, job.state, job.message + " If the card was being loaded, "
                          "the card helper finishes that load at its next contact.")
        else:
            loaded = result["outcome"] == "loaded"
            self._set(job, "loaded" if loaded else "refused",
                      "Loaded" if loaded else f"Not loaded: {result['reason']}", result)
        log.info("load %s: %s: %s", job.id, job.state, job.message)

    def _failure(self, job: Job, exc: Exception) -> None:
        """A payment that failed before the card was debited: refused or failed."""
        if isinstance(exc, Declined):
            self._set(job, "refused", _declined(exc))
        elif isinstance(exc, PaymentRefused):
            self._set(job, "refused", f"The {exc.who} is busy ({exc.reason}): try again later"
                      if exc.busy else f"The {exc.who} refused the payment: {exc.reason}")
        elif isinstance(exc, TerminalError):
            self._set(job, "refused", f"Not paid: {exc}")
        elif isinstance(exc, ReaderError | ImageError | ProfileError):
            self._set(job, "failed", f"The card could not be used: {exc}")
        elif isinstance(exc, httpx.HTTPError):
            self._set(job, "failed", f"Network: {exc}. If the card was debited, the journal "
                                     "keeps the payment and the next payment finishes it.")
        else:
            log.error("payment %s: internal error", job.id, exc_info=exc)
            self._set(job, "failed", "Internal error in the card helper (see its log; please "
                                     "report it)")

    def _pay(self, job: Job, book: Journal) -> dict[str, Any]:
        card = self.card
        paying = threading.Event()

        def step(request: httpx.Request) -> None:
            if paying.is_set():
                path = request.url.path
                for prefix, text in _STEPS:
                    if path.startswith(prefix):
                        self._set(job, "paying", text)

        def busy(url: str, reason: str, wait: float) -> None:
            self._set(job, job.state, f"A server is busy ({reason}); asking again in "
                                      f"{wait:.1f} s")

        transport = retrying_transport(card.retry_for, on_retry=busy)
        with httpx.Client(timeout=card.timeout, transport=transport,
                          event_hooks={"request": [step]}) as http, \
                open_reader(card.spec) as reader:
            self._set(job, "started", "Finishing any earlier payment of this card")
            resumed = C.resume(reader, journal=book, http=http, terminal=card.terminal,
                               aid=card.aid)
            pin = None
            if card.purse == P.PURSE_ED:
                if card.pin is None:
                    raise TerminalCheckFailed("the ED purse needs the cardholder's PIN: start "
                                              "the helper in a terminal or with --pin-file")
                self._set(job, "pin", "Enter the card's PIN at the card helper")
                pin = card.pin()
            self._set(job, "paying", "Reading the card")
            try:
                with reader.transaction():  # PC/SC: no other program between SELECT and DEBIT
                    # the card named is checked inside the transaction: a card swapped in
                    # before it began is the one read here, and none can be after
                    if job.card_serial is not None and select_purse(
                            reader, card.aid).app_serial.upper() != job.card_serial.upper():
                        raise WrongCard("the card in the reader is not the card chosen for "
                                        "this payment: put that card in")
                    paying.set()
                    outcome = C.pay(job.checkout_url, reader, journal=book, http=http,
                                    pin=pin, purse=card.purse, terminal=card.terminal,
                                    aid=card.aid)
            except WrongCard:
                raise   # nothing of this payment started: an older open one is not its result
            except (TerminalError, httpx.HTTPError):
                txn = _past_debit(book)
                if txn is None:
                    raise
                # the card was debited: try once, right away, to finish it (the journal's resume)
                self._set(job, "paying", "The card has paid: finishing the payment")
                finished = _finished(C.resume(reader, journal=book, http=http,
                                              terminal=card.terminal, aid=card.aid), txn, book)
                if finished is None:
                    raise
                log.info("payment %s: finished %s on a second try", job.id, txn)
                return finished
        log.info("payment %s: paid %s (%s) for %s", job.id,
                 format_amount(outcome.amount, outcome.currency_exponent), outcome.variant,
                 outcome.item)
        return {"txn_id": outcome.txn_id, "item": outcome.item, "goods": outcome.goods,
                "amount": outcome.amount, "currency_exponent": outcome.currency_exponent,
                "variant": outcome.variant, "proven": outcome.proven,
                "receipt": outcome.receipt,
                "resumed": [{"txn_id": r["txn_id"], "outcome": r["outcome"]} for r in resumed]}


def _past_debit(book: Journal) -> str | None:
    """The payment this helper left open at or past the card's debit, if any."""
    open_txns = past_card_step(book)
    return open_txns[-1] if open_txns else None


def _pending_text(exc: Exception, book: Journal, txn: str) -> str:
    if isinstance(exc, PaymentRefused):
        why = f"the {exc.who} {'is busy' if exc.busy else 'failed'} ({exc.reason})"
    elif isinstance(exc, httpx.HTTPError):
        why = f"a server could not be reached ({type(exc).__name__})"
    else:
        why = str(exc)
    step = (book.entry(txn) or {}).get("state")
    debited = "may have been debited" if step == "debit-sent" else "was debited"
    return (f"The card {debited}; the card helper will finish this payment: {why}, so it "
            "is kept in the helper's journal and finished at the helper's next payment. Do "
            "not pay again.")


def _finished(report: list[dict[str, Any]], txn: str, book: Journal) -> dict[str, Any] | None:
    """The page's result for ``txn`` if the resume ``report`` completed it, else None."""
    done = [r for r in report if r["txn_id"] == txn and r["outcome"].startswith("complete")]
    if not done or book.is_open(txn):
        return None
    entry = book.entry(txn) or {}
    params = entry.get("params", {})
    return {"txn_id": txn, "item": str(params.get("description", "")),
            "goods": str(done[0].get("goods") or entry.get("goods") or ""),
            "amount": int(params.get("amount", 0)),
            "currency_exponent": int(params.get("currency_exponent", 0)),
            "variant": str(params.get("variant", "")),
            "proven": params.get("variant") != "fig7", "receipt": {},
            "resumed": [{"txn_id": r["txn_id"], "outcome": r["outcome"]} for r in report]}


def _declined(exc: Declined) -> str:
    if exc.sw == SW.INSUFFICIENT_FUNDS:
        return ("The card refused: its balance is too low for this payment. Nothing was "
                "paid.")
    return f"The card refused ({exc}). Nothing was paid."
