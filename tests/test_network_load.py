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
from netfaults import CutOff

from svcard.card.storage import read_image
from svcard.host import apdus
from svcard.host import load_client as LC
from svcard.host.client import PaymentRefused
from svcard.host.journal import Journal
from svcard.host.specs import open_reader
from svcard.host.stack import LoadStack, card_image, start_load_stack
from svcard.host.terminal import TerminalCheckFailed, call, select_purse
from svcard.protocols import loadmsg as L
from svcard.protocols import messages as M
from svcard.protocols import purse as P
from svcard.protocols import secure
from svcard.reader import Reader, VirtualReader

SECRET = "s3cret"


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


class Raw:
    """One load, step by step, so a test can change what the client sends."""

    def __init__(self, stack: LoadStack, reader: Reader, http: httpx.Client,
                 amount: int = 5_000) -> None:
        self.reader, self.http, self.amount = reader, http, amount
        self.params, _ = LC.start_load(http, stack.bank_url, reader, account="alice",
                                       secret=SECRET, amount=amount)
        self.s = LC._LoadSession(self.params)
        self.info = select_purse(reader)

    def init(self, amount: int | None = None) -> Any:
        self.reader.exchange(apdus.select(P.DEFAULT_IEP_AID))
        return P.InitForLoadAnswer.parse(call(self.reader, apdus.initialize(
            P.INIT_LOAD, P.PURSE_EP, 1, self.amount if amount is None else amount,
            self.s.terminal_id), "INITIALIZE FOR LOAD"))

    def request(self, init: Any, **changes: Any) -> bytes:
        return M.build(L.LoadRequest, {
            "issuer_id": bytes.fromhex(self.info.issuer_id),
            "card_serial": self.info.serial_bytes,
            "expiry_date": bytes.fromhex(self.info.expiry_date),
            "currency_code": self.info.currency_code, "amount": self.amount,
            "txn_type": P.TYPE_EP_LOAD, "algorithm_id": init.algorithm_id,
            "key_version": init.key_version, "online_counter": init.online_counter,
            "balance": init.balance, "random": init.random, "s1": init.mac1,
            "bank_time": int(self.params["bank_time"]), **changes})

    def send_request(self, body: bytes) -> Any:
        return M.parse(L.LoadCommand, self.s.post(self.http, "/v1/load/request",
                                                  L.LOAD_REQUEST, body), "load command")

    def credit(self, command: Any, s2: bytes | None = None) -> Any:
        return self.reader.exchange(apdus.credit_for_load(command.date, command.time,
                                                          s2 or command.s2))

    def result(self, result: int, s3: bytes = bytes(4), zero: Any = None,
               **changes: Any) -> Any:
        body = M.build(L.LoadResult, {
            "result": result, "card_sw": 0x9000, "s3": s3,
            "online_counter": zero.online_counter if zero else 0,
            "balance": zero.balance if zero else 0,
            "random": zero.random if zero else bytes(4), "s1": zero.mac1 if zero else bytes(4),
            **changes})
        return M.parse(L.LoadAnswer, self.s.post(self.http, "/v1/load/result", L.LOAD_RESULT,
                                                 body), "load answer")

    def to_bank(self, confirmation: bytes, txn_id: bytes | None = None) -> httpx.Response:
        return self.http.post(self.params["status_url"], content=M.build(
            L.BankConfirmation, {"version": 1, "txn_id": txn_id or self.s.txn_id,
                                 "confirmation": confirmation}))

    def confirmation(self, answer: Any) -> Any:
        return M.parse(L.LoadConfirmation, secure.open_sealed(
            secure.derive_key(self.shared_key, self.s.bank_id, self.s.txn_id),
            answer.confirmation, L.confirmation_aad(self.s.bank_id, self.s.txn_id), "c"), "c")

    shared_key = b""


def raw(stack: LoadStack, reader: Reader, http: httpx.Client, amount: int = 5_000) -> Raw:
    r = Raw(stack, reader, http, amount)
    r.shared_key = stack.shared_key
    return r


def test_tampered_s1_is_refused_and_refunded(stack: LoadStack, card: Path,
                                             http: httpx.Client) -> None:
    with open_reader(f"virtual:{card}") as reader:
        r = raw(stack, reader, http)
        init = r.init()
        with pytest.raises(PaymentRefused, match="S1 does not verify"):
            r.send_request(r.request(init, s1=bytes(a ^ 1 for a in init.mac1)))
        with pytest.raises(PaymentRefused, match="replayed load request"):  # one try per order
            r.send_request(r.request(init))
        answer = r.result(L.RESULT_NOT_LOADED, zero=r.init(0))
        assert answer.outcome == L.OUTCOME_NOT_LOADED
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
        answer = r.result(L.RESULT_NOT_LOADED, zero=r.init(0))
        assert answer.outcome == L.OUTCOME_NOT_LOADED and "counters equal" in answer.reason
        assert r.to_bank(answer.confirmation).json()["outcome"] == "not loaded"
    assert account(stack) == 50_000 and balance(card) == 1_000


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


@pytest.mark.parametrize("case", ["true-equal", "true-different", "false-different",
                                  "false-claims-equal"])
def test_negative_results(stack: LoadStack, card: Path, http: httpx.Client, case: str) -> None:
    """True "not loaded" (card not loaded) and false (card loaded), with the counter reported
    as the card gave it or changed by the client; the load server decides right each time."""
    with open_reader(f"virtual:{card}") as reader:
        r = raw(stack, reader, http)
        command = r.send_request(r.request(r.init()))
        truly_loaded = case.startswith("false")
        if truly_loaded:
            assert r.credit(command).ok
        zero = r.init(0)
        counter = zero.online_counter
        if case == "true-different":
            counter += 1
        if case == "false-claims-equal":
            counter -= 1
        answer = r.result(L.RESULT_NOT_LOADED, zero=zero, online_counter=counter)
        expected = L.OUTCOME_LOADED if truly_loaded else L.OUTCOME_NOT_LOADED
        assert answer.outcome == expected, answer.reason
        assert ("counters equal" if counter == 0 else "counters differ") in answer.reason
        assert r.confirmation(answer).outcome == expected
        bank = r.to_bank(answer.confirmation).json()
    assert balance(card) == (6_000 if truly_loaded else 1_000)
    assert account(stack) == (45_000 if truly_loaded else 50_000)
    assert bank["outcome"] == ("loaded" if truly_loaded else "not loaded")


def test_a_new_s1_that_matches_nothing_leaves_the_load_open(stack: LoadStack, card: Path,
                                                            http: httpx.Client) -> None:
    with open_reader(f"virtual:{card}") as reader:
        r = raw(stack, reader, http)
        r.send_request(r.request(r.init()))
        zero = r.init(0)
        with pytest.raises(PaymentRefused, match="matches neither"):
            r.result(L.RESULT_NOT_LOADED, zero=zero, s1=bytes(4))
        assert r.result(L.RESULT_NOT_LOADED, zero=zero).outcome == L.OUTCOME_NOT_LOADED


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
