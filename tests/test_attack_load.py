"""Attacks on the load side (issue 9, A1 and A2), each a client that sends what an attacker
would, step by step, over real HTTP to a real bank and load server (software HSM, SQLite), with
a real card image. A load that was issued S2 ends "not loaded" (and its bank order refunded)
only on evidence the card made afterwards: a zero-value probe load the card completed at the
load's counter, or a probe past it with another load proven at that counter."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from loadraw import SECRET, Raw
from netfaults import CutOff
from pg_env import Cluster, start_cluster

from svcard.card.storage import read_image
from svcard.host.demo.system import card_image
from svcard.host.load import client as LC
from svcard.host.load.stack import LoadStack, start_load_stack
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.online import PaymentRefused
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import loadmsg as L
from svcard.protocols import messages as M
from svcard.protocols import purse as P
from svcard.reader import Reader, VirtualReader

FUNDS, START = 50_000, 1_000


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    yield c
    c.stop()


@pytest.fixture(params=["sqlite"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LoadStack]:
    """Bank and load server on SQLite, or (``postgresql``) on a private PostgreSQL cluster."""
    if request.param == "postgresql":
        pg: Cluster = request.getfixturevalue("cluster")
        s = start_load_stack(tmp_path / "stack", bank_db=pg.new_database(),
                             load_db=pg.new_database())
    else:
        s = start_load_stack(tmp_path / "stack")
    s.account("alice", FUNDS, SECRET)
    yield s
    s.close()


BOTH_DATABASES = pytest.mark.parametrize("stack", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def card(tmp_path: Path) -> Path:
    return card_image(tmp_path, ep=START)


def purse(card: Path) -> tuple[int, int]:
    """(balance, online counter) of the card image."""
    ep = read_image(card)["app"]["ep"]
    return int(ep["balance"]), int(ep["online_counter"])


def account(stack: LoadStack) -> int:
    row = stack.bank_server.db.account("alice")
    assert row is not None
    return int(row["balance"])


def bank_state(stack: LoadStack, r: Raw) -> str:
    row = stack.bank_server.db.load(r.txn_hex)
    assert row is not None
    return str(row["state"])


def load_row(stack: LoadStack, r: Raw) -> dict[str, Any]:
    row = stack.load_server.db.get(r.s.bank_id.hex(), r.txn_hex)
    assert row is not None
    return row


def claim_not_loaded(r: Raw, zero: Any) -> tuple[int, bytes]:
    """The attacker's "not loaded": whatever the load server answers, a decision goes
    straight to the bank for the refund. (message type, body)"""
    msg_type, body = r.post_result(r.result_body(L.RESULT_NOT_LOADED, zero=zero))
    if msg_type == L.LOAD_ANSWER:
        r.to_bank(M.parse(L.LoadAnswer, body, "load answer").confirmation)
    return msg_type, body


def tamper_first_credit(reader: Reader) -> None:
    """The load command's S2 is changed in transit once: the card refuses it (9302)."""
    real = VirtualReader.exchange
    done = [False]

    def exchange(self: Any, apdu: bytes) -> Any:
        if apdu[:2] == bytes([P.CLA_PBOC, P.INS_CREDIT_FOR_LOAD]) and not done[0]:
            done[0] = True
            apdu = apdu[:15] + bytes([apdu[15] ^ 0xFF]) + apdu[16:]  # last byte of MAC2
        return real(self, apdu)

    reader.exchange = exchange.__get__(reader)  # type: ignore[method-assign]


def test_a1_zero_s1_kept_from_before_the_load_refunds_nothing(stack: LoadStack, card: Path,
                                                               http: httpx.Client) -> None:
    with open_reader(f"virtual:{card}") as reader:
        r = Raw(stack, reader, http)
        # 1. before the load: a zero-value INITIALIZE FOR LOAD, its S1 kept for later
        kept = r.init(0)
        assert (kept.online_counter, kept.balance) == (0, START)
        # 2. the real load: the card is credited
        command = r.send_request(r.request(r.init()))
        s3 = r.credit(command).data
        assert purse(card) == (START + 5_000, 1)
        # 3. "not loaded", with the S1 from before: the pre-load state, a genuine S1
        msg_type, body = claim_not_loaded(r, kept)
        assert msg_type == L.LOAD_PROBE, "decided on an S1 made before the load"
        probe = M.parse(L.LoadCommand, body, "probe")
        # 4. the probe is for counter 0, which the load spent: the card cannot complete it
        assert r.credit(probe).sw != 0x9000           # no session open
        r.init(0)
        assert r.credit(probe).sw == 0x9302           # another session: S2 does not verify
        # 5. so the attacker forges the probe's answer: the real load's S3, or zeros
        for forged in (s3, bytes(4), bytes(a ^ 1 for a in s3)):
            with pytest.raises(PaymentRefused, match="does not verify") as refused:
                r.probe_result(forged)
            assert refused.value.status == 400
        # 6. an honest probe at the card's counter now (1) proves nothing about counter 0
        with pytest.raises(PaymentRefused, match="undecided") as undecided:
            r.not_loaded()
        assert undecided.value.status == 409
        row = load_row(stack, r)
        assert row["state"] == "authorized" and row["evidence"] == ""
        assert bank_state(stack, r) == "debited" and account(stack) == FUNDS - 5_000
        # the load stays open until the card's proof of it comes; then it is "loaded"
        answer = r.result(L.RESULT_LOADED, s3=s3)
        assert answer.outcome == L.OUTCOME_LOADED
        assert r.to_bank(answer.confirmation).json()["outcome"] == "loaded"
    assert account(stack) == FUNDS - 5_000 and purse(card)[0] == START + 5_000
    assert stack.bank_server.db.totals().get("refunded", 0) == 0


@BOTH_DATABASES
def test_a2_two_loads_on_one_counter_refund_only_the_one_not_loaded(
        stack: LoadStack, card: Path, http: httpx.Client) -> None:
    with open_reader(f"virtual:{card}") as reader:
        a, b = Raw(stack, reader, http, 5_000), Raw(stack, reader, http, 3_000)
        assert account(stack) == FUNDS - 8_000
        # INITIALIZE for B, then for A (the card keeps A's session); A's request, then B's
        init_b = b.init()
        init_a = a.init()
        assert init_a.online_counter == init_b.online_counter == 0
        command_a = a.send_request(a.request(init_a))
        b.send_request(b.request(init_b))
        assert load_row(stack, a)["state"] == "authorized"  # B's request closed nothing
        # the card is credited with A's S2
        s3_a = a.credit(command_a).data
        assert purse(card) == (START + 5_000, 1)
        # A "not loaded": whatever comes back goes to the bank
        msg_type, body = claim_not_loaded(a, a.init(0))
        assert msg_type == L.LOAD_PROBE, "A decided 'not loaded' without the card's proof"
        probe = M.parse(L.LoadCommand, body, "probe")
        tac = a.credit(probe).data  # the probe runs at counter 1: it proves nothing for 0
        with pytest.raises(PaymentRefused, match="undecided"):
            a.probe_result(tac)
        assert bank_state(stack, a) == "debited"
        # B "not loaded", probed for real at counter 2: undecided while nobody proved 0
        b_probe = b.probe(b.init(0))
        b_tac = b.credit(b_probe).data
        with pytest.raises(PaymentRefused, match="undecided"):
            b.probe_result(b_tac)
        assert bank_state(stack, b) == "debited"
        # A's own proof: loaded; then B's probe shows counter 0 was A's
        answer_a = a.result(L.RESULT_LOADED, s3=s3_a)
        assert answer_a.outcome == L.OUTCOME_LOADED
        assert a.to_bank(answer_a.confirmation).json()["outcome"] == "loaded"
        answer_b = b.probe_result(b_tac)
        assert answer_b.outcome == L.OUTCOME_NOT_LOADED
        assert load_row(stack, b)["evidence"] == f"counter-used:{a.txn_hex}"
        assert b.to_bank(answer_b.confirmation).json()["refunded"] == 3_000
        # A can never be turned into "not loaded" afterwards
        with pytest.raises(PaymentRefused, match="replayed load result"):
            claim_not_loaded(a, a.init(0))
        with pytest.raises(PaymentRefused, match="replayed load result"):
            a.probe_result(tac)
    assert purse(card)[0] == START + 5_000 and account(stack) == FUNDS - 5_000
    assert stack.bank_server.db.totals() == {"confirmed": 5_000, "refunded": 3_000,
                                             "accounts": FUNDS - 5_000}


def test_forged_or_tampered_probe_s3_moves_nothing(stack: LoadStack, card: Path,
                                                   http: httpx.Client) -> None:
    with open_reader(f"virtual:{card}") as reader:
        r = Raw(stack, reader, http)
        command = r.send_request(r.request(r.init()))
        assert r.credit(command, s2=bytes(4)).sw == 0x9302
        with pytest.raises(PaymentRefused, match="no probe") as early:
            r.probe_result(bytes(4))  # out of order: before any probe
        assert early.value.status == 409
        probe = r.probe(r.init(0))
        tac = r.credit(probe).data
        before = load_row(stack, r)
        for forged in (bytes(4), bytes(a ^ 0x80 for a in tac), tac[:3] + b"\x00"):
            with pytest.raises(PaymentRefused, match="does not verify") as refused:
                r.probe_result(forged)
            assert refused.value.status == 400
        with pytest.raises(PaymentRefused, match="refused the probe"):
            r.probe_result(tac, card_sw=0x6985)
        for cut in (tac, r.probe_result_body(tac) + b"\x00"):  # truncated, or padded
            with pytest.raises(PaymentRefused, match="malformed"):
                r.s.post(http, "/v1/load/probe", L.LOAD_PROBE_RESULT, cut)
        with pytest.raises(PaymentRefused, match="expected message type"):  # reordered
            r.s.post(http, "/v1/load/probe", L.LOAD_RESULT, r.probe_result_body(tac))
        after = load_row(stack, r)
        assert {k: after[k] for k in ("state", "evidence", "answer", "probe_s2")} == \
               {k: before[k] for k in ("state", "evidence", "answer", "probe_s2")}
        assert after["state"] == "authorized" and bank_state(stack, r) == "debited"
        answer = r.probe_result(tac)
        assert answer.outcome == L.OUTCOME_NOT_LOADED
        assert r.to_bank(answer.confirmation).json()["refunded"] == 5_000
    assert account(stack) == FUNDS and purse(card) == (START, 1)


def test_a_probe_result_replayed_on_another_load_is_refused(stack: LoadStack, card: Path,
                                                            http: httpx.Client) -> None:
    with open_reader(f"virtual:{card}") as reader:
        x = Raw(stack, reader, http)
        assert x.credit(x.send_request(x.request(x.init())), s2=bytes(4)).sw == 0x9302
        tac_x = x.credit(x.probe(x.init(0))).data  # X's probe, at counter 0
        # Y: a second order, authorized at counter 1, its probe asked for but never run
        y = Raw(stack, reader, http, 2_000)
        y.send_request(y.request(y.init()))
        y.probe(y.init(0))
        with pytest.raises(PaymentRefused, match="does not verify"):
            y.probe_result(tac_x)  # X's TAC re-sealed in Y's envelope
        # Z: a third order with no probe at all
        z = Raw(stack, reader, http, 1_000)
        z.send_request(z.request(z.init()))
        with pytest.raises(PaymentRefused, match="no probe"):
            z.probe_result(tac_x)
        assert load_row(stack, y)["state"] == load_row(stack, z)["state"] == "authorized"
        assert bank_state(stack, y) == bank_state(stack, z) == "debited"
        answer = x.probe_result(tac_x)  # on its own load it is the evidence
        assert answer.outcome == L.OUTCOME_NOT_LOADED
        assert x.to_bank(answer.confirmation).json()["refunded"] == 5_000
    assert account(stack) == FUNDS - 3_000


@BOTH_DATABASES
def test_twenty_concurrent_copies_one_probe_one_decision_one_refund(
        stack: LoadStack, card: Path, http: httpx.Client) -> None:
    with open_reader(f"virtual:{card}") as reader:
        r = Raw(stack, reader, http)
        assert r.credit(r.send_request(r.request(r.init())), s2=bytes(4)).sw == 0x9302
        # 20 copies of the "not loaded" result at once (each sealed anew): one probe
        zero = r.init(0)
        body = r.result_body(L.RESULT_NOT_LOADED, zero=zero)
        with ThreadPoolExecutor(20) as pool:
            probes = list(pool.map(lambda _: r.post_result(body), range(20)))
        assert {t for t, _ in probes} == {L.LOAD_PROBE} and len({b for _, b in probes}) == 1
        tac = r.credit(M.parse(L.LoadCommand, probes[0][1], "probe")).data
        # 20 copies of the probe result at once: one decision, the same answer to all
        probe_body = r.probe_result_body(tac)
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: r.post_probe_result(probe_body), range(20)))
        assert len({a.confirmation for a in answers}) == 1
        assert answers[0].outcome == L.OUTCOME_NOT_LOADED
        # ... and the confirmation 20 times at once to the bank: one refund
        with ThreadPoolExecutor(20) as pool:
            banks = list(pool.map(lambda a: r.to_bank(a.confirmation), answers))
        assert sorted(b.status_code for b in banks) == [200] + [409] * 19
    assert account(stack) == FUNDS and purse(card) == (START, 1)
    assert stack.bank_server.db.totals() == {"refunded": 5_000, "accounts": FUNDS}
    (row,) = stack.load_server.db.rows()
    assert (row["state"], row["evidence"]) == ("not_loaded", "probe")


def test_card_refused_a_tampered_s2_the_client_probes_and_is_refunded_once(
        stack: LoadStack, card: Path, http: httpx.Client, tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.jsonl")
    with open_reader(f"virtual:{card}") as reader:
        tamper_first_credit(reader)
        out = LC.load(stack.bank_url, reader, account="alice", secret=SECRET, amount=5_000,
                      journal=journal, http=http)
    assert out.outcome == "not loaded" and out.bank["refunded"] == 5_000
    assert "probe" in out.reason
    (row,) = stack.load_server.db.rows()
    assert (row["state"], row["evidence"], row["probe_counter"]) == ("not_loaded", "probe", 0)
    assert account(stack) == FUNDS and purse(card) == (START, 1)
    with open_reader(f"virtual:{card}") as reader:
        assert LC.resume_loads(reader, journal=journal, http=http) == []
    assert stack.bank_server.db.totals() == {"refunded": 5_000, "accounts": FUNDS}


class Died(Exception):
    pass


@pytest.mark.parametrize("where", [
    "/v1/load/result:before", "/v1/load/result:after", "/v1/load/probe:before",
    "/v1/load/probe:after", "card:before", "card:after"])
def test_an_interrupted_probe_is_finished_by_resume(stack: LoadStack, card: Path,
                                                   tmp_path: Path, where: str) -> None:
    """The probe is cut at each step (its request, its result, the card's CREDIT before or
    after the card acted); resume_loads asks the card (GET TRANSACTION PROVE) or probes anew,
    and the order is refunded exactly once."""
    journal = Journal(tmp_path / "j.jsonl")
    place, when = where.split(":")
    http: httpx.Client = (httpx.Client(timeout=30) if place == "card"
                          else CutOff(place, after_send=when == "after"))
    with http, open_reader(f"virtual:{card}") as reader:
        tamper_first_credit(reader)
        if place == "card":  # the card is pulled at the probe's CREDIT FOR LOAD
            tampered = reader.exchange
            credits = [0]

            def dying(apdu: bytes) -> Any:
                if apdu[:2] == bytes([P.CLA_PBOC, P.INS_CREDIT_FOR_LOAD]):
                    credits[0] += 1
                    if credits[0] == 2:
                        if when == "after":
                            tampered(apdu)
                        raise Died()
                return tampered(apdu)

            reader.exchange = dying  # type: ignore[method-assign]
        with pytest.raises((httpx.ConnectError, Died)):
            LC.load(stack.bank_url, reader, account="alice", secret=SECRET, amount=5_000,
                    journal=journal, http=http)
    assert bank_state_of_only(stack) == "debited"
    with httpx.Client(timeout=30) as clean, open_reader(f"virtual:{card}") as reader:
        report = LC.resume_loads(reader, journal=journal, http=clean)
        assert [x["outcome"] for x in report] == ["not loaded"], report
        assert LC.resume_loads(reader, journal=journal, http=clean) == []
    assert account(stack) == FUNDS and purse(card)[0] == START
    assert stack.bank_server.db.totals() == {"refunded": 5_000, "accounts": FUNDS}
    (row,) = stack.load_server.db.rows()
    assert (row["state"], row["evidence"]) == ("not_loaded", "probe")


def bank_state_of_only(stack: LoadStack) -> str:
    (only,) = stack.bank_server.db.loads()
    return str(only["state"])


def test_an_undecided_load_stays_open_in_the_journal(stack: LoadStack, card: Path,
                                                     http: httpx.Client,
                                                     tmp_path: Path) -> None:
    """The card loaded, its S3 was lost and the client (wrongly) probes: the load server
    cannot decide, the client says so, the journal keeps the load open, nothing is refunded."""
    journal = Journal(tmp_path / "j.jsonl")
    with open_reader(f"virtual:{card}") as reader:
        r = Raw(stack, reader, http)
        assert r.credit(r.send_request(r.request(r.init()))).ok  # loaded; S3 dropped
        journal.write(r.txn_hex, "load-started", kind=LC.KIND, params=r.params,
                      card_serial=r.info.app_serial, balance=START)
        journal.write(r.txn_hex, "negative", why="the attacker says it never loaded")
        report = LC.resume_loads(reader, journal=journal, http=http)
        assert len(report) == 1 and report[0]["outcome"].startswith("still open")
        assert "undecided" in report[0]["outcome"]
        assert journal.entries()[r.txn_hex]["state"] == "undecided"
        again = LC.resume_loads(reader, journal=journal, http=http)  # the same probe again
        assert again[0]["outcome"].startswith("still open")
    assert bank_state(stack, r) == "debited" and account(stack) == FUNDS - 5_000
    assert purse(card) == (START + 5_000, 2)


def test_a_zero_amount_load_request_is_refused(stack: LoadStack, card: Path,
                                               http: httpx.Client) -> None:
    """Only the load server's probe makes zero-value S2s: a client cannot ask for one."""
    with open_reader(f"virtual:{card}") as reader:
        r = Raw(stack, reader, http)
        with pytest.raises(PaymentRefused, match="positive amount"):
            r.send_request(r.request(r.init(0), amount=0))
    assert stack.load_server.db.rows() == []  # refused before anything was logged
