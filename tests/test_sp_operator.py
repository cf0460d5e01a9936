"""``svcard sp order settle ORDER_REF``: the operator decides an order the SP left ``in_doubt``
from evidence (the pool's record, the purse's journal, the payment server's record with the
card's TAC), never a guess; evidence missing, forged or conflicting: nothing changes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, insert

from svcard.host.cli.main import main
from svcard.host.pay.server import db as PAYDB
from svcard.host.sp import db as D
from svcard.host.sp import records
from svcard.host.sp.config import Item
from svcard.host.sp.customers import add_customer
from svcard.host.sp.operator import NotDecided, settle_order
from svcard.host.sp.purses import db as PDB
from svcard.host.sp.server import orders as O
from svcard.host.sp.server.payment import record_in_doubt
from svcard.host.sp.signing import new_key
from svcard.host.terminal.journal import Journal

SONG = Item("MERCH001", "song", "One song", retail=120, max_wholesale=120, fee=5,
            pass_on_percent=50, checkout_url="http://127.0.0.1:1/v1/checkout/song")
SERIAL = "00000000000009000001"
TXN = "ab" * 16
TAC = "1a2b3c4d"


class Books:
    def __init__(self, tmp_path: Path) -> None:
        self.url = f"sqlite:///{tmp_path / 'sp.db'}"
        self.engine: Engine = D.make_engine(self.url)
        self.book = PDB.PurseBook(self.engine)
        self.journals = tmp_path / "journals"
        self.journals.mkdir()
        self.pay_url = f"sqlite:///{tmp_path / 'pay.db'}"
        add_customer(self.engine, "carol", new_key()[1], 100_000, 156)
        self.book.register(SERIAL, "virtual:none", currency_code=156, balance=1_000,
                           limit=100_000, offline_counter=3, online_counter=1)
        admitted = O.admit(self.engine, O.OrderRequest("carol", "MERCH001", "song", "01" * 16,
                                                       1_790_000_000),
                           SONG, "d", 156, 1_790_000_000_000)
        self.ref = admitted.order_ref
        assert record_in_doubt(self.engine, self.ref, "merchant unreachable", 5)

    def pool_row(self, state: str, **values: Any) -> None:
        self.book.start_payment(self.ref, SERIAL, 156)
        if state != "started":
            self.book.payment_step(order=self.ref, state=state, **{
                "txn_id": TXN, "counter": 3, "amount": 99, "tac": TAC, **values})

    def journal(self, *states: str) -> None:
        j = Journal(self.journals / f"{SERIAL}.jsonl")
        for state in states:
            extra: dict[str, Any] = {"draw": {"card_serial": SERIAL, "counter": 3,
                                              "params": {"amount": 99}},
                                     "debited": {"tac": TAC},
                                     "done": {"goods": "SONG-42", "item": "One song",
                                              "receipt": {"amount": 99}}}.get(state, {})
            j.write(TXN, state, **extra)

    def payment_server(self, state: str, *, tac: str = TAC, counter: int = 3,
                       amount: int = 99, txn: str = TXN) -> None:
        engine = PAYDB.make_engine(self.pay_url)
        with engine.begin() as conn:
            conn.execute(insert(PAYDB.payments).values(
                merchant_id="MERCH001", txn_id=txn, variant=6, state=state, reason="",
                amount=amount, currency_code=156, card_serial=SERIAL, card_counter=counter,
                tac=tac if state == "confirmed" else None, draw_digest="0" * 64,
                proof_handed=0, created=1, updated=1))
        engine.dispose()

    def settle(self, **kw: Any) -> Any:
        return settle_order(self.engine, self.ref, **kw)

    def order(self) -> dict[str, Any]:
        [row] = [o for o in records.orders(self.url) if o["order_ref"] == self.ref]
        return row

    def reserved(self) -> int:
        [c] = records.customers(self.url)
        return int(c["reserved"])


@pytest.fixture
def books(tmp_path: Path) -> Books:
    return Books(tmp_path)


def test_no_claim_in_the_pool_fails_it_and_closes_the_claim(books: Books) -> None:
    assert books.reserved() == 125
    decision = books.settle()
    assert decision.state == "failed" and "never claimed" in decision.evidence
    assert books.order()["state"] == "failed" and books.reserved() == 0
    assert books.book.payment(books.ref)["state"] == "void"     # no pool pays it later
    events = [e["event"] for e in records.order_log(books.url, books.ref)]
    assert events[-2:] == ["failed", "operator"]
    with pytest.raises(NotDecided, match="is failed, not in_doubt"):
        books.settle()                                         # settled once


def test_a_paid_record_bills_it_and_relays_the_goods(books: Books) -> None:
    books.pool_row("paid", outcome=json.dumps({"goods": "SONG-42", "item": "One song"}))
    decision = books.settle()
    assert decision.state == "billed" and decision.goods == "SONG-42"
    assert decision.line is not None and decision.line["wholesale"] == 99
    assert decision.line["billed"] == 120 + 5 - 10
    order = books.order()
    assert order["state"] == "billed" and order["goods"] == "SONG-42"
    [c] = records.customers(books.url)
    assert (c["reserved"], c["open_total"]) == (0, 115)


def test_started_is_not_decided(books: Books) -> None:
    books.pool_row("started")
    with pytest.raises(NotDecided, match="may be about to draw"):
        books.settle()
    assert books.order()["state"] == "in_doubt"


def test_the_journal_decides_an_open_record(books: Books) -> None:
    books.pool_row("debited")
    with pytest.raises(NotDecided, match="evidence missing: give the purses' journal"):
        books.settle()
    with pytest.raises(NotDecided, match="no journal"):
        books.settle(journal_dir=books.journals)
    books.journal("draw", "debited")
    with pytest.raises(NotDecided, match="open in the purse's journal at step debited"):
        books.settle(journal_dir=books.journals)
    assert books.order()["state"] == "in_doubt" and books.reserved() == 125
    books.journal("done")
    decision = books.settle(journal_dir=books.journals)
    assert decision.state == "billed" and decision.goods == "SONG-42"
    assert "closed transaction" in decision.steps[0]


def test_a_journal_line_of_another_card_is_not_evidence(books: Books) -> None:
    books.pool_row("debited")
    j = Journal(books.journals / f"{SERIAL}.jsonl")
    j.write(TXN, "draw", card_serial="00000000000009999999", counter=3, params={"amount": 99})
    j.write(TXN, "done", goods="FORGED")
    with pytest.raises(NotDecided, match="not this purse's"):
        books.settle(journal_dir=books.journals)
    assert books.order()["state"] == "in_doubt"
    assert books.book.payment(books.ref)["state"] == "debited"


def test_the_payment_servers_confirmation_with_the_cards_tac_pays_it(books: Books) -> None:
    books.pool_row("disputed")
    with pytest.raises(NotDecided, match="--payment-db"):
        books.settle()
    books.payment_server("confirmed")
    decision = books.settle(payment_dbs=(books.pay_url,))
    assert decision.state == "billed" and "card's TAC" in decision.evidence
    assert books.book.payment(books.ref)["state"] == "paid"


@pytest.mark.parametrize(("forged", "why"), [
    ({"tac": "00000000"}, "not the card's TAC"),                # a forged "paid"
    ({"counter": 4}, "another payment"),                        # aimed at another debit
    ({"amount": 9}, "another payment"),
    ({"txn": "cd" * 16}, "no payment server record"),
])
def test_forged_or_foreign_paid_evidence_is_refused(books: Books, forged: dict[str, Any],
                                                    why: str) -> None:
    books.pool_row("disputed")
    books.payment_server("confirmed", **forged)
    log_before = records.order_log(books.url, books.ref)
    with pytest.raises(NotDecided, match=why):
        books.settle(payment_dbs=(books.pay_url,))
    assert books.order()["state"] == "in_doubt" and books.reserved() == 125
    assert books.book.payment(books.ref)["state"] == "disputed"
    assert records.order_log(books.url, books.ref) == log_before


def test_a_payment_server_not_final_is_not_decided(books: Books) -> None:
    books.pool_row("disputed")
    books.payment_server("debited")
    with pytest.raises(NotDecided, match="not final"):
        books.settle(payment_dbs=(books.pay_url,))


def test_the_merchant_not_paid_fails_it_and_keeps_the_dispute(books: Books) -> None:
    books.pool_row("disputed")
    books.payment_server("failed")
    decision = books.settle(payment_dbs=(books.pay_url,))
    assert decision.state == "failed" and books.reserved() == 0
    assert books.book.payment(books.ref)["state"] == "disputed"   # the card's debit, for a person


def run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), prog_name="svcard")


def test_the_command(books: Books) -> None:
    books.pool_row("disputed")
    refused = run("sp", "order", "settle", books.ref, "--db", books.url)
    assert refused.exit_code == 1
    assert refused.output.count("\n") == 1 and "not decided:" in refused.output
    books.payment_server("confirmed")
    done = run("sp", "order", "settle", books.ref, "--db", books.url, "--payment-db",
               books.pay_url, "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["state"] == "billed"
    again = run("sp", "order", "settle", books.ref, "--db", books.url)
    assert again.exit_code == 1 and "is billed, not in_doubt" in again.output
    assert "ORDER_REF" in run("sp", "order", "settle", "--help").output
    assert "sp order settle" in run("sp", "order", "--help").output
    assert run("sp", "order", "settle", "x", "--db",
               f"sqlite:///{books.journals / 'none.db'}").exit_code == 3


def test_the_command_takes_the_sps_configuration(books: Books) -> None:
    from svcard.fixtures import fixture_path

    done = run("sp", "order", "settle", books.ref, "--db", books.url, "--config",
               str(fixture_path("sp-demo.toml")), "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["state"] == "failed"
    bad = run("sp", "order", "settle", books.ref, "--db", books.url, "--config",
              str(books.journals))
    assert bad.exit_code == 2       # a folder is not a configuration file


def test_the_purses_command_lists_the_pool(books: Books) -> None:
    listed = run("sp", "purses", "--db", books.url, "--json")
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.output)
    assert (row["serial"], row["state"], row["balance"]) == (SERIAL, "ready", 1_000)
    assert "lease_owner" not in row
    text = run("sp", "purses", "--db", books.url)
    assert SERIAL in text.output and "counters 3/1" in text.output
