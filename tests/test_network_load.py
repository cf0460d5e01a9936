"""Loading over the network (seed FIG. 17-18): bank server, load server with an HSM, client.
All over real HTTP on loopback with SQLite; every refusal leaves account and card as they were,
and a bank debit ends either confirmed (card loaded) or refunded (card not loaded)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from loadraw import SECRET, Raw
from netfaults import CutOff

from svcard.card.storage import read_image
from svcard.host.demo.system import card_image
from svcard.host.load import client as LC
from svcard.host.load.stack import LoadStack, start_load_stack
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.online import PaymentRefused
from svcard.host.terminal.purse import TerminalCheckFailed
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import loadmsg as L
from svcard.protocols import secure
from svcard.reader import Reader, VirtualReader


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LoadStack]:
    s = start_load_stack(tmp_path / "stack")
    s.account("alice", 50_000, SECRET)
    yield s
    s.close()


@pytest.fixture
def card(tmp_path: Path) -> Path:
    return card_image(tmp_path, ep=1_000)


def balance(card: Path) -> int:
    return int(read_image(card)["app"]["ep"]["balance"])


def account(stack: LoadStack) -> int:
    row = stack.bank_server.db.account("alice")
    assert row is not None
    return int(row["balance"])


def do_load(stack: LoadStack, card: Path, http: httpx.Client, journal: Journal,
            amount: int = 5_000, **kwargs: Any) -> LC.LoadOutcome:
    with open_reader(f"virtual:{card}") as reader:
        return LC.load(stack.bank_url, reader, account="alice", secret=SECRET, amount=amount,
                       journal=journal, http=http, **kwargs)


def test_load_success(stack: LoadStack, card: Path, http: httpx.Client, tmp_path: Path) -> None:
    out = do_load(stack, card, http, Journal(tmp_path / "j.jsonl"))
    assert (out.outcome, out.balance_before, out.balance_after) == ("loaded", 1_000, 6_000)
    assert out.round_trips == 5  # bank page, bank start, load request, load result, bank status
    assert balance(card) == 6_000 and account(stack) == 45_000
    assert stack.bank_server.db.totals() == {"confirmed": 5_000, "accounts": 45_000}
    (row,) = stack.load_server.db.rows()
    assert row["state"] == "loaded" and row["s3"] and row["online_counter"] == 0
    assert read_image(card)["app"]["ep"]["online_counter"] == 1


def test_insufficient_account_funds(stack: LoadStack, card: Path, http: httpx.Client,
                                    tmp_path: Path) -> None:
    with pytest.raises(PaymentRefused, match="insufficient funds"):
        do_load(stack, card, http, Journal(tmp_path / "j.jsonl"), amount=60_000)
    assert account(stack) == 50_000 and balance(card) == 1_000
    assert stack.load_server.db.rows() == []


def test_load_past_the_balance_limit_is_refused_by_the_bank(stack: LoadStack, card: Path,
                                                            http: httpx.Client,
                                                            tmp_path: Path) -> None:
    limit = int(read_image(card)["app"]["balance_limit"])
    with pytest.raises(PaymentRefused, match=f"at most {limit - 1_000}"):
        do_load(stack, card, http, Journal(tmp_path / "j.jsonl"), amount=limit)
    assert account(stack) == 50_000 and balance(card) == 1_000


def test_a_client_lying_about_the_limit_is_refunded(stack: LoadStack, card: Path,
                                                    http: httpx.Client, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The bank believes a bigger limit; the card itself refuses, so the bank re-credits."""
    limit = int(read_image(card)["app"]["balance_limit"])
    monkeypatch.setattr(LC, "read_balance_limit", lambda reader: limit * 2)
    stack.bank_server.db.fund("alice", limit)
    out = do_load(stack, card, http, Journal(tmp_path / "j.jsonl"), amount=limit)
    assert out.outcome == "not loaded" and "no S2" in out.reason
    assert out.bank["refunded"] == limit
    assert account(stack) == 50_000 + limit and balance(card) == 1_000
    assert stack.bank_server.db.totals()["refunded"] == limit


def test_expired_card_is_refused_before_the_bank_is_asked(stack: LoadStack, card: Path,
                                                          http: httpx.Client,
                                                          tmp_path: Path) -> None:
    with pytest.raises(TerminalCheckFailed, match="expired"):
        do_load(stack, card, http, Journal(tmp_path / "j.jsonl"),
                when=dt.datetime(2099, 1, 1))
    assert account(stack) == 50_000


def raw(stack: LoadStack, reader: Reader, http: httpx.Client, amount: int = 5_000) -> Raw:
    return Raw(stack, reader, http, amount)


def row_of(stack: LoadStack, r: Raw) -> dict[str, Any]:
    row = stack.load_server.db.get(r.s.bank_id.hex(), r.txn_hex)
    assert row is not None
    return row


def test_tampered_s1_is_refused_and_refunded(stack: LoadStack, card: Path,
                                             http: httpx.Client) -> None:
    with open_reader(f"virtual:{card}") as reader:
        r = raw(stack, reader, http)
        init = r.init()
        with pytest.raises(PaymentRefused, match="S1 does not verify"):
            r.send_request(r.request(init, s1=bytes(a ^ 1 for a in init.mac1)))
        with pytest.raises(PaymentRefused, match="replayed load request"):  # one try per order
            r.send_request(r.request(init))
        answer = r.result(L.RESULT_NOT_LOADED, zero=r.init(0))  # no S2: decided at once
        assert answer.outcome == L.OUTCOME_NOT_LOADED
        assert row_of(stack, r)["evidence"] == "no-s2"
        assert r.to_bank(answer.confirmation).json()["refunded"] == 5_000
        r2 = raw(stack, reader, http)  # S1 binds every field it covers: here the balance
        init = r2.init()
        with pytest.raises(PaymentRefused, match="S1 does not verify"):
            r2.send_request(r2.request(init, balance=init.balance + 1))
        answer = r2.result(L.RESULT_NOT_LOADED, zero=r2.init(0))
        assert r2.to_bank(answer.confirmation).json()["refunded"] == 5_000
    assert account(stack) == 50_000 and balance(card) == 1_000


def test_amount_changed_in_transit_is_refused(stack: LoadStack, card: Path,
                                              http: httpx.Client) -> None:
    with open_reader(f"virtual:{card}") as reader:
        r = raw(stack, reader, http, amount=100)
        r.amount = 9_000  # the client asks the card (and the load server) for more
        with pytest.raises(PaymentRefused, match="changed in transit"):
            r.send_request(r.request(r.init()))
    assert balance(card) == 1_000


def test_tampered_s2_is_refused_by_the_card_and_refunded(stack: LoadStack, card: Path,
                                                         http: httpx.Client) -> None:
    with open_reader(f"virtual:{card}") as reader:
        r = raw(stack, reader, http)
        command = r.send_request(r.request(r.init()))
        assert r.credit(command, s2=bytes(4)).sw == 0x9302
        answer = r.not_loaded()  # the zero-value probe, done on the card at counter 0
        assert answer.outcome == L.OUTCOME_NOT_LOADED and "probe" in answer.reason
        assert row_of(stack, r)["evidence"] == "probe"
        assert r.to_bank(answer.confirmation).json()["outcome"] == "not loaded"
    assert account(stack) == 50_000 and balance(card) == 1_000
    assert read_image(card)["app"]["ep"]["online_counter"] == 1  # the probe used counter 0


def test_tampered_s3_is_refused_then_the_true_s3_loads(stack: LoadStack, card: Path,
                                                       http: httpx.Client) -> None:
    with open_reader(f"virtual:{card}") as reader:
        r = raw(stack, reader, http)
        command = r.send_request(r.request(r.init()))
        s3 = r.credit(command).data
        with pytest.raises(PaymentRefused, match="S3 does not verify"):
            r.result(L.RESULT_LOADED, s3=bytes(a ^ 0x80 for a in s3))
        answer = r.result(L.RESULT_LOADED, s3=s3)
        assert answer.outcome == L.OUTCOME_LOADED
        assert r.to_bank(answer.confirmation).json()["outcome"] == "loaded"
    assert balance(card) == 6_000 and account(stack) == 45_000


def test_replayed_requests_results_and_s1(stack: LoadStack, card: Path,
                                          http: httpx.Client) -> None:
    with open_reader(f"virtual:{card}") as reader:
        r = raw(stack, reader, http)
        init = r.init()
        body = r.request(init)
        command = r.send_request(body)
        assert r.send_request(body) == command  # a retry gets the same command
        with pytest.raises(PaymentRefused, match="replayed load request"):
            r.send_request(r.request(init, random=bytes(4)))
        s3 = r.credit(command).data
        first = r.result(L.RESULT_LOADED, s3=s3)
        assert r.result(L.RESULT_LOADED, s3=s3) == first  # idempotent
        with pytest.raises(PaymentRefused, match="replayed load result"):
            r.result(L.RESULT_NOT_LOADED, zero=r.init(0))
        # the same S1 under a second bank order: refused, and that order is refunded
        r2 = raw(stack, reader, http)
        with pytest.raises(PaymentRefused, match="replayed S1"):
            r2.send_request(r2.request(init, bank_time=int(r2.params["bank_time"])))
        assert r.to_bank(first.confirmation).status_code == 200
        answer = r2.result(L.RESULT_NOT_LOADED, zero=r2.init(0))
        assert r2.to_bank(answer.confirmation).json()["refunded"] == 5_000
    assert balance(card) == 6_000 and account(stack) == 45_000


def test_forged_reused_and_misdirected_confirmations(stack: LoadStack, card: Path,
                                                     http: httpx.Client) -> None:
    with open_reader(f"virtual:{card}") as reader:
        r = raw(stack, reader, http)
        command = r.send_request(r.request(r.init()))
        answer = r.result(L.RESULT_LOADED, s3=r.credit(command).data)
        forged = secure.seal(secure.new_key(), b"x" * 40, b"")
        response = r.to_bank(forged)
        assert response.status_code == 400 and "forged" in response.json()["reason"]
        tampered = answer.confirmation[:-1] + bytes([answer.confirmation[-1] ^ 1])
        assert r.to_bank(tampered).status_code == 400
        assert r.to_bank(b"garbage").status_code == 400
        r2 = raw(stack, reader, http, amount=10)
        wrong = r2.to_bank(answer.confirmation, txn_id=r.s.txn_id)  # r's blob at r2's URL
        assert wrong.status_code == 400
        assert r.to_bank(answer.confirmation).status_code == 200
        again = r.to_bank(answer.confirmation)
        assert again.status_code == 409 and "already registered" in again.json()["reason"]
    assert account(stack) == 50_000 - 5_000 - 10  # r2 still debited: its load is open


def test_unknown_bank_is_refused(stack: LoadStack, card: Path, http: httpx.Client) -> None:
    with open_reader(f"virtual:{card}") as reader:
        r = raw(stack, reader, http)
        r.s.bank_id = bytes(8)
        with pytest.raises(PaymentRefused, match="unknown bank"):
            r.send_request(r.request(r.init()))


@pytest.mark.parametrize("case", ["true", "true-claims-later", "false", "false-claims-earlier"])
def test_negative_results(stack: LoadStack, card: Path, http: httpx.Client, case: str) -> None:
    """True "not loaded" (card not loaded) and false (card loaded), with the counter reported
    as the card gave it or changed by the client. Only a probe the card completed at the
    load's own counter closes it "not loaded"; a card past that counter leaves it open until
    its S3 comes; a changed counter does not verify and records nothing."""
    with open_reader(f"virtual:{card}") as reader:
        r = raw(stack, reader, http)
        command = r.send_request(r.request(r.init()))
        truly_loaded = case.startswith("false")
        s3 = r.credit(command).data if truly_loaded else b""
        zero = r.init(0)
        if case in ("true-claims-later", "false-claims-earlier"):
            changed = zero.online_counter + (1 if case == "true-claims-later" else -1)
            with pytest.raises(PaymentRefused, match="does not verify") as refused:
                r.probe(zero, online_counter=changed)
            assert refused.value.status == 400
            assert row_of(stack, r)["probe_s2"] is None  # nothing recorded
        probe = r.probe(zero)
        tac = r.credit(probe).data
        if truly_loaded:  # the probe ran at counter 1: counter 0 may well be this load's
            with pytest.raises(PaymentRefused, match="undecided") as undecided:
                r.probe_result(tac)
            assert undecided.value.status == 409
            assert row_of(stack, r)["state"] == "authorized"
            answer = r.result(L.RESULT_LOADED, s3=s3)  # the card's proof decides
        else:
            answer = r.probe_result(tac)
        expected = L.OUTCOME_LOADED if truly_loaded else L.OUTCOME_NOT_LOADED
        assert answer.outcome == expected, answer.reason
        assert r.confirmation(answer).outcome == expected
        bank = r.to_bank(answer.confirmation).json()
    assert balance(card) == (6_000 if truly_loaded else 1_000)
    assert account(stack) == (45_000 if truly_loaded else 50_000)
    assert bank["outcome"] == ("loaded" if truly_loaded else "not loaded")


def test_a_new_s1_that_does_not_verify_leaves_the_load_open(stack: LoadStack, card: Path,
                                                            http: httpx.Client) -> None:
    with open_reader(f"virtual:{card}") as reader:
        r = raw(stack, reader, http)
        r.send_request(r.request(r.init()))
        zero = r.init(0)
        with pytest.raises(PaymentRefused, match="does not verify"):
            r.probe(zero, s1=bytes(4))
        assert row_of(stack, r)["state"] == "authorized"
        assert r.not_loaded().outcome == L.OUTCOME_NOT_LOADED


@pytest.mark.parametrize(("path", "after_send", "loaded"), [
    ("/v1/load/request", False, False), ("/v1/load/request", True, False),
    ("/v1/load/result", False, True), ("/v1/load/result", True, True),
    ("/v1/load/status/", False, True), ("/v1/load/status/", True, True),
])
def test_client_cut_off_at_each_step_and_resumed(stack: LoadStack, card: Path, tmp_path: Path,
                                                 path: str, after_send: bool,
                                                 loaded: bool) -> None:
    journal = Journal(tmp_path / "j.jsonl")
    with CutOff(path, after_send=after_send) as http, pytest.raises(httpx.ConnectError):
        do_load(stack, card, http, journal)
    with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
        report = LC.resume_loads(reader, journal=journal, http=http)
        assert len(report) == 1
        if path != "/v1/load/status/" or not after_send:
            assert report[0]["outcome"] == ("loaded" if loaded else "not loaded"), report
        assert LC.resume_loads(reader, journal=journal, http=http) == []
    assert balance(card) == (6_000 if loaded else 1_000)
    assert account(stack) == (45_000 if loaded else 50_000)
    (bank_load,) = stack.bank_server.db.loads()
    assert bank_load["state"] == ("confirmed" if loaded else "refunded")


@pytest.mark.parametrize("reached_card", [False, True])
def test_lost_credit_for_load_is_settled_by_the_card(stack: LoadStack, card: Path,
                                                     tmp_path: Path, reached_card: bool) -> None:
    """The client dies around CREDIT FOR LOAD: GET TRANSACTION PROVE (loaded) or a zero-value
    S1 (not loaded) tells the load server what the card did."""
    journal = Journal(tmp_path / "j.jsonl")

    class Died(Exception):
        pass

    real_exchange = VirtualReader.exchange

    def dying(self: Any, apdu: bytes) -> Any:
        if apdu[:2] == b"\x80\x52":
            if reached_card:
                real_exchange(self, apdu)
            raise Died()
        return real_exchange(self, apdu)

    with httpx.Client(timeout=30) as http:
        with open_reader(f"virtual:{card}") as reader:
            reader.exchange = dying.__get__(reader)  # type: ignore[method-assign]
            with pytest.raises(Died):
                LC.load(stack.bank_url, reader, account="alice", secret=SECRET, amount=5_000,
                        journal=journal, http=http)
        assert journal.entries().popitem()[1]["state"] == "load-command"
        with open_reader(f"virtual:{card}") as reader:
            report = LC.resume_loads(reader, journal=journal, http=http)
    assert [r["outcome"] for r in report] == ["loaded" if reached_card else "not loaded"]
    assert balance(card) == (6_000 if reached_card else 1_000)
    assert account(stack) == (45_000 if reached_card else 50_000)


@pytest.mark.parametrize("after_send", [False, True])
def test_lost_bank_answer_is_asked_again_without_a_second_debit(stack: LoadStack, card: Path,
                                                                tmp_path: Path,
                                                                after_send: bool) -> None:
    """The bank debited (or not) but its answer was lost: the journal's request id asks
    again; a debit for a load the card never saw ends "not loaded" and is re-credited."""
    journal = Journal(tmp_path / "j.jsonl")
    with CutOff("/v1/load/start", after_send=after_send) as http, \
            pytest.raises(httpx.ConnectError):
        do_load(stack, card, http, journal)
    assert account(stack) == (45_000 if after_send else 50_000)
    with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
        report = LC.resume_loads(reader, journal=journal, http=http)
        assert [r["outcome"] for r in report] == (["not loaded"] if after_send else
                                                  ["no debit"])
        assert LC.resume_loads(reader, journal=journal, http=http) == []
    assert account(stack) == 50_000 and balance(card) == 1_000
    assert [b["state"] for b in stack.bank_server.db.loads()] == (
        ["refunded"] if after_send else [])
