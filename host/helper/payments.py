"""The helper's payments: one at a time for its card, each run in the background by the payment
client (:func:`..pay.client.resume`, then :func:`..pay.client.pay`, with the journal), and its live
state for the page to poll.

A payment's state is ``started`` -> (``pin``) -> ``paying`` -> ``paid`` | ``refused`` |
``failed``, with a message a person can read. ``refused``: a card, terminal check or server said
no (nothing was paid, or the journal finishes it at the next payment); ``failed``: the reader, the
network or the helper itself. The helper keeps the last :data:`KEPT_JOBS` payments.
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
from ..terminal.online import DEFAULT_RETRY_FOR, PaymentRefused, retrying_transport
from ..terminal.purse import Declined, TerminalCheckFailed, TerminalError, format_amount
from ..terminal.reader_specs import open_reader

log = logging.getLogger("svcard.helper")

KEPT_JOBS = 32
FINAL = frozenset({"paid", "refused", "failed"})

# what the client is doing, told by the request it is about to send
_STEPS = (("/v1/checkout/", "Getting the order from the shop"),
          ("/v1/draw", "The card is paying: asking the payment server"),
          ("/v1/debit-response", "The card has paid: the payment server checks it"),
          ("/v1/status/", "Confirming the payment with the shop"),
          ("/v1/proof", "Paid: sending the card's proof to the payment server"))


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


@dataclass
class Job:
    id: str
    checkout_url: str
    state: str = "started"
    message: str = "Starting the payment"
    result: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

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

    def start(self, checkout_url: str) -> Job | None:
        """A new payment running in the background, or None while the card is busy."""
        with self.lock:
            if self.running is not None:
                return None
            job = Job(secrets.token_hex(16), checkout_url)
            self.running = job
            self.idle.clear()
            self.jobs[job.id] = job
            while len(self.jobs) > KEPT_JOBS:
                self.jobs.popitem(last=False)
        threading.Thread(target=self._run, args=(job,), name=f"helper-pay-{job.id[:8]}",
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
        try:
            result = self._pay(job)
        except Declined as exc:
            self._set(job, "refused", _declined(exc))
        except PaymentRefused as exc:
            self._set(job, "refused", f"The {exc.who} is busy ({exc.reason}): try again later"
                      if exc.busy else f"The {exc.who} refused the payment: {exc.reason}")
        except TerminalError as exc:
            self._set(job, "refused", f"Not paid: {exc}")
        except (ReaderError, ImageError, ProfileError) as exc:
            self._set(job, "failed", f"The card could not be used: {exc}")
        except httpx.HTTPError as exc:
            self._set(job, "failed", f"Network: {exc}. If the card was debited, the journal "
                                     "keeps the payment and the next payment finishes it.")
        except Exception:
            log.exception("payment %s: internal error", job.id)
            self._set(job, "failed", "Internal error in the card helper (see its log; please "
                                     "report it)")
        else:
            self._set(job, "paid", "Paid", result)
        log.info("payment %s: %s: %s", job.id, job.state, job.message)

    def _pay(self, job: Job) -> dict[str, Any]:
        card = self.card
        book = Journal(card.journal)
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
            resumed = C.resume(reader, journal=book, http=http, terminal=card.terminal)
            pin = None
            if card.purse == P.PURSE_ED:
                if card.pin is None:
                    raise TerminalCheckFailed("the ED purse needs the cardholder's PIN: start "
                                              "the helper in a terminal or with --pin-file")
                self._set(job, "pin", "Enter the card's PIN at the card helper")
                pin = card.pin()
            self._set(job, "paying", "Reading the card")
            paying.set()
            with reader.transaction():  # PC/SC: no other program between SELECT and DEBIT
                outcome = C.pay(job.checkout_url, reader, journal=book, http=http, pin=pin,
                                purse=card.purse, terminal=card.terminal)
        log.info("payment %s: paid %s (%s) for %s", job.id,
                 format_amount(outcome.amount, outcome.currency_exponent), outcome.variant,
                 outcome.item)
        return {"txn_id": outcome.txn_id, "item": outcome.item, "goods": outcome.goods,
                "amount": outcome.amount, "currency_exponent": outcome.currency_exponent,
                "variant": outcome.variant, "proven": outcome.proven,
                "receipt": outcome.receipt,
                "resumed": [{"txn_id": r["txn_id"], "outcome": r["outcome"]} for r in resumed]}


def _declined(exc: Declined) -> str:
    if exc.sw == SW.INSUFFICIENT_FUNDS:
        return ("The card refused: its balance is too low for this payment. Nothing was "
                "paid.")
    return f"The card refused ({exc}). Nothing was paid."
