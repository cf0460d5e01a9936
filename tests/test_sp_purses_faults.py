"""The purse pool after interruptions: a payment cut off after the card's debit is finished
from the purse's journal before that purse pays again; a lease left by a dead process is
taken back; the same order asked again is settled, never paid twice."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
import test_sp_purses as base
from sqlalchemy import Engine, update
from test_sp_purses import (
    TICKET,
    image_app,
    merchant_paid,
    pool_config,
    purse_image,
)

from svcard.host.demo.system import System
from svcard.host.sp.purses import db as PDB
from svcard.host.sp.purses.pool import PaymentInDoubt, PursePool, PursePoolError

engine, sp_system = base.engine, base.sp_system   # the fixtures


class CutAfterDebit(httpx.BaseTransport):
    """Loopback HTTP, except that the first ``cut`` confirmations to the merchant (after the
    card was debited) never leave: the connection fails, as if the network went."""

    def __init__(self, cut: int = 1_000_000) -> None:
        self.inner = httpx.HTTPTransport()
        self.cut = cut

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.cut and "/v1/status/" in request.url.path:
            self.cut -= 1
            raise httpx.ConnectError("cut for the test", request=request)
        return self.inner.handle_request(request)


class AnswerLost(CutAfterDebit):
    """The first confirmation reaches the merchant, which releases the goods; its answer is
    lost on the way back."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.cut and "/v1/status/" in request.url.path:
            self.cut -= 1
            self.inner.handle_request(request).read()
            raise httpx.ReadError("answer lost for the test", request=request)
        return self.inner.handle_request(request)


def journal_lines(folder: Path, serial: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (folder / f"{serial}.jsonl").read_text().splitlines()]


def test_an_interrupted_payment_is_resumed_before_the_purse_pays_again(
        sp_system: System, engine: Engine, tmp_path: Path) -> None:
    spec = purse_image(tmp_path, 1, ep=50_000)
    serial = f"{7_700_001:020d}"
    pool = PursePool.open(pool_config(sp_system, [spec]), engine, journal_dir=tmp_path / "j")
    url = sp_system.pay.checkout_url("ticket")
    transport = CutAfterDebit()
    with httpx.Client(timeout=30, transport=transport) as cut:
        with pytest.raises(PaymentInDoubt, match="cut off"):
            pool.pay(url, http=cut, order_ref="first")
        [row] = pool.book.all_payments()
        assert (row["state"], row["amount"]) == ("debited", TICKET)   # the card paid
        assert image_app(spec)["ep"]["balance"] == 50_000 - TICKET
        assert merchant_paid(sp_system) == []                       # the merchant not yet
        transport.cut = 0                                            # the network is back
        second = pool.pay(url, http=cut, order_ref="second")
    rows = {r["order_ref"]: r for r in pool.book.all_payments()}
    assert rows["first"]["state"] == rows["second"]["state"] == "paid"
    assert second.counter == rows["first"]["counter"] + 1
    assert len(merchant_paid(sp_system)) == 2
    assert image_app(spec)["ep"]["balance"] == 50_000 - 2 * TICKET
    # the first payment was finished before the second one's draw
    steps = [(line["txn_id"], line["state"]) for line in journal_lines(tmp_path / "j", serial)]
    first_done = steps.index((rows["first"]["txn_id"], "done"))
    second_draw = steps.index((rows["second"]["txn_id"], "draw"))
    assert first_done < second_draw
    books = pool.books()[156]
    assert books["debits"] == 2 * TICKET and books["balances"] == 50_000 - 2 * TICKET
    # the first order asked again: its outcome, no third payment
    again = pool.pay(url, http=httpx.Client(timeout=30), order_ref="first")
    assert again.resumed and again.txn_id == rows["first"]["txn_id"]
    assert image_app(spec)["ep"]["balance"] == 50_000 - 2 * TICKET


def test_the_interrupted_order_asked_again_is_settled_not_paid_twice(
        sp_system: System, engine: Engine, tmp_path: Path, http: httpx.Client) -> None:
    spec = purse_image(tmp_path, 1, ep=50_000)
    pool = PursePool.open(pool_config(sp_system, [spec]), engine, journal_dir=tmp_path / "j")
    url = sp_system.pay.checkout_url("ticket")
    with httpx.Client(timeout=30, transport=CutAfterDebit()) as cut, \
            pytest.raises(PaymentInDoubt):
        pool.pay(url, http=cut, order_ref="o1")
    outcome = pool.pay(url, http=http, order_ref="o1")
    assert outcome.resumed and outcome.amount == TICKET
    assert [r["state"] for r in pool.book.all_payments()] == ["paid"]
    assert len(merchant_paid(sp_system)) == 1
    assert image_app(spec)["ep"]["balance"] == 50_000 - TICKET


def test_a_dead_process_lease_is_taken_back_and_its_payment_resumed(
        sp_system: System, engine: Engine, tmp_path: Path, http: httpx.Client) -> None:
    """A first SP process is cut off mid-payment and dies holding the purse's lease; a second
    one, started on the same database and journal folder, resumes it at open and pays on."""
    spec = purse_image(tmp_path, 1, ep=50_000)
    config = pool_config(sp_system, [spec], lease_ttl=3600.0, lease_timeout=5.0)
    first = PursePool.open(config, engine, journal_dir=tmp_path / "j")
    url = sp_system.pay.checkout_url("ticket")
    with httpx.Client(timeout=30, transport=CutAfterDebit()) as cut, \
            pytest.raises(PaymentInDoubt):
        first.pay(url, http=cut, order_ref="o1")
    dead = subprocess.Popen(["true"])
    dead.wait()
    with engine.begin() as conn:   # as the dead process left it: leased for an hour
        conn.execute(update(PDB.purses).values(
            lease_owner=f"{socket.gethostname()[:60]}:{dead.pid}:0000",
            leased_until=2**62))
    assert [p["state"] for p in first.status()] == ["leased"]
    second = PursePool.open(config, engine, journal_dir=tmp_path / "j", http=http)
    assert [r["state"] for r in second.book.all_payments()] == ["paid"]
    assert second.pay(url, http=http, order_ref="o2").purse_serial == f"{7_700_001:020d}"
    assert len(merchant_paid(sp_system)) == 2


def test_a_purse_whose_journal_is_elsewhere_is_not_used(
        sp_system: System, engine: Engine, tmp_path: Path, http: httpx.Client) -> None:
    """An open payment the database knows of but this process's journal folder does not:
    the purse is not used (its interrupted payment cannot be resumed from here)."""
    spec = purse_image(tmp_path, 1, ep=50_000)
    config = pool_config(sp_system, [spec], lease_timeout=2.0)
    pool = PursePool.open(config, engine, journal_dir=tmp_path / "j")
    url = sp_system.pay.checkout_url("ticket")
    with httpx.Client(timeout=30, transport=CutAfterDebit()) as cut, \
            pytest.raises(PaymentInDoubt):
        pool.pay(url, http=cut, order_ref="o1")
    other = PursePool.open(config, engine, journal_dir=tmp_path / "elsewhere")
    with pytest.raises(PursePoolError, match="nothing was paid"):
        other.pay(url, http=http, order_ref="o2")
    assert image_app(spec)["ep"]["balance"] == 50_000 - TICKET
    assert len(merchant_paid(sp_system)) == 0


def test_a_payment_cut_once_is_finished_at_once(sp_system: System, engine: Engine,
                                                tmp_path: Path) -> None:
    """The confirmation lost once: the pool resumes the purse's journal while it still holds
    the purse, and the order comes back paid (once)."""
    spec = purse_image(tmp_path, 1, ep=50_000)
    pool = PursePool.open(pool_config(sp_system, [spec]), engine, journal_dir=tmp_path / "j")
    with httpx.Client(timeout=30, transport=CutAfterDebit(cut=1)) as cut:
        outcome = pool.pay(sp_system.pay.checkout_url("ticket"), http=cut, order_ref="o1")
    assert outcome.resumed and outcome.amount == TICKET and len(outcome.tac) == 8
    assert outcome.balance_after == 50_000 - TICKET == image_app(spec)["ep"]["balance"]
    assert [r["state"] for r in pool.book.all_payments()] == ["paid"]
    assert len(merchant_paid(sp_system)) == 1
    assert [p["offline_counter"] for p in pool.status()] == [1]


def test_a_merchant_unreachable_before_the_draw_is_nothing_paid(
        sp_system: System, engine: Engine, tmp_path: Path, http: httpx.Client) -> None:
    spec = purse_image(tmp_path, 1, ep=50_000)
    pool = PursePool.open(pool_config(sp_system, [spec]), engine, journal_dir=tmp_path / "j")
    with pytest.raises(PursePoolError, match="nothing was paid"):
        pool.pay("http://127.0.0.1:9/v1/checkout/ticket", http=http, order_ref="o1")
    assert [r["state"] for r in pool.book.all_payments()] == ["failed"]
    assert image_app(spec)["ep"]["balance"] == 50_000
    # the same order, the merchant back: paid once
    assert pool.pay(sp_system.pay.checkout_url("ticket"), http=http,
                    order_ref="o1").amount == TICKET


def test_a_confirmation_whose_answer_was_lost_is_paid_once(sp_system: System, engine: Engine,
                                                           tmp_path: Path) -> None:
    """The merchant released the goods and its answer was lost: the resume's confirmation is
    answered 409 (released before), which the pool books as paid, not disputed."""
    spec = purse_image(tmp_path, 1, ep=50_000)
    pool = PursePool.open(pool_config(sp_system, [spec]), engine, journal_dir=tmp_path / "j")
    with httpx.Client(timeout=30, transport=AnswerLost(cut=1)) as lossy:
        outcome = pool.pay(sp_system.pay.checkout_url("ticket"), http=lossy, order_ref="o1")
    assert outcome.resumed and outcome.amount == TICKET
    [row] = pool.book.all_payments()
    assert row["state"] == "paid" and len(row["tac"]) == 8
    assert len(merchant_paid(sp_system)) == 1
    assert image_app(spec)["ep"]["balance"] == 50_000 - TICKET
    assert pool.books()[156]["debits"] == TICKET


def test_died_after_the_payment_before_the_books_replays_the_journal(
        sp_system: System, engine: Engine, tmp_path: Path, http: httpx.Client,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The payment finished (journal 'done') and the process died before giving the purse back
    (the books still say 'debited', the lease still held): after the lease expires, the same
    order asked again is booked paid from the journal, with no second payment."""
    spec = purse_image(tmp_path, 1, ep=50_000)
    config = pool_config(sp_system, [spec], lease_ttl=0.5, lease_timeout=10.0)
    first = PursePool.open(config, engine, journal_dir=tmp_path / "j")

    def die(*args: object, **kwargs: object) -> bool:
        raise SystemExit("died before the books")
    monkeypatch.setattr(first.book, "release", die)
    with pytest.raises(SystemExit):
        first.pay(sp_system.pay.checkout_url("ticket"), http=http, order_ref="o1")
    assert [r["state"] for r in first.book.all_payments()] == ["debited"]
    second = PursePool.open(config, engine, journal_dir=tmp_path / "j")
    outcome = second.pay(sp_system.pay.checkout_url("ticket"), http=http, order_ref="o1")
    assert outcome.resumed and outcome.amount == TICKET
    assert [r["state"] for r in second.book.all_payments()] == ["paid"]
    assert len(merchant_paid(sp_system)) == 1
    assert image_app(spec)["ep"]["balance"] == 50_000 - TICKET
    [status] = second.status()   # the purse's row read again from the card
    assert (status["balance"], status["offline_counter"]) == (50_000 - TICKET, 1)
    books = second.books()[156]
    assert books["opening"] + books["loaded"] == books["debits"] + books["balances"]
