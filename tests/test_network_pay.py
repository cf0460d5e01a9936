"""Paying over the network (seed FIG. 5-9, 16), all over real HTTP on loopback with SQLite."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import httpx
import pytest
from netfaults import CutOff

from svcard.card.storage import read_image
from svcard.host.demo.system import card_image
from svcard.host.pay import client as C
from svcard.host.pay.stack import Stack, start_stack
from svcard.host.terminal import apdus
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.purse import Declined, TerminalCheckFailed, select_purse
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import messages as M
from svcard.protocols import purse as P
from svcard.protocols import secure
from svcard.reader import VirtualReader

VARIANTS = ("fig5", "fig6", "fig7", "fig8")


def pay(stack: Stack, card: Path, http: httpx.Client, journal: Journal, sku: str = "ticket",
        variant: str = "fig6", **kwargs: Any) -> C.PaymentOutcome:
    with open_reader(f"virtual:{card}") as reader:
        return C.pay(stack.checkout_url(sku, variant), reader, journal=journal, http=http,
                     **kwargs)


def balance(card: Path) -> int:
    return int(read_image(card)["app"]["ep"]["balance"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_end_to_end(stack: Stack, card: Path, http: httpx.Client, tmp_path: Path,
                                 variant: str) -> None:
    journal = Journal(tmp_path / "journal.jsonl")
    outcome = pay(stack, card, http, journal, variant=variant)
    assert outcome.goods == "TICKET-MUSEUM-0042"
    assert (outcome.balance_before, outcome.balance_after) == (10_000, 8_750)
    assert outcome.round_trips == (2 if variant in ("fig7", "fig8") else 3)
    assert balance(card) == 8_750
    row = stack.payment_server.db.get(stack.merchant_server.config.merchant_id.hex(),
                                      outcome.txn_id)
    assert row is not None
    # FIG. 7/8: confirmed by the card's proof the client uploads after the goods
    assert row["state"] == "confirmed" and row["tac"] is not None
    assert outcome.proof_uploads == (1 if variant in ("fig7", "fig8") else 0)
    assert row["amount"] == 1250 and row["card_counter"] == 0
    assert outcome.receipt["terminal_txn_number"] == row["ttn"]
    # the PSAM recorded it for collection: credited (FIG. 5) or released early (6-8)
    psam_records = [P.PsamRecord.parse(bytes.fromhex(r))
                    for p in stack.payment_server.pool.psams
                    for r in p.reader.card.apps[0].state.records.hex_list()]  # type: ignore[attr-defined]
    assert [(r.amount, r.status) for r in psam_records] == [(1250, 0 if variant == "fig5"
                                                             else 1)]
    assert journal.entries()[outcome.txn_id]["state"] == "done"


def test_authentication_with_a_zero_amount_draw(stack: Stack, card: Path, http: httpx.Client,
                                                tmp_path: Path) -> None:
    outcome = pay(stack, card, http, Journal(tmp_path / "j"), sku="login", variant="fig5")
    assert outcome.receipt["status"] == "authentication OK"
    assert outcome.goods == "member-session" and balance(card) == 10_000


def test_insufficient_balance_is_refused_before_going_online(stack: Stack, tmp_path: Path,
                                                            http: httpx.Client) -> None:
    poor = card_image(tmp_path, "poor.json", ep=100)
    with pytest.raises(Declined) as err:
        pay(stack, poor, http, Journal(tmp_path / "j"))
    assert err.value.sw == 0x9401
    assert stack.payment_server.db.counts() == {}


def test_expired_card_is_refused_before_going_online(stack: Stack, card: Path,
                                                     http: httpx.Client, tmp_path: Path) -> None:
    with pytest.raises(TerminalCheckFailed, match="expired"):
        pay(stack, card, http, Journal(tmp_path / "j"), when=dt.datetime(2040, 1, 1))
    assert stack.payment_server.db.counts() == {} and balance(card) == 10_000


def test_blocked_card_is_refused_by_the_psam(stack: Stack, card: Path, http: httpx.Client,
                                             tmp_path: Path) -> None:
    serial8 = bytes.fromhex(read_image(card)["app"]["public_data"])[12:20]
    for p in stack.payment_server.pool.psams:
        assert p.reader.transmit(bytes.fromhex("8076010008") + serial8)[-2:] == b"\x90\x00"
    with pytest.raises(C.PaymentRefused) as err:
        pay(stack, card, http, Journal(tmp_path / "j"))
    assert err.value.status == 403 and "blocked" in err.value.reason
    assert balance(card) == 10_000


class Client:
    """A hand-driven client, to send what an honest one would not."""

    def __init__(self, stack: Stack, card: Path, http: httpx.Client, variant: str = "fig6",
                 sku: str = "ticket") -> None:
        self.stack, self.card_path, self.http = stack, card, http
        self.params = C.fetch_checkout(http, stack.checkout_url(sku, variant))
        self.session = C._Session(self.params)

    def draw_body(self, amount: int | None = None) -> bytes:
        with open_reader(f"virtual:{self.card_path}") as reader:
            info = select_purse(reader)
            init = P.InitForPurchaseAnswer.parse(reader.exchange(apdus.initialize(
                P.INIT_PURCHASE, 2, 1, self.params["amount"],
                bytes.fromhex(self.params["terminal_id"]))).data)
        return M.build(M.DrawRequest, {
            "issuer_id": bytes.fromhex(info.issuer_id), "card_serial": info.serial_bytes,
            "algorithm_id": 0, "key_version": init.key_version,
            "expiry_date": bytes.fromhex(info.expiry_date), "balance": init.balance,
            "currency_code": 156, "currency_exponent": 2, "purse": 2,
            "offline_counter": init.offline_counter,
            "amount": self.params["amount"] if amount is None else amount,
            "random": init.random, "txn_type": 6})

    def envelope(self, msg_type: int, body: bytes) -> bytes:
        s = self.session
        return M.seal_envelope(msg_type, s.merchant_id, s.txn_id, s.etsk, s.tsk, body)

    def post(self, path: str, data: bytes) -> httpx.Response:
        return self.http.post(self.stack.payment.url + path, content=data)


def test_amount_changed_in_transit_is_refused(stack: Stack, card: Path,
                                              http: httpx.Client) -> None:
    c = Client(stack, card, http)
    response = c.post("/v1/draw", c.envelope(M.DRAW_REQUEST, c.draw_body(amount=1)))
    assert response.status_code == 400
    assert "differs from the merchant's order" in response.headers["X-Svcard-Reason"]
    assert M.parse(M.ErrorMessage, response.content, "e").code == 402
    assert balance(card) == 10_000


def test_tampered_envelopes_are_refused(stack: Stack, card: Path, http: httpx.Client) -> None:
    c = Client(stack, card, http)
    good = bytearray(c.envelope(M.DRAW_REQUEST, c.draw_body()))
    good[-1] ^= 1  # a flipped bit in the sealed body
    r = c.post("/v1/draw", bytes(good))
    assert r.status_code == 400 and "does not open" in r.headers["X-Svcard-Reason"]
    header_flip = bytearray(c.envelope(M.DRAW_REQUEST, c.draw_body()))
    header_flip[20] ^= 1  # the transaction id, in the clear header
    r = c.post("/v1/draw", bytes(header_flip))
    assert r.status_code == 400
    assert c.post("/v1/draw", b"garbage").status_code == 400
    assert stack.payment_server.db.counts() == {}


def test_unknown_merchant_is_refused(stack: Stack, card: Path, http: httpx.Client) -> None:
    c = Client(stack, card, http)
    s = c.session
    data = M.seal_envelope(M.DRAW_REQUEST, b"NOBODY01", s.txn_id, s.etsk, s.tsk, c.draw_body())
    r = c.post("/v1/draw", data)
    assert r.status_code == 403 and "unknown merchant" in r.headers["X-Svcard-Reason"]


def test_replayed_draw_and_debit_response(stack: Stack, card: Path, http: httpx.Client) -> None:
    c = Client(stack, card, http, variant="fig6")
    draw = c.envelope(M.DRAW_REQUEST, c.draw_body())
    first = c.post("/v1/draw", draw)
    assert first.status_code == 200
    # a retry of the same draw before the debit: the same debit command
    again = c.post("/v1/draw", draw)
    assert again.status_code == 200
    env, header = M.split_envelope(first.content)
    cmd = M.parse(M.DebitCommand, secure.open_sealed(c.session.tsk, env.body, header, "x"), "d")
    env2, header2 = M.split_envelope(again.content)
    assert secure.open_sealed(c.session.tsk, env2.body, header2, "x") == M.build(
        M.DebitCommand, {k: getattr(cmd, k) for k in (
            "psam_id", "terminal_id", "terminal_txn_number", "date", "time", "mac1", "amount",
            "expected_mac2", "sealed_expected_mac2", "result_m")})
    with open_reader(f"virtual:{card}") as reader:
        select_purse(reader)
        reader.exchange(apdus.initialize(P.INIT_PURCHASE, 2, 1, 1250,
                                         bytes.fromhex(c.params["terminal_id"])))
        # the card's INITIALIZE has a new random: the old MAC1 is refused, no money moves
        answer = reader.exchange(apdus.debit_for_purchase(cmd.terminal_txn_number, cmd.date,
                                                          cmd.time, cmd.mac1))
    assert answer.sw == 0x9302 and balance(card) == 10_000
    forged = c.envelope(M.DEBIT_RESPONSE, M.build(M.DebitResponse, {
        "card_sw": 0x9000, "tac": bytes(4), "mac2": bytes(4)}))
    # a MAC2 that is not the expected one authenticates nothing: refused, nothing changes
    r = c.post("/v1/debit-response", forged)
    assert r.status_code == 400 and M.parse(M.ErrorMessage, r.content, "e").code == 401
    assert "MAC2" in r.headers["X-Svcard-Reason"]
    row = stack.payment_server.db.get(c.params["merchant_id"], c.params["txn_id"])
    assert row is not None and row["state"] == "issued" and row["result"] is None
    assert "MAC2" in row["client_report"]
    assert c.post("/v1/debit-response", forged).status_code == 400  # and again
    # the draw again, while the debit is open: the same debit command
    r = c.post("/v1/draw", draw)
    assert r.status_code == 200
    # another draw for the same transaction: refused
    r = c.post("/v1/draw", c.envelope(M.DRAW_REQUEST, c.draw_body()))
    assert r.status_code == 409 and "another draw" in r.headers["X-Svcard-Reason"]


def test_forged_and_reused_confirmations(stack: Stack, card: Path, http: httpx.Client,
                                         tmp_path: Path) -> None:
    outcome = pay(stack, card, http, Journal(tmp_path / "j"), variant="fig6")
    status_url = f"{stack.merchant.url}/v1/status/{outcome.txn_id}"
    forged = M.build(M.Confirmation, {"version": 1, "variant": 6,
                                      "txn_id": bytes.fromhex(outcome.txn_id),
                                      "result_m": bytes(60), "card_mac2": bytes(4),
                                      "sealed_expected_mac2": b""})
    r = http.post(status_url, content=forged)
    assert r.status_code == 409 and not r.json()["released"]  # already paid: used once
    # a fresh order, confirmed with a forged M
    params = C.fetch_checkout(http, stack.checkout_url("song", "fig6"))
    r = http.post(params["status_url"], content=M.build(M.Confirmation, {
        "version": 1, "variant": 6, "txn_id": bytes.fromhex(params["txn_id"]),
        "result_m": bytes(60), "card_mac2": bytes(4), "sealed_expected_mac2": b""}))
    assert r.status_code == 400 and "forged confirmation" in r.json()["reason"]
    # the M of the paid order, replayed for the fresh one
    row = stack.payment_server.db.get(params["merchant_id"], outcome.txn_id)
    assert row is not None
    result_m = M.parse(M.PaymentResult, row["result"], "r").result_m
    r = http.post(params["status_url"], content=M.build(M.Confirmation, {
        "version": 1, "variant": 6, "txn_id": bytes.fromhex(params["txn_id"]),
        "result_m": result_m, "card_mac2": bytes(4), "sealed_expected_mac2": b""}))
    assert r.status_code == 400 and "forged confirmation" in r.json()["reason"]
    r = http.post(params["status_url"], content=b"junk")
    assert r.status_code == 400 and "malformed" in r.json()["reason"]


def test_fig8_merchant_refuses_a_wrong_card_mac2(stack: Stack, card: Path,
                                                 http: httpx.Client) -> None:
    c = Client(stack, card, http, variant="fig8")
    r = c.post("/v1/draw", c.envelope(M.DRAW_REQUEST, c.draw_body()))
    assert r.status_code == 200
    env, header = M.split_envelope(r.content)
    cmd = M.parse(M.DebitCommand, secure.open_sealed(c.session.tsk, env.body, header, "x"), "d")
    assert cmd.expected_mac2 == bytes(4)  # FIG. 8: the client never sees it
    r = http.post(c.params["status_url"], content=M.build(M.Confirmation, {
        "version": 1, "variant": 8, "txn_id": c.session.txn_id, "result_m": cmd.result_m,
        "card_mac2": b"\xde\xad\xbe\xef", "sealed_expected_mac2": cmd.sealed_expected_mac2}))
    assert r.status_code == 402 and "did not pay" in r.json()["reason"]


def test_pool_exhaustion_gives_503(tmp_path: Path, card: Path, http: httpx.Client) -> None:
    stack = start_stack(tmp_path / "one", psams=1, acquire_timeout=0.2)
    try:
        c = Client(stack, card, http, variant="fig5")  # FIG. 5 holds its PSAM
        assert c.post("/v1/draw", c.envelope(M.DRAW_REQUEST, c.draw_body())).status_code == 200
        other = card_image(tmp_path, "other.json")
        d = Client(stack, other, http, variant="fig6")
        r = d.post("/v1/draw", d.envelope(M.DRAW_REQUEST, d.draw_body()))
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        health = http.get(stack.payment.url + "/v1/health").json()
        assert {k: health[k] for k in ("psams", "idle", "terminal_id")} == {
            "psams": 1, "idle": 0, "terminal_id": "000000000001"}
        assert health["checks"]["psams"]["in_use"] == 1
    finally:
        stack.close()


@pytest.mark.parametrize(("path", "after_send"), [
    ("/v1/debit-response", False), ("/v1/debit-response", True), ("/v1/status/", True),
])
def test_client_cut_off_after_the_card_debited_completes_once(
        stack: Stack, card: Path, tmp_path: Path, path: str, after_send: bool) -> None:
    journal = Journal(tmp_path / "journal.jsonl")
    with CutOff(path, after_send=after_send) as http, pytest.raises(httpx.ConnectError):
        pay(stack, card, http, journal, variant="fig5")
    assert balance(card) == 8_750  # the card paid
    (entry,) = journal.entries().values()
    assert entry["state"] in ("debited", "confirmed")
    with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
        report = C.resume(reader, journal=journal, http=http)
        assert [r["outcome"] for r in report] in (["completed"], ["completed earlier"])
        assert C.resume(reader, journal=journal, http=http) == []  # nothing left to do
    assert balance(card) == 8_750  # paid once, never twice
    order = stack.merchant_server.orders[bytes.fromhex(entry["txn_id"])]
    assert order.state == "paid"


def test_lost_card_answer_is_recovered_with_the_cards_proof(stack: Stack, card: Path,
                                                            tmp_path: Path) -> None:
    """The DEBIT reached the card but its answer was lost: GET TRANSACTION PROVE finishes it."""
    journal = Journal(tmp_path / "journal.jsonl")

    class LostAnswer(Exception):
        pass

    real_exchange = VirtualReader.exchange

    def losing(self: Any, apdu: bytes) -> Any:
        answer = real_exchange(self, apdu)
        if apdu[:2] == b"\x80\x54":
            raise LostAnswer()
        return answer

    with httpx.Client(timeout=30) as http:
        reader = open_reader(f"virtual:{card}")
        with reader:
            reader.exchange = losing.__get__(reader)  # type: ignore[method-assign]
            with pytest.raises(LostAnswer):
                C.pay(stack.checkout_url("ticket", "fig6"), reader, journal=journal, http=http)
        assert journal.entries().popitem()[1]["state"] == "debit-sent"
        with open_reader(f"virtual:{card}") as reader2:
            report = C.resume(reader2, journal=journal, http=http)
    assert [r["outcome"] for r in report] == ["completed"]
    assert balance(card) == 8_750


def test_a_debit_whose_proof_was_replaced_is_never_abandoned(stack: Stack, card: Path,
                                                            tmp_path: Path) -> None:
    """The DEBIT reached the card, its answer was lost, and the card then made another
    purchase before any resume (a library caller skipping it): GET TRANSACTION PROVE no longer
    knows the debit, but the card's log does, so it is not abandoned as "never debited"."""
    journal = Journal(tmp_path / "journal.jsonl")
    real_exchange = VirtualReader.exchange

    def losing(self: Any, apdu: bytes) -> Any:
        answer = real_exchange(self, apdu)
        if apdu[:2] == b"\x80\x54":
            raise ConnectionError("the card's answer was lost")
        return answer

    with httpx.Client(timeout=30) as http:
        with open_reader(f"virtual:{card}") as reader:
            reader.exchange = losing.__get__(reader)  # type: ignore[method-assign]
            with pytest.raises(ConnectionError):
                C.pay(stack.checkout_url("ticket", "fig6"), reader, journal=journal, http=http)
        lost = journal.entries().popitem()[1]
        assert lost["state"] == "debit-sent" and balance(card) == 8_750
        with open_reader(f"virtual:{card}") as reader:  # another purchase, no resume first
            C.pay(stack.checkout_url("song", "fig6"), reader, journal=Journal(tmp_path / "j2"),
                  http=http)
        with open_reader(f"virtual:{card}") as reader:
            report = C.resume(reader, journal=journal, http=http)
    assert [r["txn_id"] for r in report] == [lost["txn_id"]]
    assert report[0]["outcome"].startswith("unproven: the card's log shows this debit")
    assert journal.entries()[lost["txn_id"]]["state"] == "unproven"


def test_interrupted_before_the_debit_is_abandoned(stack: Stack, card: Path,
                                                  tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.jsonl")
    with CutOff("/v1/draw", after_send=True) as http, pytest.raises(httpx.ConnectError):
        pay(stack, card, http, journal, variant="fig6")
    with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
        report = C.resume(reader, journal=journal, http=http)
        assert report[0]["outcome"] == "abandoned: never debited"
    # the next purchase reuses the card counter: it pays; the stale draw (whose card fields
    # are unauthenticated) is left alone, and blocks nothing
    with httpx.Client(timeout=30) as http:
        pay(stack, card, http, journal, variant="fig6")
    assert stack.payment_server.db.counts() == {"issued": 1, "confirmed": 1}
    assert balance(card) == 8_750
