"""What every client that goes online shares: a server's refusal and the reason it gave, the
retry of a busy server (503 with ``Retry-After``) within a deadline, and what a command says
when the network fails or the user interrupts it with a transaction open in the journal.

Only requests marked :data:`RETRY_SAFE` are retried, and only on 503: the servers answer 503
when they did nothing (no PSAM or HSM free, a database transaction rolled back, too many open
orders), and each marked request is one the server answers idempotently per transaction (the
same draw, debit response, result or confirmation again gets the same answer). A 4xx is never
retried. Retries are :mod:`tenacity`'s, inside an httpx transport, so the client code stays a
plain sequence of requests.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import functools
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import click

from ...protocols import messages as M
from ...protocols import purse as P
from ..kit.command_line import (
    EXIT_DECLINED,
    EXIT_INTERRUPTED,
    EXIT_NETWORK,
    EXIT_USAGE,
    emit,
    fail,
)
from .journal import Journal, open_steps
from .purse import TerminalError

RETRY_KEY = "svcard_retry_safe"
RETRY_SAFE: dict[str, Any] = {RETRY_KEY: True}   # httpx ``extensions=`` of a retryable request
DEFAULT_RETRY_FOR = 30.0
MIN_WAIT = 0.25   # seconds: the shortest wait between two tries, whatever Retry-After says
# journal steps at or past the card's debit (payments) or credit (loads): a failure from here
# on is not a refusal, the money moved or may have, and --resume finishes it
PAST_CARD_STEP = frozenset({"debit-sent", "debited", "confirmed", "goods",
                            "load-command", "card-loaded", "undecided", "load-confirmed"})

if TYPE_CHECKING:
    import httpx


class PaymentRefused(TerminalError):
    """A server (payment, merchant, bank or load server) refused; the reason is theirs."""

    def __init__(self, who: str, status: int, reason: str, url: str = "") -> None:
        super().__init__(f"{who} refused ({status}): {reason}")
        self.who, self.status, self.reason, self.url = who, status, reason, url

    @classmethod
    def answer(cls, who: str, response: httpx.Response) -> PaymentRefused:
        """The refusal a non-success ``response`` carries."""
        return cls(who, response.status_code, server_reason(response), str(response.url))

    @property
    def busy(self) -> bool:
        """The server did nothing and asks to be asked again (503)."""
        return self.status == 503


def server_reason(response: httpx.Response) -> str:
    reason = response.headers.get("X-Svcard-Reason")
    if reason:
        return str(reason)
    try:
        return str(M.parse(M.ErrorMessage, response.content, "error").reason)
    except M.MessageError:
        try:
            return str(response.json().get("reason", response.text))
        except (ValueError, AttributeError):
            return response.text[:200]


def retry_after(response: httpx.Response) -> float | None:
    """The seconds a ``Retry-After`` header asks for (delta seconds or an HTTP date), or None."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


OnRetry = Callable[[str, str, float], None]


def retrying_transport(retry_for: float, inner: httpx.BaseTransport | None = None,
                       on_retry: OnRetry | None = None) -> httpx.BaseTransport:
    """An httpx transport that sends a :data:`RETRY_SAFE` request again while the server
    answers 503, waiting what its ``Retry-After`` asks (never past ``retry_for`` seconds from
    the first attempt), then hands back the last answer. Other requests and answers pass
    through untouched. ``on_retry(url, reason, wait)`` is told of each retry."""
    return _retrying_class()(retry_for, inner, on_retry)


@functools.cache
def _retrying_class() -> Callable[[float, httpx.BaseTransport | None, OnRetry | None],
                                  httpx.BaseTransport]:
    """The transport class, made on first use: httpx and tenacity are imported only by the
    commands that go online (``svcard --help`` stays quick)."""
    import httpx
    import tenacity

    backoff = tenacity.wait_exponential(multiplier=0.25, max=4)   # 503 without Retry-After

    class RetryingTransport(httpx.BaseTransport):
        def __init__(self, retry_for: float, inner: httpx.BaseTransport | None,
                     on_retry: OnRetry | None) -> None:
            self.retry_for = retry_for
            self.inner = inner or httpx.HTTPTransport()
            self.on_retry = on_retry

        def _wait(self, state: tenacity.RetryCallState) -> float:
            assert state.outcome is not None
            asked = retry_after(state.outcome.result())
            wait = max(MIN_WAIT, backoff(state) if asked is None else asked)  # never spin
            left = self.retry_for - (state.seconds_since_start or 0.0)
            return max(0.0, min(wait, left))

        def _before_sleep(self, state: tenacity.RetryCallState) -> None:
            assert state.outcome is not None
            response: httpx.Response = state.outcome.result()
            response.read()
            response.close()
            if self.on_retry is not None and state.next_action is not None:
                request: httpx.Request = state.args[0]   # an answer here has no request yet
                self.on_retry(str(request.url), server_reason(response),
                              state.next_action.sleep)

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            if not request.extensions.get(RETRY_KEY) or self.retry_for <= 0:
                return self.inner.handle_request(request)
            retrying = tenacity.Retrying(
                retry=tenacity.retry_if_result(lambda r: r.status_code == 503),
                stop=tenacity.stop_after_delay(self.retry_for), wait=self._wait,
                before_sleep=self._before_sleep,
                retry_error_callback=lambda state: state.outcome.result() if state.outcome
                else None)
            response: httpx.Response = retrying(self.inner.handle_request, request)
            return response

        def close(self) -> None:
            self.inner.close()

    return RetryingTransport


def http_client(timeout: float, retry_for: float) -> httpx.Client:
    """The HTTP client of ``svcard pay`` and ``svcard load``: busy servers retried for up to
    ``retry_for`` seconds per request, each retry said on stderr."""
    def say(url: str, reason: str, wait: float) -> None:
        click.echo(f"svcard: {url} is busy ({reason}); asking again in {wait:.1f} s", err=True)

    import httpx

    return httpx.Client(timeout=timeout, transport=retrying_transport(retry_for, on_retry=say))


def retry_for_option(f: Any) -> Any:
    """``--retry-for SECONDS`` (passed as ``retry_for``)."""
    return click.option(
        "--retry-for", "retry_for", default=DEFAULT_RETRY_FOR, show_default=True,
        type=click.FloatRange(0, 3600), metavar="SECONDS",
        help="Ask a busy server (503) again for up to SECONDS per request, waiting what its "
             "Retry-After asks; then exit 11. 0: never ask again.")(f)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, like Ctrl-C's KeyboardInterrupt."""


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def resume_command(command: str, card_spec: str, journal: Path | None,
                   aid: bytes = P.DEFAULT_IEP_AID) -> str:
    """The command line that finishes what ``command`` left in the journal (with ``--aid``
    when the purse is not at svcard's default AID)."""
    words = ["svcard", command, "--resume", "--card", card_spec]
    if aid != P.DEFAULT_IEP_AID:
        words += ["--aid", aid.hex().upper()]
    if journal is not None:
        words += ["--journal", str(journal)]
    return shlex.join(words)


def past_card_step(journal: Journal) -> list[str]:
    """The transactions this journal object wrote that are still open at or past the card's
    debit or credit (:data:`PAST_CARD_STEP`): whatever failed after, the card's money moved or
    may have, so the outcome is pending, never a refusal."""
    open_txns = [t for t in list(journal.touched) if journal.is_open(t)]
    if not open_txns:
        return []
    return [t for t in open_txns  # open ones: held without reading the journal's history
            if (journal.entry(t) or {}).get("state") in PAST_CARD_STEP]


def _state_text(journal: Journal, finish: str) -> str:
    steps = open_steps(journal)
    if not steps:
        return "nothing was left pending in the journal"
    return "; ".join(steps) + f". Finish it with: {finish}"


@contextlib.contextmanager
def journalled_run(journal: Journal, finish: str, retry_for: float) -> Iterator[None]:
    """Run a client command whose every step is journalled: SIGTERM acts as Ctrl-C, and an
    interruption (exit 130), a server busy past the retry deadline or unreachable (exit 11)
    ends in one line saying what state the journal holds and ``finish``, the command that
    finishes it. So does any refusal or server error once a transaction is open past the
    card's step (:func:`past_card_step`): a 5xx is exit 11 (the money is pending, not
    refused), a 4xx or a terminal check exit 1. Place it inside
    :func:`~svcard.host.terminal.card_commands.handled`."""
    import httpx

    try:
        previous = signal.signal(signal.SIGTERM, _terminated)
    except ValueError:  # not the main thread: only Ctrl-C is ours
        previous = None
    try:
        yield
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        fail(f"{what}: {_state_text(journal, finish)}", EXIT_INTERRUPTED)
    except PaymentRefused as exc:
        if not exc.busy:
            if not past_card_step(journal):
                raise   # a refusal before the card's step: exit 1 (handled)
            # after the card's step: a server error is pending (exit 11), a 4xx stays a refusal
            # (exit 1), both with what the journal holds and how to finish it
            at = f" at {exc.url}" if exc.url else ""
            answered = (f"failed ({exc.status}: {exc.reason})" if exc.status >= 500
                        else f"refused ({exc.status}: {exc.reason})")
            fail(f"the {exc.who}{at} {answered} after the card's step: "
                 f"{_state_text(journal, finish)}",
                 EXIT_NETWORK if exc.status >= 500 else EXIT_DECLINED)
        gave_up = f" after {retry_for:g} s" if retry_for > 0 else ""
        fail(f"the {exc.who} at {exc.url} is busy{gave_up}: {exc.reason}; "
             f"{_state_text(journal, finish)}", EXIT_NETWORK)
    except TerminalError as exc:
        if not past_card_step(journal):
            raise
        fail(f"{exc}; {_state_text(journal, finish)}", EXIT_DECLINED)
    except httpx.UnsupportedProtocol as exc:
        _network_failure(exc, "is not an http:// or https:// URL", EXIT_USAGE)
    except httpx.HTTPError as exc:
        _network_failure(exc, f"cannot be reached ({type(exc).__name__}: {exc}); "
                              f"{_state_text(journal, finish)}", EXIT_NETWORK)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _network_failure(exc: httpx.HTTPError, text: str, code: int) -> NoReturn:
    try:
        url = str(exc.request.url)
    except RuntimeError:
        url = "the server"
    fail(f"{url} {text}", code)


def report_resumed(journal: Journal, report: list[dict[str, Any]], as_json: bool) -> None:
    """Print what a ``--resume`` finished; exit 1 if a transaction is still open after it
    (0 when nothing is pending)."""
    pending = [r["txn_id"] for r in report if journal.is_open(str(r["txn_id"]))]
    lines = []
    for r in report:
        extra = "".join(f", {k}: {r[k]}" for k in ("reason", "goods") if r.get(k))
        lines.append(f"{'still pending' if r['txn_id'] in pending else 'finished'} "
                     f"{r['txn_id']}: {r['outcome']}{extra}")
    emit(as_json, {"resumed": report, "pending": pending},
         "\n".join(lines) or "nothing to finish for this card")
    if pending:
        click.echo(f"svcard: {len(pending)} transaction(s) still pending: run the same "
                   f"command again later", err=True)
        sys.exit(EXIT_DECLINED)
