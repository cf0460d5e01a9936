"""The payment server attacked (issue 9: P1, P4, C3, P3, D1, T1, CL4), each break as an attacker's
client, step by step, against real servers on loopback (SQLite, real PSAMs, real crypto).

An attacker has what the merchant hands anyone: checkout parameters (a transaction id, the TSK
and ETSK of *their own* order). From them they build envelopes with
:mod:`svcard.protocols.messages`; what they do not have is any card's keys, so they can invent
every unauthenticated field of a draw (a victim's card serial and next counter, an expiry, a
balance) and every card status word, but never a card's MAC2.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from svcard.card.image import save_new_image
from svcard.card.personalise import image_from_profile
from svcard.card.storage import read_image
from svcard.fixtures import fixture_path
from svcard.host.demo.system import card_image
from svcard.host.kit.serving import ServerThread, free_port, wait_http
from svcard.host.pay import client as C
from svcard.host.pay.server.app import PaymentServer
from svcard.host.pay.stack import DEMO_MERCHANT_ID, Stack, psam_images, start_stack
from svcard.host.terminal import apdus
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.purse import select_purse
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import messages as M
from svcard.protocols import purse as P
from svcard.protocols import secure
from svcard.reader import Reader

ADMIN = "attack-test-admin-token"
DEMO_SHARED_KEY = bytes.fromhex(  # fixtures/payment-demo.toml: a public test key
    "398359B0148B801CC14A90EED705FEFDD33495DAE1391AF60C8FDC6EE3C92DF6")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = start_stack(tmp_path / "stack", psams=2, admin_token=ADMIN,
                    concentration_dir=str(tmp_path / "concentration"))
    yield s
    s.close()


def balance(card: Path) -> int:
    return int(read_image(card)["app"]["ep"]["balance"])


def card_serial(card: Path) -> bytes:
    """The 10-byte application serial: printed on the card, on every receipt."""
    return bytes.fromhex(read_image(card)["app"]["public_data"])[10:20]


def psam_records(stack: Stack) -> list[Any]:
    return [P.PsamRecord.parse(bytes.fromhex(r)) for p in stack.payment_server.pool.psams
            for r in p.reader.card.apps[0].state.records.hex_list()]  # type: ignore[attr-defined]


def close_batches(stack: Stack, http: httpx.Client) -> dict[str, Any]:
    r = http.post(stack.payment.url + "/v1/batches/close",
                  headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def open_answer(session: C._Session, response: httpx.Response) -> bytes:
    env, header = M.split_envelope(response.content)
    return secure.open_sealed(session.tsk, env.body, header, "answer")


def result_c(session: C._Session, response: httpx.Response) -> Any:
    result = M.parse(M.PaymentResult, open_answer(session, response), "payment result")
    return M.parse(M.DebitResult, secure.open_sealed(
        session.tsk, result.result_c, M.result_c_aad(session.merchant_id, session.txn_id),
        "result C"), "result C")


def code(response: httpx.Response) -> int:
    return int(M.parse(M.ErrorMessage, response.content, "error").code)


class Attacker:
    """Someone with an order of their own and no card: every field they send is invented."""

    def __init__(self, stack: Stack | None, http: httpx.Client, variant: str = "fig6",
                 sku: str = "ticket", params: dict[str, Any] | None = None) -> None:
        self.http = http
        if params is None:
            assert stack is not None
            params = C.fetch_checkout(http, stack.checkout_url(sku, variant))
        self.params = params
        self.url = str(params["payment_url"]).rstrip("/")
        self.session = C._Session(self.params)

    def envelope(self, msg_type: int, body: bytes) -> bytes:
        s = self.session
        return M.seal_envelope(msg_type, s.merchant_id, s.txn_id, s.etsk, s.tsk, body)

    def fabricated_draw(self, serial: bytes = b"", counter: int = 0,
                        expiry: str = "20991231") -> bytes:
        return self.envelope(M.DRAW_REQUEST, M.build(M.DrawRequest, {
            "issuer_id": bytes.fromhex("1000000000000001"),
            "card_serial": serial or os.urandom(10), "algorithm_id": 0, "key_version": 1,
            "expiry_date": bytes.fromhex(expiry), "balance": 999_999, "currency_code": 156,
            "currency_exponent": 2, "purse": 2, "offline_counter": counter,
            "amount": self.params["amount"], "random": os.urandom(4), "txn_type": 6}))

    def response(self, card_sw: int, mac2: bytes = bytes(4), tac: bytes = bytes(4)) -> bytes:
        return self.envelope(M.DEBIT_RESPONSE, M.build(M.DebitResponse, {
            "card_sw": card_sw, "tac": tac, "mac2": mac2}))

    def post(self, path: str, data: bytes) -> httpx.Response:
        return self.http.post(self.url + path, content=data)


@dataclass
class Debited:
    mac2: bytes
    tac: bytes
    command: Any


class Honest(Attacker):
    """An honest client driven step by step (its card stays in the reader between steps), so
    that an attacker can act between them."""

    def __init__(self, stack: Stack | None, http: httpx.Client, reader: Reader,
                 variant: str = "fig6", sku: str = "ticket",
                 params: dict[str, Any] | None = None) -> None:
        super().__init__(stack, http, variant, sku, params)
        self.reader = reader

    def draw(self) -> Any:
        info = select_purse(self.reader)
        init = P.InitForPurchaseAnswer.parse(self.reader.exchange(apdus.initialize(
            P.INIT_PURCHASE, P.PURSE_EP, 1, self.params["amount"],
            bytes.fromhex(self.params["terminal_id"]))).data)
        self.counter = init.offline_counter
        body = M.build(M.DrawRequest, {
            "issuer_id": bytes.fromhex(info.issuer_id), "card_serial": info.serial_bytes,
            "algorithm_id": init.algorithm_id, "key_version": init.key_version,
            "expiry_date": bytes.fromhex(info.expiry_date), "balance": init.balance,
            "currency_code": 156, "currency_exponent": 2, "purse": P.PURSE_EP,
            "offline_counter": init.offline_counter, "amount": self.params["amount"],
            "random": init.random, "txn_type": P.TYPE_EP_PURCHASE})
        r = self.post("/v1/draw", self.envelope(M.DRAW_REQUEST, body))
        assert r.status_code == 200, r.headers.get("X-Svcard-Reason")
        return M.parse(M.DebitCommand, open_answer(self.session, r), "debit command")

    def debit(self, command: Any) -> Debited:
        answer = self.reader.exchange(apdus.debit_for_purchase(
            command.terminal_txn_number, command.date, command.time, command.mac1))
        assert answer.ok, f"{answer.sw:04X}"
        a = P.DebitForPurchaseAnswer.parse(answer.data)
        return Debited(a.mac2, a.tac, command)

    def genuine(self, d: Debited) -> bytes:
        return self.response(0x9000, d.mac2, d.tac)

    def confirm_to_merchant(self, response: httpx.Response) -> httpx.Response:
        result = M.parse(M.PaymentResult, open_answer(self.session, response), "r")
        return self.http.post(self.params["status_url"], content=M.build(M.Confirmation, {
            "version": M.VERSION, "variant": self.session.variant,
            "txn_id": self.session.txn_id, "result_m": result.result_m,
            "card_mac2": bytes(4), "sealed_expected_mac2": b""}))


def row_of(stack: Stack, who: Attacker) -> dict[str, Any]:
    row = stack.payment_server.db.get(who.params["merchant_id"], who.params["txn_id"])
    assert row is not None
    return row


async def post_all(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    """Every body at once, on its own connection."""
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(
            max_connections=len(bodies))) as client:
        return list(await asyncio.gather(*(client.post(url, content=b) for b in bodies)))


# --- P1 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["fig5", "fig6"])
def test_p1_a_fabricated_draw_on_a_victims_card_counter_blocks_nothing(
        stack: Stack, http: httpx.Client, tmp_path: Path, variant: str) -> None:
    victim = card_image(tmp_path, "victim.json")
    # 1. the attacker reads the victim's serial off a receipt; a fresh card's next counter is 0
    mallory = Attacker(stack, http, variant)
    r = mallory.post("/v1/draw", mallory.fabricated_draw(card_serial(victim), counter=0))
    assert r.status_code == 200  # the draw's card fields are not authenticated: recorded only
    # 2. "the card refused": unauthenticated, so it is recorded and moves nothing
    r = mallory.post("/v1/debit-response", mallory.response(0x6985))
    assert r.status_code == 200
    assert result_c(mallory.session, r).status == M.STATUS_CARD_REFUSED
    row = row_of(stack, mallory)
    assert row["state"] == "issued" and row["result"] is None
    assert "6985" in row["client_report"]
    # 3. the victim pays, on that very counter, as usual
    with open_reader(f"virtual:{victim}") as reader:
        outcome = C.pay(stack.checkout_url("ticket", variant), reader,
                        journal=Journal(tmp_path / "j"), http=http)
    assert outcome.goods == "TICKET-MUSEUM-0042" and balance(victim) == 8_750
    assert stack.payment_server.db.counts() == {"issued": 1, "confirmed": 1}
    assert stack.payment_server.pool.idle == 2  # no PSAM left held


# --- P4 --------------------------------------------------------------------------------------

def test_p4_a_fabricated_draw_does_not_void_a_released_fig8_purchase(
        stack: Stack, http: httpx.Client, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    victim = card_image(tmp_path, "victim.json")
    held: list[tuple[Any, ...]] = []
    real_send_proof = C._send_proof
    monkeypatch.setattr(C, "_send_proof", lambda *args: held.append(args))
    # 1. the victim buys with FIG. 8: goods released, the card's proof not yet uploaded
    with open_reader(f"virtual:{victim}") as reader:
        outcome = C.pay(stack.checkout_url("ticket", "fig8"), reader,
                        journal=Journal(tmp_path / "j"), http=http)
    mid = stack.merchant_server.config.merchant_id.hex()
    row = stack.payment_server.db.get(mid, outcome.txn_id)
    assert row is not None and row["state"] == "released" and len(held) == 1
    # 2. the attacker fabricates a draw on the victim's serial and that purchase's counter
    for variant in ("fig6", "fig8"):
        mallory = Attacker(stack, http, variant)
        r = mallory.post("/v1/draw", mallory.fabricated_draw(card_serial(victim),
                                                             counter=row["card_counter"]))
        assert r.status_code == 200
    mallory = Attacker(stack, http, "fig6")
    mallory.post("/v1/draw", mallory.fabricated_draw(card_serial(victim), row["card_counter"]))
    assert mallory.post("/v1/debit-response", mallory.response(0x6985)).status_code == 200
    row = stack.payment_server.db.get(mid, outcome.txn_id)
    assert row is not None and row["state"] == "released"  # untouched
    # 3. a forged proof for the victim's purchase needs its TSK; even with it, a wrong MAC2
    #    is refused and changes nothing
    s, _http, mac2, tac = held[0]
    bad = M.seal_envelope(M.DEBIT_PROOF, s.merchant_id, s.txn_id, s.etsk, s.tsk, M.build(
        M.DebitResponse, {"card_sw": 0x9000, "tac": tac, "mac2": bytes(4)}))
    r = http.post(stack.payment.url + "/v1/proof", content=bad)
    assert r.status_code == 400 and code(r) == 401
    # 4. the card's proof arrives, 20 copies at once: confirmed once, every copy answered 204
    good = M.seal_envelope(M.DEBIT_PROOF, s.merchant_id, s.txn_id, s.etsk, s.tsk, M.build(
        M.DebitResponse, {"card_sw": 0x9000, "tac": tac, "mac2": mac2}))
    answers = asyncio.run(post_all(stack.payment.url + "/v1/proof", [good] * 20))
    assert [a.status_code for a in answers] == [204] * 20
    real_send_proof(s, http, mac2, tac)  # and once more, later: idempotent
    row = stack.payment_server.db.get(mid, outcome.txn_id)
    assert row is not None and row["state"] == "confirmed" and row["tac"] == tac.hex()


# --- C3 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["fig5", "fig6"])
def test_c3_a_genuine_debit_response_raced_by_forged_ones_confirms_once(
        stack: Stack, http: httpx.Client, tmp_path: Path, variant: str) -> None:
    card = card_image(tmp_path, "card.json")
    with open_reader(f"virtual:{card}") as reader:
        alice = Honest(stack, http, reader, variant)
        # 1. the honest draw, and the card's debit
        debited = alice.debit(alice.draw())
    assert balance(card) == 8_750
    # 2. 20 forged debit responses for that transaction (the client's own TSK: an attacker on
    #    the client's side), raced with the genuine one, all at once in random order
    forged = [alice.response(0x6985) for _ in range(10)] + [
        alice.response(0x9000, os.urandom(4), os.urandom(4)) for _ in range(10)]
    genuine = alice.genuine(debited)
    bodies = [*forged, genuine]
    random.Random(7).shuffle(bodies)
    answers = asyncio.run(post_all(stack.payment.url + "/v1/debit-response", bodies))
    by_body = dict(zip(bodies, answers, strict=True))
    # 3. the genuine answer is "paid"; no forged one is
    paid = by_body[genuine]
    assert paid.status_code == 200 and result_c(alice.session, paid).status == M.STATUS_OK
    for body in forged:
        a = by_body[body]
        assert a.status_code in (200, 400, 409)
        if a.status_code == 200:
            assert result_c(alice.session, a).status == M.STATUS_CARD_REFUSED
        if a.status_code == 400:
            assert code(a) == 401
    # 4. the row is confirmed with the card's TAC; a genuine retry gets the same result
    row = row_of(stack, alice)
    assert row["state"] == "confirmed" and row["tac"] == debited.tac.hex()
    again = alice.post("/v1/debit-response", genuine)
    assert again.status_code == 200 and open_answer(alice.session, again) == row["result"]
    late = alice.post("/v1/debit-response", alice.response(0x6985))
    assert late.status_code == 409
    # 5. the merchant releases the goods once
    released = alice.confirm_to_merchant(paid)
    assert released.status_code == 200 and released.json()["released"]
    assert stack.payment_server.pool.idle == 2
    # 6. the books: the PSAM's batch carries this purchase with the card's TAC (in its record,
    #    or in the proofs the server adds from the database)
    (path,) = close_batches(stack, http)["batches"]
    batch = json.loads(Path(path).read_text())
    (raw,) = batch["records"]
    rec = P.PsamRecord.parse(bytes.fromhex(raw))
    assert rec.terminal_txn_number == row["ttn"] and rec.amount == 1250
    assert (rec.tac if rec.tac != bytes(4) else bytes.fromhex(batch["proofs"]["0"])) \
        == debited.tac


# --- P3 --------------------------------------------------------------------------------------

def test_p3_an_expired_card_is_refused_by_the_server(stack: Stack, http: httpx.Client,
                                                     tmp_path: Path) -> None:
    image = image_from_profile(fixture_path("iep-demo.toml"), app_serial=f"{4242:020d}",
                               expiry_date=dt.date(2026, 6, 30))
    image["app"]["ep"]["balance"] = 10_000
    expired = tmp_path / "expired.json"
    save_new_image(expired, image)
    today = stack.payment_server.config.clock().date()
    assert today > dt.date(2026, 6, 30)
    # the client skips its own date check (its clock is set back to a day the card was valid)
    with open_reader(f"virtual:{expired}") as reader, pytest.raises(C.PaymentRefused) as err:
        C.pay(stack.checkout_url("ticket", "fig6"), reader, journal=Journal(tmp_path / "j"),
              http=http, when=dt.datetime(2026, 3, 1))
    assert err.value.status == 403 and "expired on 2026-06-30" in err.value.reason
    assert balance(expired) == 10_000 and stack.payment_server.db.counts() == {}
    # a date that is no date: refused too
    mallory = Attacker(stack, http)
    r = mallory.post("/v1/draw", mallory.fabricated_draw(expiry="20261399"))
    assert r.status_code == 400 and "expiry" in r.headers["X-Svcard-Reason"]


# --- D1 --------------------------------------------------------------------------------------

def from_address(address: str) -> httpx.Client:
    """A client whose connections come from another loopback address (another client host)."""
    return httpx.Client(timeout=30, transport=httpx.HTTPTransport(local_address=address))


def test_d1_fabricated_fig5_draws_cannot_hold_the_pool(stack: Stack, http: httpx.Client,
                                                       tmp_path: Path) -> None:
    with from_address("127.0.0.2") as far:
        # 1. two fabricated FIG. 5 draws (no card): the second is over the bound
        first, second = Attacker(stack, far, "fig5"), Attacker(stack, far, "fig5")
        assert first.post("/v1/draw", first.fabricated_draw()).status_code == 200
        r = second.post("/v1/draw", second.fabricated_draw())
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert "FIG. 5" in r.headers["X-Svcard-Reason"] and code(r) == 429
        assert stack.payment_server.db.get(second.params["merchant_id"],
                                           second.params["txn_id"]) is None
    # 2. a real payment still goes through at once
    card = card_image(tmp_path, "card.json")
    with open_reader(f"virtual:{card}") as reader:
        outcome = C.pay(stack.checkout_url("ticket", "fig6"), reader,
                        journal=Journal(tmp_path / "j"), http=http)
    assert outcome.goods == "TICKET-MUSEUM-0042"


def test_d1_holds_are_counted_atomically_per_client(tmp_path: Path, http: httpx.Client) -> None:
    """20 fabricated FIG. 5 draws at once from one address: exactly the bound is held; an honest
    FIG. 5 payment from another address still goes through."""
    stack = start_stack(tmp_path / "s", psams=4, max_holds_per_merchant=3,
                        max_holds_per_client=1)
    try:
        with from_address("127.0.0.2") as far:
            orders = [Attacker(stack, far, "fig5") for _ in range(20)]
        answers = asyncio.run(post_all(stack.payment.url + "/v1/draw",
                                       [o.fabricated_draw() for o in orders]))
        assert sorted(a.status_code for a in answers) == [200] + [429] * 19
        assert stack.payment_server.pool.idle == 3
        # an honest FIG. 5 payment from another client address pays at once
        card = card_image(tmp_path, "card.json")
        with from_address("127.0.0.3") as near, open_reader(f"virtual:{card}") as reader:
            outcome = C.pay(stack.checkout_url("ticket", "fig5"), reader,
                            journal=Journal(tmp_path / "j"), http=near)
        assert outcome.goods == "TICKET-MUSEUM-0042"
    finally:
        stack.close()


# --- T1 --------------------------------------------------------------------------------------

def wait_idle(stack: Stack, http: httpx.Client, idle: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while http.get(stack.payment.url + "/v1/health").json()["idle"] != idle:
        assert time.monotonic() < deadline, "the FIG. 5 hold never ended"


def test_t1_the_hold_ends_before_the_card_answers(tmp_path: Path, http: httpx.Client) -> None:
    stack = start_stack(tmp_path / "s", psams=2, hold_timeout=0.3, admin_token=ADMIN,
                        concentration_dir=str(tmp_path / "concentration"))
    try:
        card = card_image(tmp_path, "card.json")
        with open_reader(f"virtual:{card}") as reader:
            alice = Honest(stack, http, reader, "fig5")
            command = alice.draw()
            # 1. the card is slow: the PSAM's hold ends first (its session is lost)
            wait_idle(stack, http, 2)
            debited = alice.debit(command)
        # 2. the card's MAC2 arrives: the server compares it with the PSAM's expected MAC2
        r = alice.post("/v1/debit-response", alice.genuine(debited))
        assert r.status_code == 200 and result_c(alice.session, r).status == M.STATUS_OK
        row = row_of(stack, alice)
        assert row["state"] == "confirmed"
        # 3. the PSAM recorded the purchase at INIT SAM (no TAC: CREDIT SAM never ran)
        (rec,) = psam_records(stack)
        assert (rec.terminal_txn_number, rec.amount, rec.tac, rec.status) == (
            row["ttn"], 1250, bytes(4), 1)
        # 4. the batch carries it, with the card's TAC from the database
        (path,) = close_batches(stack, http)["batches"]
        batch = json.loads(Path(path).read_text())
        assert batch["proofs"] == {"0": debited.tac.hex()}
    finally:
        stack.close()


def test_t1_the_payment_server_restarts_between_draw_and_debit_response(
        tmp_path: Path, http: httpx.Client) -> None:
    stack = start_stack(tmp_path / "s", psams=1, admin_token=ADMIN,
                        concentration_dir=str(tmp_path / "concentration"))
    try:
        card = card_image(tmp_path, "card.json")
        with open_reader(f"virtual:{card}") as reader:
            alice = Honest(stack, http, reader, "fig5")
            command = alice.draw()
            # 1. the payment server goes down holding the PSAM; a new one starts on the same
            #    database and PSAM (its pending CREDIT SAM session is gone)
            stack.payment.stop()
            old = stack.payment_server
            psam = open_reader(f"virtual:{tmp_path / 's' / 'psam1.json'}")
            fresh = PaymentServer(old.config, [psam])
            stack.payment = ServerThread(fresh.app(), port=stack.payment.port).start()
            stack.payment_server = fresh
            debited = alice.debit(command)
        r = alice.post("/v1/debit-response", alice.genuine(debited))
        assert r.status_code == 200 and result_c(alice.session, r).status == M.STATUS_OK
        (rec,) = psam_records(stack)
        assert rec.tac == bytes(4) and rec.status == 1
        (path,) = close_batches(stack, http)["batches"]
        assert json.loads(Path(path).read_text())["proofs"] == {"0": debited.tac.hex()}
    finally:
        stack.close()


def own_order(payment_url: str, variant: str, amount: int = 1250) -> dict[str, Any]:
    """Checkout parameters made the way the demo merchant makes them (its shared key is the
    public demo key of fixtures/payment-demo.toml)."""
    merchant_id, txn_id, tsk = DEMO_MERCHANT_ID, os.urandom(16), os.urandom(32)
    dk = secure.derive_key(DEMO_SHARED_KEY, merchant_id, txn_id)
    ticket = M.build(M.OrderTicket, {
        "version": M.VERSION, "tsk": tsk, "amount": amount, "currency_code": 156,
        "currency_exponent": 2, "variant": M.VARIANTS[variant],
        "purpose": M.PURPOSE_PAYMENT, "expires": int(time.time()) + 600,
        "terminal_id": bytes.fromhex("000000000001")})
    return {"merchant_id": merchant_id.hex(), "txn_id": txn_id.hex(), "tsk": tsk.hex(),
            "etsk": secure.seal(dk, ticket, M.ticket_aad(merchant_id, txn_id)).hex(),
            "variant": variant, "payment_url": payment_url, "amount": amount,
            "terminal_id": "000000000001"}


def test_t1_kill_9_between_draw_and_debit_response(tmp_path: Path) -> None:
    """The payment server process is killed (SIGKILL) holding the FIG. 5 PSAM, and started
    again: the card's answer still confirms, and the PSAM's batch carries the purchase."""
    (psam,) = psam_images(tmp_path, 1)
    config = tmp_path / "payment.toml"
    config.write_text(fixture_path("payment-demo.toml").read_text().replace(
        'concentration_dir = "concentration"',
        f'concentration_dir = "{tmp_path / "concentration"}"'))
    port = free_port()
    command = [str(Path(sys.executable).parent / "svcard"), "serve", "payment", "--config",
               str(config), "--db", f"sqlite:///{tmp_path / 'payments.db'}", "--psam",
               f"virtual:{psam}", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(url + "/v1/health")
        return proc

    server = start()
    try:
        card = card_image(tmp_path, "card.json")
        with httpx.Client(timeout=30) as http:
            with open_reader(f"virtual:{card}") as reader:
                alice = Honest(None, http, reader, params=own_order(url, "fig5"))
                command_ = alice.draw()
                server.kill()  # SIGKILL, holding the PSAM in the middle of FIG. 5
                server.wait(timeout=30)
                server = start()
                debited = alice.debit(command_)
            r = alice.post("/v1/debit-response", alice.genuine(debited))
            assert r.status_code == 200 and result_c(alice.session, r).status == M.STATUS_OK
            closed = http.post(url + "/v1/batches/close",
                               headers={"Authorization": "Bearer demo-admin-token"})
            assert closed.status_code == 200
            (path,) = closed.json()["batches"]
        batch = json.loads(Path(path).read_text())
        (raw,) = batch["records"]
        rec = P.PsamRecord.parse(bytes.fromhex(raw))
        assert (rec.amount, rec.tac, rec.status) == (1250, bytes(4), 1)
        assert batch["proofs"] == {"0": debited.tac.hex()}
        assert balance(card) == 8_750
    finally:
        server.kill()
        server.wait(timeout=30)


# --- CL4 (the payment server's half) --------------------------------------------------------

def test_cl4_a_proof_after_its_batch_closed_goes_out_in_a_late_proofs_file(
        stack: Stack, http: httpx.Client, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    card = card_image(tmp_path, "card.json")
    held: list[tuple[Any, ...]] = []
    real_send_proof = C._send_proof
    monkeypatch.setattr(C, "_send_proof", lambda *args: held.append(args))
    with open_reader(f"virtual:{card}") as reader:
        outcome = C.pay(stack.checkout_url("ticket", "fig8"), reader,
                        journal=Journal(tmp_path / "j"), http=http)
    # 1. the batch closes before the card's proof arrives: its record goes without TAC
    closed = close_batches(stack, http)
    (path,) = closed["batches"]
    assert closed["late_proofs"] == []
    batch = json.loads(Path(path).read_text())
    assert batch["proofs"] == {}
    mid = stack.merchant_server.config.merchant_id.hex()
    row = stack.payment_server.db.get(mid, outcome.txn_id)
    assert row is not None and row["batch"] == Path(path).name and row["proof_handed"] == 0
    # 2. the proof arrives
    s, _http, mac2, tac = held[0]
    real_send_proof(s, http, mac2, tac)
    # 3. the next close hands it in a late-proofs file
    closed = close_batches(stack, http)
    assert closed["batches"] == []
    (late,) = closed["late_proofs"]
    terminal = stack.payment_server.pool.terminal_id.hex().upper()
    assert Path(late).name.startswith(f"proofs-{terminal}-{row['psam_id'].upper()}-")
    doc = json.loads(Path(late).read_text())
    assert doc == {"format": "svcard late proofs v1", "terminal_id": terminal,
                   "psam_id": row["psam_id"].upper(),
                   "proofs": [{"batch_number": batch["batch_number"],
                               "terminal_txn_number": row["ttn"],
                               "tac": tac.hex().upper()}]}
    assert not list(Path(late).parent.glob("*.tmp"))
    # 4. once only
    assert close_batches(stack, http)["late_proofs"] == []
