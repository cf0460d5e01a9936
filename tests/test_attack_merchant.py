"""The merchant server attacked (issue 9: M1, M3, D2, P2), over real HTTP on loopback, with real
SQLite and real crypto. Each test is the attacker's client, step by step."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from svcard.card.storage import read_image
from svcard.host.pay import client as C
from svcard.host.pay import client_terminal as CT
from svcard.host.pay.merchant.server import DEFAULT_VARIANTS
from svcard.host.pay.stack import Stack, start_stack
from svcard.host.terminal import apdus
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.purse import TerminalCheckFailed, select_purse
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import messages as M
from svcard.protocols import purse as P


def balance(card: Path) -> int:
    return int(read_image(card)["app"]["ep"]["balance"])


class Withheld(Exception):
    pass


class WithholdConfirmation(httpx.Client):
    """An honest payment whose confirmation the attacker keeps instead of sending."""

    kept: tuple[str, bytes] | None = None

    def post(self, url: Any, **kwargs: Any) -> httpx.Response:  # type: ignore[override]
        if "/v1/status/" in str(url):
            self.kept = (str(url), kwargs["content"])
            raise Withheld()
        return super().post(url, **kwargs)


def withheld_confirmation(stack: Stack, card: Path, tmp_path: Path,
                          variant: str = "fig6") -> tuple[str, bytes]:
    with WithholdConfirmation(timeout=30) as http, open_reader(f"virtual:{card}") as reader, \
            pytest.raises(Withheld):
        C.pay(stack.checkout_url("ticket", variant), reader,
              journal=Journal(tmp_path / "journal.jsonl"), http=http)
    assert http.kept is not None
    return http.kept


def post_at_once(url: str, body: bytes, copies: int) -> list[httpx.Response]:
    """``copies`` threads, each with its own connection, released together by a barrier."""
    barrier = threading.Barrier(copies)

    def one(_: int) -> httpx.Response:
        with httpx.Client(timeout=60) as http:
            http.get(url.split("/v1/")[0] + "/v1/catalogue")  # the connection is open
            barrier.wait()
            return http.post(url, content=body)

    with ThreadPoolExecutor(copies) as pool:
        return list(pool.map(one, range(copies)))


# --- M1 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["fig6", "fig8"])
def test_m1_twenty_concurrent_copies_of_a_confirmation_release_the_goods_once(
        stack: Stack, card: Path, tmp_path: Path, variant: str) -> None:
    # 1. an honest payment; the attacker keeps its (valid) confirmation
    url, confirmation = withheld_confirmation(stack, card, tmp_path, variant)
    assert balance(card) == 8_750
    # 2. 20 copies posted at the same instant: the order is released once (one receipt), and
    # every exact copy of the releasing confirmation is answered with those same goods
    answers = post_at_once(url, confirmation, 20)
    assert [r.status_code for r in answers] == [200] * 20
    assert {(r.json()["goods"], str(r.json()["receipt"])) for r in answers} == {
        ("TICKET-MUSEUM-0042", str(answers[0].json()["receipt"]))}
    # 3. and once more, later: the same goods again, nothing new
    again = httpx.post(url, content=confirmation, timeout=30)
    assert again.status_code == 200 and again.json()["receipt"] == answers[0].json()["receipt"]
    txn = bytes.fromhex(url.rsplit("/", 1)[1])
    assert stack.merchant_server.orders[txn].state == "paid"
    assert stack.merchant_server.db.counts() == {"paid": 1}
    # 4. an altered copy (any byte changed, or cut short) gets nothing: 409, no goods
    for altered in (confirmation[:-1] + bytes([confirmation[-1] ^ 1]), confirmation[:-1],
                    bytes([confirmation[0] ^ 0x80]) + confirmation[1:]):
        r = httpx.post(url, content=altered, timeout=30)
        assert r.status_code == 409 and "goods" not in r.json(), r.text
        assert "already used" in r.json()["reason"]


# --- M3 -----------------------------------------------------------------------------------
def test_m3_merchant_restarted_between_checkout_and_confirmation(
        stack: Stack, card: Path, tmp_path: Path) -> None:
    # checkout, then the card pays; the merchant restarts before the confirmation arrives
    url, confirmation = withheld_confirmation(stack, card, tmp_path, "fig5")
    open_order = C.fetch_checkout(httpx.Client(timeout=30), stack.checkout_url("song", "fig6"))
    stack.restart_merchant()
    r = httpx.post(url, content=confirmation, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["released"] and r.json()["goods"] == "TICKET-MUSEUM-0042"
    # restarted again: the paid order is still paid (a replay is refused), the open one open
    stack.restart_merchant()   # the exact repeat: the same goods; an altered one: nothing
    assert httpx.post(url, content=confirmation, timeout=30).json()["goods"] == r.json()["goods"]
    assert httpx.post(url, content=confirmation + b"\0", timeout=30).status_code == 409
    orders = stack.merchant_server.orders
    assert orders[bytes.fromhex(open_order["txn_id"])].state == "open"
    assert balance(card) == 8_750


def test_m3_restart_in_the_middle_of_an_honest_payment(stack: Stack, card: Path,
                                                       tmp_path: Path) -> None:
    class Restarting(httpx.Client):
        def post(self, url: Any, **kwargs: Any) -> httpx.Response:  # type: ignore[override]
            if "/v1/status/" in str(url):
                stack.restart_merchant()
            return super().post(url, **kwargs)

    with Restarting(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
        outcome = C.pay(stack.checkout_url("ticket", "fig8"), reader,
                        journal=Journal(tmp_path / "j"), http=http)
    assert outcome.goods == "TICKET-MUSEUM-0042" and outcome.proven


def order(http: httpx.Client, url: str) -> httpx.Response:
    """A client's order request: what :func:`svcard.host.pay.client.fetch_checkout` sends."""
    return http.post(url, headers=C.CLIENT_HEADER)


# --- D2 -----------------------------------------------------------------------------------
def order_rows(stack: Stack) -> int:
    engine = sa.create_engine(stack.merchant_server.config.db_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM orders")).scalar_one())
    finally:
        engine.dispose()


def test_d2_checkout_flood_is_bounded_and_expired_orders_are_swept(tmp_path: Path) -> None:
    stack = start_stack(tmp_path / "flood", psams=1, merchant_options={
        "max_open_orders": 40, "max_open_per_client": 40, "order_lifetime": 60,
        "confirm_grace": 60})
    try:
        url = stack.checkout_url("song", "fig6")
        with httpx.Client(timeout=30) as http:
            codes = [order(http, url).status_code for _ in range(300)]
            assert codes.count(200) == 40 and codes.count(503) == 260
            full = order(http, url)
            assert full.status_code == 503 and "too many open orders" in full.json()["reason"]
            assert 1 <= int(full.headers["Retry-After"]) <= 120
            assert order_rows(stack) == 40
            # two minutes later (the server's clock): the orders have expired and are swept
            stack.merchant_server.clock = lambda: time.time() + 121
            codes = [order(http, url).status_code for _ in range(300)]
            assert codes.count(200) == 40 and order_rows(stack) == 40
            assert stack.merchant_server.db.counts() == {"open": 40}
    finally:
        stack.close()


def test_d2_one_client_address_cannot_take_every_order(tmp_path: Path) -> None:
    stack = start_stack(tmp_path / "perclient", psams=1, merchant_options={
        "max_open_orders": 100, "max_open_per_client": 10})
    try:
        url = stack.checkout_url("song", "fig6")
        attacker = httpx.Client(timeout=30, transport=httpx.HTTPTransport(
            local_address="127.0.0.2"))
        with attacker, httpx.Client(timeout=30) as honest:
            codes = [order(attacker, url).status_code for _ in range(50)]
            assert codes.count(200) == 10 and codes.count(429) == 40
            r = order(attacker, url)
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert "open orders" in r.json()["reason"]
            assert order(honest, url).status_code == 200  # someone else still buys
    finally:
        stack.close()


# --- a third-party page makes no order (review finding 3) ----------------------------------
ORDERS_TAKEN = ("tsk", "etsk", "txn_id")


def test_no_order_from_a_request_a_browser_sends_cross_site(stack: Stack,
                                                            http: httpx.Client) -> None:
    """An ``<img>``, a link, a form or a ``no-cors`` fetch on someone else's page gets the
    checkout page, never an order: only a POST with the client header makes one."""
    url = stack.checkout_url("song", "fig6")
    accepts = ("*/*",                                                  # curl, httpx, <script>
               "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8",  # an <img>
               "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",  # a link
               "application/json",                                     # without the header
               "")
    for accept in accepts:
        for target in (url, f"{stack.merchant.url}/v1/checkout/ticket",
                       f"{stack.merchant.url}/v1/checkout/ticket?variant=fig7&terminal="
                       + "01" * 8):
            r = http.get(target, headers={"Accept": accept, "Origin": "https://elsewhere.example",
                                          "Sec-Fetch-Site": "cross-site"})
            assert r.status_code == 200, (accept, target, r.text)
            assert r.headers["content-type"].startswith("text/html"), accept
            assert not any(word in r.text for word in ORDERS_TAKEN), accept
    head = http.head(url, headers={"Accept": "*/*"})
    assert head.status_code == 200 and head.headers["content-type"].startswith("text/html")
    assert head.content == b""
    # what a cross-site form or a no-cors fetch can POST: no custom header
    for kind, body in (("application/x-www-form-urlencoded", b"variant=fig6"),
                       ("text/plain", b"x"), ("multipart/form-data; boundary=b", b"--b--\r\n")):
        r = http.post(url, content=body, headers={"Content-Type": kind, "Accept": "*/*",
                                                  "Origin": "https://elsewhere.example"})
        assert r.status_code == 403 and "X-Svcard-Client" in r.json()["reason"], kind
        assert not any(word in r.text for word in ORDERS_TAKEN)
    r = http.post(url, headers={"X-Svcard-Client": "0"})
    assert r.status_code == 403
    # the preflight a browser asks before sending the header is never granted
    r = http.options(url, headers={"Origin": "https://elsewhere.example",
                                   "Access-Control-Request-Method": "POST",
                                   "Access-Control-Request-Headers": "x-svcard-client"})
    assert r.status_code >= 400 and not any(h.startswith("access-control-") for h in r.headers)
    assert order_rows(stack) == 0 and stack.merchant_server.db.counts() == {}
    # svcard's clients: one order each, its parameters with the TSK
    params = C.fetch_checkout(http, url)
    assert params["variant"] == "fig6" and len(params["tsk"]) == 64
    r = order(http, url)
    assert r.status_code == 200 and r.json()["txn_id"] != params["txn_id"]
    assert order_rows(stack) == 2


def test_bounded_inputs(stack: Stack, http: httpx.Client) -> None:
    params = C.fetch_checkout(http, stack.checkout_url("song", "fig6"))
    r = http.post(params["status_url"], content=bytes(100_000))
    assert r.status_code == 413 and "at most" in r.json()["reason"]
    r = http.post(f"{stack.merchant.url}/v1/status/{'ab' * 400}", content=b"x")
    assert r.status_code == 400
    r = order(http, stack.checkout_url("song", "fig6") + "&terminal=zz")
    assert r.status_code == 400 and "terminal" in r.json()["reason"]
    assert stack.merchant_server.orders[bytes.fromhex(params["txn_id"])].state == "open"


# --- P2 -----------------------------------------------------------------------------------
def test_p2_fig7_is_refused_to_a_client_without_a_registered_terminal(
        stack: Stack, http: httpx.Client) -> None:
    base = f"{stack.merchant.url}/v1/checkout/ticket"
    r = order(http, base + "?variant=fig7")
    assert r.status_code == 403 and "registered client terminal" in r.json()["reason"]
    r = order(http, base + "?variant=fig7&terminal=0102030405060708")  # not registered
    assert r.status_code == 403
    r = order(http, base + "?variant=fig9")
    assert r.status_code == 400 and "fig5, fig6, fig7, fig8" in r.json()["reason"]
    assert stack.merchant_server.db.counts() == {}


def test_p2_a_merchant_without_fig7_never_uses_it(tmp_path: Path, card: Path,
                                                  http: httpx.Client) -> None:
    stack = start_stack(tmp_path / "nofig7", psams=1,
                        merchant_options={"variants": DEFAULT_VARIANTS})
    try:
        r = order(http, stack.checkout_url("ticket", "fig7"))  # names the registered terminal
        assert r.status_code == 400
        assert r.json()["reason"] == "variant: this merchant enables fig5, fig6, fig8"
        assert order(http, f"{stack.merchant.url}/v1/checkout/ticket").json()["variant"] == "fig6"
        # an honest client without a key, given a fig7 link, does not ask for it
        assert stack.client_terminal is not None
        CT.remove_terminal(stack.client_terminal)
        with open_reader(f"virtual:{card}") as reader:
            outcome = C.pay(f"{stack.merchant.url}/v1/checkout/ticket?variant=fig7", reader,
                            journal=Journal(tmp_path / "j"), http=http)
        assert outcome.variant == "fig6" and outcome.proven
    finally:
        stack.close()


def draw_without_debit(stack: Stack, card: Path, http: httpx.Client,
                       params: dict[str, Any]) -> Any:
    """The attacker's draw for a FIG. 7 order: the card is only read, never debited."""
    s = C._Session(params)
    with open_reader(f"virtual:{card}") as reader:
        info = select_purse(reader)
        init = P.InitForPurchaseAnswer.parse(reader.exchange(apdus.initialize(
            P.INIT_PURCHASE, P.PURSE_EP, 1, params["amount"],
            bytes.fromhex(params["terminal_id"]))).data)
    draw = M.build(M.DrawRequest, {
        "issuer_id": bytes.fromhex(info.issuer_id), "card_serial": info.serial_bytes,
        "algorithm_id": init.algorithm_id, "key_version": init.key_version,
        "expiry_date": bytes.fromhex(info.expiry_date), "balance": init.balance,
        "currency_code": info.currency_code or 0,
        "currency_exponent": info.currency_exponent or 0, "purse": P.PURSE_EP,
        "offline_counter": init.offline_counter, "amount": params["amount"],
        "random": init.random, "txn_type": P.TYPE_EP_PURCHASE})
    return M.parse(M.DebitCommand, s.post(http, "/v1/draw", M.DRAW_REQUEST, draw), "debit")


def confirmation(params: dict[str, Any], result_m: bytes, terminal_id: bytes,
                 signature: bytes, mac2: bytes = b"\x11\x22\x33\x44",
                 tac: bytes = b"\x55\x66\x77\x88") -> bytes:
    return M.build(M.Confirmation, {
        "version": M.VERSION, "variant": M.FIG7_CLIENT_COMPARES,
        "txn_id": bytes.fromhex(params["txn_id"]), "result_m": result_m, "card_mac2": mac2,
        "sealed_expected_mac2": b"", "terminal_id": terminal_id, "tac": tac,
        "signature": signature})


def test_p2_fig7_confirmations_not_signed_by_the_orders_terminal_are_refused(
        tmp_path: Path, card: Path, http: httpx.Client) -> None:
    other = CT.ClientTerminal.generate()          # a second registered terminal (the attacker)
    stranger = CT.ClientTerminal.generate()       # a key nobody registered
    stack = start_stack(tmp_path / "p2", psams=2)
    assert stack.client_terminal is not None
    honest = stack.client_terminal
    stack.merchant_server.terminal_keys[other.terminal_id] = (
        Ed25519PublicKey.from_public_bytes(other.public_key))
    try:
        # the attacker names the honest terminal's (public) id at checkout and gets FIG. 7
        url = stack.checkout_url("ticket", "fig7")
        params = order(http, url).json()
        assert params["variant"] == "fig7"
        debit = draw_without_debit(stack, card, http, params)   # result M at draw time
        mid, txn = bytes.fromhex(params["merchant_id"]), bytes.fromhex(params["txn_id"])
        status = params["status_url"]

        def post(body: bytes) -> httpx.Response:
            return http.post(status, content=body)

        # no signature at all
        r = post(confirmation(params, debit.result_m, honest.terminal_id, b""))
        assert r.status_code == 403 and "must be signed" in r.json()["reason"]
        # no terminal at all (the old confirmation)
        r = post(confirmation(params, debit.result_m, bytes(8), b""))
        assert r.status_code == 403
        # signed by a key nobody registered, claiming the honest id
        forged = stranger.sign_confirmation(mid, txn, debit.result_m, b"\x11\x22\x33\x44",
                                            b"\x55\x66\x77\x88")
        r = post(confirmation(params, debit.result_m, honest.terminal_id, forged))
        assert r.status_code == 403 and "does not verify" in r.json()["reason"]
        # signed by another registered terminal, in its own name
        theirs = other.sign_confirmation(mid, txn, debit.result_m, b"\x11\x22\x33\x44",
                                         b"\x55\x66\x77\x88")
        r = post(confirmation(params, debit.result_m, other.terminal_id, theirs))
        assert r.status_code == 403 and "named at checkout" in r.json()["reason"]
        # a genuine signature of the honest terminal, but for another order
        params2 = order(http, stack.checkout_url("ticket", "fig7")).json()
        elsewhere = honest.sign_confirmation(mid, bytes.fromhex(params2["txn_id"]),
                                             debit.result_m, b"\x11\x22\x33\x44",
                                             b"\x55\x66\x77\x88")
        r = post(confirmation(params, debit.result_m, honest.terminal_id, elsewhere))
        assert r.status_code == 403 and "does not verify" in r.json()["reason"]
        # a genuine signature over other MAC2/TAC than the confirmation carries
        signed = honest.sign_confirmation(mid, txn, debit.result_m, bytes(4), bytes(4))
        r = post(confirmation(params, debit.result_m, honest.terminal_id, signed))
        assert r.status_code == 403
        # nothing was released and the card was never debited
        assert stack.merchant_server.orders[txn].state == "open"
        assert balance(card) == 10_000
    finally:
        stack.close()


def test_p2_the_registered_terminal_gets_goods_released_unproven(
        stack: Stack, card: Path, tmp_path: Path, http: httpx.Client) -> None:
    with open_reader(f"virtual:{card}") as reader:
        outcome = C.pay(f"{stack.merchant.url}/v1/checkout/ticket?variant=fig7", reader,
                        journal=Journal(tmp_path / "j"), http=http,
                        terminal=stack.client_terminal)
    assert outcome.variant == "fig7" and outcome.goods == "TICKET-MUSEUM-0042"
    assert outcome.proven is False and outcome.receipt["proven"] is False
    order = stack.merchant_server.orders[bytes.fromhex(outcome.txn_id)]
    assert order.state == "released_unproven" and not order.proven
    # the card's proof reached the payment server after the goods (clearing pays on it)
    row = stack.payment_server.db.get(stack.merchant_server.config.merchant_id.hex(),
                                      outcome.txn_id)
    assert row is not None and row["tac"] is not None
    assert outcome.proof_uploads == 1 and balance(card) == 8_750


def test_p2_the_client_refuses_a_merchant_that_forces_fig7_on_it(
        stack: Stack, card: Path, tmp_path: Path, http: httpx.Client) -> None:
    """A client without a terminal key never pays FIG. 7, even if the merchant picks it."""
    url = stack.checkout_url("ticket", "fig7")
    with pytest.raises(TerminalCheckFailed, match=r"FIG\. 7"):
        C.fetch_checkout(http, url)  # the answer is FIG. 7 and this client has no key
    assert balance(card) == 10_000


def test_fig7_signature_is_bound_to_its_fields() -> None:
    t = CT.ClientTerminal.generate()
    mid, txn = b"MERCH001", bytes(range(16))
    sig = t.sign_confirmation(mid, txn, b"M", b"mac2", b"tac!")
    assert len(sig) == 64 and t.terminal_id == CT.fingerprint(t.public_key)
    assert "PRIVATE" not in repr(t)
    data = M.fig7_signed_data(mid, txn, b"M", b"mac2", b"tac!")
    Ed25519PublicKey.from_public_bytes(t.public_key).verify(sig, data)
    for changed in (M.fig7_signed_data(b"MERCH002", txn, b"M", b"mac2", b"tac!"),
                    M.fig7_signed_data(mid, txn, b"N", b"mac2", b"tac!"),
                    M.fig7_signed_data(mid, txn, b"M", b"mac2", b"tac?")):
        with pytest.raises(InvalidSignature):
            Ed25519PublicKey.from_public_bytes(t.public_key).verify(sig, changed)


# --- the same on PostgreSQL (READ COMMITTED) ----------------------------------------------
@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from pg_env import start_cluster

    c = start_cluster()
    yield c
    c.stop()


def test_m1_d2_m3_on_postgresql(cluster: Any, tmp_path: Path, card: Path) -> None:
    stack = start_stack(tmp_path / "pg", psams=2, merchant_db=cluster.new_database(),
                        merchant_options={"max_open_orders": 10})
    try:
        url, body = withheld_confirmation(stack, card, tmp_path, "fig6")
        stack.restart_merchant()
        answers = post_at_once(url, body, 20)   # released once; each exact copy: its goods
        assert [r.status_code for r in answers] == [200] * 20
        assert len({str(r.json()["receipt"]) for r in answers}) == 1
        assert httpx.post(url, content=body[:-1] + bytes([body[-1] ^ 1]),
                          timeout=30).status_code == 409
        # 20 concurrent checkouts for 9 free slots (one order is paid): exactly 9 open
        checkout = stack.checkout_url("song", "fig6")
        barrier = threading.Barrier(20)

        def one(_: int) -> int:
            with httpx.Client(timeout=60) as http:
                barrier.wait()
                return order(http, checkout).status_code

        with ThreadPoolExecutor(20) as pool:
            codes = list(pool.map(one, range(20)))
        assert codes.count(200) == 10 and codes.count(503) == 10
        assert stack.merchant_server.db.counts() == {"open": 10, "paid": 1}
    finally:
        stack.close()
