"""Interrupted and busy (issue 10, point 5): ``svcard pay`` and ``svcard load`` stopped by
SIGINT or SIGTERM at a journalled step say what state the money is in and how to finish it (exit
130); ``--resume`` finishes it without a new purchase or load; a busy server (503 with
Retry-After) is asked again within ``--retry-for``, past it exit 11, as for a server that cannot
be reached.

The clients run as real processes against real servers on loopback. To stop one at an exact
step, a small launcher runs the ``svcard`` command line in a child process whose journal sends
the process a real signal right after it records the chosen step (the hook style of
tests/test_journal.py); one test also sends SIGINT from outside, to the ``svcard`` program
itself, while a slow card (``delayed:MS:SPEC``) keeps it at the DEBIT.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from test_helper import merchant_behind_fake

from svcard.card.storage import read_image
from svcard.host.cli.main import main
from svcard.host.demo.system import card_image
from svcard.host.kit.serving import ServerThread, free_port
from svcard.host.load.stack import LoadStack, start_load_stack
from svcard.host.pay import client as C
from svcard.host.pay.stack import Stack, start_stack
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.online import RETRY_SAFE, retry_after, retrying_transport
from svcard.host.terminal.reader_specs import open_reader
from svcard.reader import VirtualReader

SVCARD = str(Path(sys.executable).parent / "svcard")

# `svcard ARGS...` in this process, but the journal signals the process right after it has
# recorded STEP (SIGINT as Ctrl-C would, or SIGTERM).
STOP_AT = r'''
import os, signal, sys
from svcard.host.terminal.journal import Journal

step, sig = sys.argv[1], getattr(signal, sys.argv[2])
real_write = Journal.write


def write(self, txn_id, state, **data):
    real_write(self, txn_id, state, **data)
    if state == step:
        os.kill(os.getpid(), sig)


Journal.write = write
from svcard.host.cli.main import main
main(sys.argv[3:], prog_name="svcard")
'''


def svcard(*args: str) -> Result:
    """``svcard ARGS`` in this process (quicker than a new one, the same code path)."""
    return CliRunner().invoke(main, list(args), prog_name="svcard")


def stopped_at(step: str, sig: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", STOP_AT, step, sig, *args],
                          capture_output=True, text=True, timeout=120)


def balance(card: Path) -> int:
    return int(read_image(card)["app"]["ep"]["balance"])


def last_entry(journal: Path) -> dict[str, Any]:
    entries = Journal(journal).entries()
    return list(entries.values())[-1]


# --- Ctrl-C and SIGTERM in svcard pay -------------------------------------------------------
@pytest.mark.parametrize(("step", "sig", "says", "finished", "paid"), [
    ("debited", "SIGINT", "the card was debited and the merchant has not confirmed it yet",
     "completed", True),
    ("confirmed", "SIGTERM", "the card was debited; the merchant may have released the goods",
     "completed", True),
])
def test_an_interrupted_payment_says_its_state_and_resume_finishes_it(
        stack: Stack, tmp_path: Path, step: str, sig: str, says: str, finished: str,
        paid: bool) -> None:
    card = card_image(tmp_path, ep=10_000)
    journal = tmp_path / "journal.jsonl"
    spec = f"virtual:{card}"
    done = stopped_at(step, sig, "pay", stack.checkout_url("ticket", "fig6"), "--card", spec,
                      "--journal", str(journal))
    assert done.returncode == 130, done.stderr
    assert "Aborted" not in done.stderr and "Traceback" not in done.stderr
    entry = last_entry(journal)
    txn = entry["txn_id"]
    assert entry["state"] == step
    what = "terminated (SIGTERM)" if sig == "SIGTERM" else "interrupted"
    assert done.stderr.strip() == (
        f"svcard: {what}: {says}; the payment is journalled as {txn} (step {step}). Finish "
        f"it with: svcard pay --resume --card {spec} --journal {journal}")
    assert stack.merchant_server.db.get(txn)["state"] != "paid"

    resumed = svcard("pay", "--resume", "--card", spec, "--journal", str(journal), "--json")
    assert resumed.exit_code == 0, resumed.output
    report = json.loads(resumed.stdout)
    assert [r["outcome"] for r in report["resumed"]] == [finished]
    assert report["pending"] == []
    assert balance(card) == (8_750 if paid else 10_000)
    assert (stack.merchant_server.db.get(txn)["state"] == "paid") is paid
    assert stack.payment_server.db.counts().get("confirmed", 0) == (1 if paid else 0)
    again = svcard("pay", "--resume", "--card", spec, "--journal", str(journal))
    assert (again.exit_code, again.stdout.strip()) == (0, "nothing to finish for this card")


def test_ctrl_c_from_outside_while_the_card_debits(stack: Stack, tmp_path: Path) -> None:
    """SIGINT sent to the ``svcard`` program itself, while a slow card holds it at the DEBIT."""
    card = card_image(tmp_path, ep=10_000)
    journal = tmp_path / "journal.jsonl"
    proc = subprocess.Popen(
        [SVCARD, "pay", stack.checkout_url("ticket", "fig6"), "--card",
         f"delayed:400:virtual:{card}", "--journal", str(journal)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (journal.exists() and '"debit-sent"' in journal.read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the payment never reached the DEBIT"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "the card may have been debited" in err and "(step debit-sent)" in err
    assert f"svcard pay --resume --card delayed:400:virtual:{card}" in err
    resumed = svcard("pay", "--resume", "--card", f"virtual:{card}", "--journal", str(journal))
    assert resumed.exit_code == 0, resumed.output
    assert "finished" in resumed.stdout
    assert balance(card) in (10_000, 8_750)  # wherever the DEBIT was, the card says
    txn = last_entry(journal)["txn_id"]
    assert not Journal(journal).is_open(txn)
    paid = stack.merchant_server.db.get(txn)["state"] == "paid"
    assert paid == (balance(card) == 8_750)


def test_resume_alone_or_with_a_url(tmp_path: Path) -> None:
    card = card_image(tmp_path, ep=10_000)
    journal = tmp_path / "nothing" / "journal.jsonl"
    done = svcard("pay", "--resume", "--card", f"virtual:{card}", "--journal", str(journal))
    assert (done.exit_code, done.stdout.strip()) == (0, "nothing to finish for this card")
    assert not journal.parent.exists()  # reading the journal creates nothing
    both = svcard("pay", "http://127.0.0.1:1/v1/checkout/x", "--resume", "--card",
                  f"virtual:{card}")
    assert both.exit_code == 2 and "CHECKOUT_URL" in both.stderr
    neither = svcard("pay", "--card", f"virtual:{card}")
    assert neither.exit_code == 2 and "CHECKOUT_URL" in neither.stderr
    load = svcard("load", "http://127.0.0.1:1/v1/load", "--resume", "--card", f"virtual:{card}")
    assert load.exit_code == 2 and "drop BANK_URL" in load.stderr
    load = svcard("load", "--card", f"virtual:{card}", "--minor", "5")
    assert load.exit_code == 2 and "BANK_URL, --account, --secret" in load.stderr
    done = svcard("load", "--resume", "--card", f"virtual:{card}", "--journal", str(journal))
    assert (done.exit_code, done.stdout.strip()) == (0, "nothing to finish for this card")


# --- Ctrl-C in svcard load ------------------------------------------------------------------
@pytest.fixture
def loads(tmp_path: Path) -> Iterator[LoadStack]:
    s = start_load_stack(tmp_path / "load")
    s.account("alice", 20_000, "pw")
    yield s
    s.close()


def account(loads: LoadStack) -> int:
    row = loads.bank_server.db.account("alice")
    assert row is not None
    return int(row["balance"])


@pytest.mark.parametrize(("step", "says", "finished", "loaded"), [
    ("card-loaded", "the card was loaded and the load server has not confirmed it yet",
     "loaded", True),
    ("load-requested", "the bank debited your account; the card was not loaded",
     "not loaded", False),
])
def test_an_interrupted_load_says_its_state_and_resume_finishes_it(
        loads: LoadStack, tmp_path: Path, step: str, says: str, finished: str,
        loaded: bool) -> None:
    card = card_image(tmp_path, ep=0)
    journal = tmp_path / "journal.jsonl"
    spec = f"virtual:{card}"
    done = stopped_at(step, "SIGINT", "load", loads.bank_url, "--card", spec, "--account",
                      "alice", "--secret", "pw", "--minor", "5000", "--journal", str(journal))
    assert done.returncode == 130, done.stderr
    txn = last_entry(journal)["txn_id"]
    assert done.stderr.strip() == (
        f"svcard: interrupted: {says}; the load is journalled as {txn} (step {step}). Finish "
        f"it with: svcard load --resume --card {spec} --journal {journal}")
    assert account(loads) == 15_000  # the bank debited the account before the card loaded

    resumed = svcard("load", "--resume", "--card", spec, "--journal", str(journal), "--json")
    assert resumed.exit_code == 0, resumed.output
    report = json.loads(resumed.stdout)
    assert [(r["txn_id"], r["outcome"]) for r in report["resumed"]] == [(txn, finished)]
    assert report["pending"] == []
    assert balance(card) == (5_000 if loaded else 0)
    assert account(loads) == (15_000 if loaded else 20_000)  # "not loaded": re-credited
    again = svcard("load", "--resume", "--card", spec, "--journal", str(journal))
    assert (again.exit_code, again.stdout.strip()) == (0, "nothing to finish for this card")


# --- busy and unreachable servers -----------------------------------------------------------
class HeldPsam:
    """Another payment (FIG. 5) that holds the pool's only PSAM: its card's DEBIT waits until
    :meth:`release`."""

    def __init__(self, stack: Stack, folder: Path) -> None:
        card = card_image(folder, "holder.json", ep=10_000)
        self.go = threading.Event()
        self.drawn = threading.Event()
        self.error: BaseException | None = None
        self.stack, self.card = stack, card
        self.thread = threading.Thread(target=self._pay, daemon=True)
        self.thread.start()
        assert self.drawn.wait(30), "the holding payment never drew"

    def _pay(self) -> None:
        go, drawn = self.go, self.drawn
        real = VirtualReader.exchange

        def slow_debit(reader: Any, apdu: bytes) -> Any:
            if apdu[:2] == b"\x80\x54":   # DEBIT FOR PURCHASE: the PSAM is held meanwhile
                drawn.set()
                go.wait(60)
            return real(reader, apdu)

        try:
            with httpx.Client(timeout=60) as http, open_reader(f"virtual:{self.card}") as r:
                r.exchange = slow_debit.__get__(r)  # type: ignore[method-assign]
                C.pay(self.stack.checkout_url("ticket", "fig5"), r,
                      journal=Journal(self.card.with_suffix(".journal")), http=http)
        except BaseException as exc:  # reported by release()
            self.error = exc
            drawn.set()

    def release(self) -> None:
        self.go.set()
        self.thread.join(60)
        assert self.error is None, self.error


def test_a_busy_payment_server_is_asked_again_until_it_draws(tmp_path: Path) -> None:
    stack = start_stack(tmp_path / "one", psams=1, acquire_timeout=0.2, hold_timeout=60)
    try:
        held = HeldPsam(stack, tmp_path)
        card = card_image(tmp_path, ep=10_000)
        proc = subprocess.Popen(
            [SVCARD, "pay", stack.checkout_url("ticket", "fig6"), "--card", f"virtual:{card}",
             "--journal", str(tmp_path / "j.jsonl"), "--retry-for", "60", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        busy = [proc.stderr.readline() for _ in range(2)]   # two 503s, each said on stderr
        for line in busy:
            assert "/v1/draw is busy (all PSAMs are busy" in line, busy
            assert "asking again in 1.0 s" in line
        held.release()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert json.loads(out)["payment"]["goods"] == "TICKET-MUSEUM-0042"
        assert balance(card) == 8_750
    finally:
        stack.close()


def test_a_payment_server_busy_past_the_deadline_is_exit_11(tmp_path: Path) -> None:
    stack = start_stack(tmp_path / "one", psams=1, acquire_timeout=0.2, hold_timeout=60)
    try:
        held = HeldPsam(stack, tmp_path)
        card = card_image(tmp_path, ep=10_000)
        journal = tmp_path / "j.jsonl"
        spec = f"virtual:{card}"
        start = time.monotonic()
        done = svcard("pay", stack.checkout_url("ticket", "fig6"), "--card", spec, "--journal",
                      str(journal), "--retry-for", "2")
        took = time.monotonic() - start
        assert done.exit_code == 11, done.output
        last = done.stderr.strip().splitlines()[-1]
        txn = last_entry(journal)["txn_id"]
        assert last.startswith(f"svcard: the payment server at {stack.payment.url}/v1/draw is "
                               f"busy after 2 s: all PSAMs are busy"), last
        assert last.endswith(
            f"; the card was not debited; the payment is journalled as {txn} (step draw). "
            f"Finish it with: svcard pay --resume --card {spec} --journal {journal}"), last
        assert 2 <= took < 30
        held.release()
        resumed = svcard("pay", "--resume", "--card", spec, "--journal", str(journal))
        assert resumed.exit_code == 0, resumed.output
        assert resumed.stdout.strip() == f"finished {txn}: abandoned: never debited"
        assert balance(card) == 10_000
    finally:
        stack.close()


def test_a_server_that_cannot_be_reached_is_exit_11_with_its_url(tmp_path: Path) -> None:
    card = card_image(tmp_path, ep=10_000)
    url = f"http://127.0.0.1:{free_port()}/v1/checkout/ticket"
    done = svcard("pay", url, "--card", f"virtual:{card}", "--journal", str(tmp_path / "j"))
    assert done.exit_code == 11, done.output
    assert done.stderr.startswith(f"svcard: {url}") and "cannot be reached" in done.stderr
    bank = f"http://127.0.0.1:{free_port()}/v1/load"
    done = svcard("load", bank, "--card", f"virtual:{card}", "--account", "a", "--secret", "s",
                  "--minor", "5", "--journal", str(tmp_path / "j"))
    assert done.exit_code == 11 and done.stderr.startswith(f"svcard: {bank}"), done.output


class FakeBusyServer:
    """A stand-in HTTP server answering 503 (Retry-After 0) ``busy`` times, then 200, and
    counting requests. A fake because no svcard server can be made to answer a chosen status a
    chosen number of times; the retry rules (only marked requests, only 503, never a 4xx,
    a deadline) are the transport's and need no protocol."""

    def __init__(self) -> None:
        self.busy, self.status, self.hits = 0, 503, 0

        async def answer(request: Request) -> Response:
            self.hits += 1
            if self.hits <= self.busy:
                return JSONResponse({"reason": "busy, try again"}, status_code=self.status,
                                    headers={"Retry-After": "0"})
            return JSONResponse({"ok": True})

        self.server = ServerThread(Starlette(routes=[Route("/x", answer, methods=["POST"])]))

    def __enter__(self) -> FakeBusyServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    def ask(self, busy: int, status: int = 503, retry_for: float = 30, marked: bool = True,
            ) -> httpx.Response:
        self.busy, self.status, self.hits = busy, status, 0
        with httpx.Client(transport=retrying_transport(retry_for), timeout=10) as http:
            return http.post(f"{self.server.url}/x", content=b"same body",
                             extensions=RETRY_SAFE if marked else None)


def test_the_retry_rules() -> None:
    with FakeBusyServer() as fake:
        assert (fake.ask(2).status_code, fake.hits) == (200, 3)           # 503 twice, then OK
        assert (fake.ask(2, marked=False).status_code, fake.hits) == (503, 1)   # not marked
        assert (fake.ask(2, status=429).status_code, fake.hits) == (429, 1)     # never a 4xx
        assert (fake.ask(2, status=409).status_code, fake.hits) == (409, 1)
        assert (fake.ask(2, retry_for=0).status_code, fake.hits) == (503, 1)    # --retry-for 0
        start = time.monotonic()
        last = fake.ask(10**9, retry_for=0.5)                               # always busy
        assert last.status_code == 503 and last.json() == {"reason": "busy, try again"}
        assert 0.5 <= time.monotonic() - start < 5 and fake.hits > 1


def test_retry_after_0_still_waits_a_quarter_second_between_tries() -> None:
    with FakeBusyServer() as fake:   # it answers Retry-After: 0
        start = time.monotonic()
        assert (fake.ask(3).status_code, fake.hits) == (200, 4)
        took = time.monotonic() - start
        assert took >= 3 * 0.25, f"3 retries in {took:.3f} s: Retry-After: 0 spins"
        start = time.monotonic()                      # always busy, 1 s: a few tries, no spin
        fake.ask(10**9, retry_for=1.0)
        assert fake.hits <= 1 + 1.0 / 0.25 + 1, fake.hits


def test_retry_after_forms() -> None:
    def with_header(value: str) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": value})

    assert retry_after(with_header("3")) == 3
    assert retry_after(httpx.Response(503)) is None
    assert retry_after(with_header("soon")) is None
    assert retry_after(with_header("Wed, 21 Oct 2015 07:28:00 GMT")) == 0  # in the past
    later = time.time() + 120
    from email.utils import formatdate
    assert 100 < (retry_after(with_header(formatdate(later, usegmt=True))) or 0) <= 120


def test_sigterm_handler_is_restored(tmp_path: Path) -> None:
    """The SIGTERM handler is the command's only while it runs (in-process callers keep
    theirs)."""
    before = signal.getsignal(signal.SIGTERM)
    card = card_image(tmp_path, ep=10_000)
    result = svcard("pay", "--resume", "--card", f"virtual:{card}", "--journal",
                    str(tmp_path / "j"))
    assert result.exit_code == 0, result.output
    assert signal.getsignal(signal.SIGTERM) is before


# --- a failure after the card's debit is not a refusal ------------------------------------
def test_a_merchant_error_after_the_debit_is_exit_11_with_resume(stack: Stack,
                                                                  tmp_path: Path) -> None:
    card = card_image(tmp_path, ep=10_000)
    journal = tmp_path / "journal.jsonl"
    spec = f"virtual:{card}"
    with merchant_behind_fake(stack) as fake:
        fake.failures = 1_000
        done = svcard("pay", stack.checkout_url("ticket", "fig6"), "--card", spec,
                      "--journal", str(journal))
        assert done.exit_code == 11, done.output
        txn = last_entry(journal)["txn_id"]
        assert done.stderr.strip() == (
            f"svcard: the merchant at {stack.merchant.url}/v1/status/{txn} failed (500: "
            f"internal) after the card's step: the card was debited; the merchant may have "
            f"released the goods; the payment is journalled as {txn} (step confirmed). Finish "
            f"it with: svcard pay --resume --card {spec} --journal {journal}")
        assert balance(card) == 8_750 and Journal(journal).is_open(txn)
        assert stack.merchant_server.orders[bytes.fromhex(txn)].state != "paid"

        still = svcard("pay", "--resume", "--card", spec, "--journal", str(journal))
        assert still.exit_code == 1 and f"still pending {txn}" in still.stdout, still.output
        fake.failures = 0
        resumed = svcard("pay", "--resume", "--card", spec, "--journal", str(journal))
        assert resumed.exit_code == 0, resumed.output
        assert resumed.stdout.strip() == f"finished {txn}: completed, goods: TICKET-MUSEUM-0042"
        assert stack.merchant_server.orders[bytes.fromhex(txn)].state == "paid"
        assert balance(card) == 8_750


def test_a_refusal_before_the_debit_stays_exit_1(stack: Stack, tmp_path: Path) -> None:
    poor = card_image(tmp_path, "poor.json", ep=1_000)
    done = svcard("pay", stack.checkout_url("ticket", "fig6"), "--card", f"virtual:{poor}",
                  "--journal", str(tmp_path / "j.jsonl"))
    assert done.exit_code == 1, done.output
    assert "--resume" not in done.stderr and "debited" not in done.stderr
    card = card_image(tmp_path, ep=10_000)           # a merchant's 4xx before the debit
    done = svcard("pay", stack.checkout_url("no-such-item", "fig6"), "--card",
                  f"virtual:{card}", "--journal", str(tmp_path / "j.jsonl"))
    assert done.exit_code == 1 and done.stderr.startswith("svcard: merchant refused (4"), \
        done.output
    assert "--resume" not in done.stderr and balance(card) == 10_000
