"""The local card helper (``svcard helper``, issue 10 point 7): its guards (loopback only, the
Origin allow-list, the pairing token, bounded bodies, one payment at a time) and payments through
it against the real stack (payment server with PSAMs, merchant, SQLite) on loopback."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from svcard.card.image import save_new_image
from svcard.card.storage import read_image
from svcard.host.demo.system import card_image
from svcard.host.helper.app import CardHelper
from svcard.host.helper.cli import helper_cmd
from svcard.host.helper.pairing import (
    PairingError,
    is_loopback_host_header,
    load_or_create_token,
    normalise_origin,
)
from svcard.host.helper.payments import HelperCard
from svcard.host.kit.serving import ServerThread, free_port
from svcard.host.pay.merchant.server import MerchantServer
from svcard.host.pay.stack import Stack
from svcard.host.terminal.journal import Journal
from svcard.protocols import purse as P

FOREIGN = "http://evil.example"
TOKEN = "A" * 43          # the tests' pairing token (a real one is secrets.token_urlsafe(32))


@dataclass
class Helper:
    """A card helper served on loopback for a test."""

    helper: CardHelper
    server: ServerThread
    token: str

    @property
    def url(self) -> str:
        return self.server.url

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def close(self) -> None:
        self.helper.payments.wait_idle(30)
        self.server.stop()


def start_helper(card: HelperCard, origins: list[str], token: str = TOKEN) -> Helper:
    helper = CardHelper(card, token, origins)
    return Helper(helper, ServerThread(helper.app()).start(), token)


def wait_job(http: httpx.Client, h: Helper, job_id: str, timeout: float = 30.0,
             ) -> dict[str, Any]:
    """Poll the helper until the payment is final; its last state."""
    deadline = time.monotonic() + timeout
    while True:
        view: dict[str, Any] = http.get(f"{h.url}/v1/pay/{job_id}", headers=h.auth()).json()
        if view["state"] in ("paid", "pending", "refused", "failed"):
            return view
        assert time.monotonic() < deadline, f"payment still {view} after {timeout:g} s"
        time.sleep(0.02)


def balance(card: Path, purse: str = "ep") -> int:
    return int(read_image(card)["app"][purse]["balance"])


@pytest.fixture
def helper(stack: Stack, card: Path, tmp_path: Path) -> Iterator[Helper]:
    h = start_helper(HelperCard(f"virtual:{card}", tmp_path / "journal.jsonl",
                                terminal=stack.client_terminal), [stack.merchant.url])
    yield h
    h.close()


def pay(http: httpx.Client, h: Helper, url: str, origin: str | None = None) -> httpx.Response:
    headers = h.auth() | ({"Origin": origin} if origin else {})
    return http.post(f"{h.url}/v1/pay", json={"checkout_url": url}, headers=headers)


def test_a_foreign_origin_is_refused_403_without_cors_headers(
        stack: Stack, helper: Helper, card: Path, http: httpx.Client) -> None:
    url = stack.checkout_url()
    for request in (
            lambda: pay(http, helper, url, FOREIGN),
            lambda: http.get(f"{helper.url}/v1/hello", headers=helper.auth() | {
                "Origin": FOREIGN}),
            lambda: http.options(f"{helper.url}/v1/pay", headers={
                "Origin": FOREIGN, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type"}),
            lambda: pay(http, helper, url, "null"),
            # the allowed origin's host with another port or scheme is another origin
            lambda: pay(http, helper, url, stack.merchant.url.replace("http:", "https:")),
            lambda: pay(http, helper, url, f"http://localhost:{stack.merchant.port}")):
        r = request()
        assert r.status_code == 403, r.text
        assert "does not accept payments from that page" in r.json()["reason"]
        assert not [k for k in r.headers if k.lower().startswith("access-control-")]
    assert helper.helper.refused == 6
    # nothing ran: no order at the merchant, the card untouched
    assert stack.merchant_server.db.counts() == {} and balance(card) == 10_000
    # the allowed origin: a preflight answered for exactly that origin, never "*"
    r = http.options(f"{helper.url}/v1/pay", headers={
        "Origin": stack.merchant.url, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
        "Access-Control-Request-Private-Network": "true"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == stack.merchant.url
    assert r.headers["access-control-allow-private-network"] == "true"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()


def test_a_page_under_a_dns_name_pointed_at_loopback_is_refused(helper: Helper,
                                                                http: httpx.Client) -> None:
    # DNS rebinding: the page's own name resolves to 127.0.0.1, so it is "same origin"
    r = http.get(f"{helper.url}/v1/hello", headers=helper.auth() | {
        "Host": f"attacker.example:{helper.server.port}"})
    assert r.status_code == 403 and "Host" in r.json()["reason"]
    assert http.get(f"{helper.url}/v1/hello", headers=helper.auth() | {
        "Host": f"localhost:{helper.server.port}"}).status_code == 200
    assert [is_loopback_host_header(h) for h in (
        "127.0.0.1:1", "[::1]:8790", "localhost", "127.0.0.1.nip.io:1", "", "evil:80")] == [
        True, True, True, False, False, False]


def test_a_missing_or_wrong_token_is_401(stack: Stack, helper: Helper, card: Path,
                                         http: httpx.Client) -> None:
    origin = {"Origin": stack.merchant.url}
    checks = [("GET", "/v1/hello", None), ("POST", "/v1/pay", {"checkout_url":
                                                                stack.checkout_url()}),
              ("GET", f"/v1/pay/{'0' * 32}", None)]
    for method, path, body in checks:
        for headers in ({}, helper.auth("B" * 43), {"Authorization": "Basic " + TOKEN},
                        {"Authorization": TOKEN}, helper.auth(TOKEN + "x")):
            r = http.request(method, helper.url + path, json=body, headers=headers | origin)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
            # the page may read the 401 (its own origin), so it can ask to pair again
            assert r.headers["access-control-allow-origin"] == stack.merchant.url
    assert stack.merchant_server.db.counts() == {} and balance(card) == 10_000
    r = http.get(f"{helper.url}/v1/hello", headers=helper.auth() | origin)
    assert r.status_code == 200 and r.json() == {"helper": "svcard", "paired": True,
                                                 "busy": False}
    assert http.get(f"{helper.url}/v1/pay/{'0' * 32}", headers=helper.auth()).status_code == 404


@pytest.mark.parametrize("variant", ["fig5", "fig6", "fig7", "fig8"])
def test_a_payment_through_the_helper(stack: Stack, helper: Helper, card: Path,
                                      http: httpx.Client, variant: str) -> None:
    r = pay(http, helper, stack.checkout_url("ticket", variant), stack.merchant.url)
    assert r.status_code == 202, r.text
    started = r.json()
    assert started["poll"] == f"/v1/pay/{started['id']}"
    view = wait_job(http, helper, started["id"])
    assert view["state"] == "paid", view
    assert view["goods"] == "TICKET-MUSEUM-0042" and view["amount"] == 1250
    assert view["variant"] == variant and view["currency_exponent"] == 2
    assert view["proven"] is (variant != "fig7")
    assert view["receipt"]["amount"] == 1250 and view["receipt"]["txn_id"] == view["txn_id"]
    assert balance(card) == 8_750
    order = stack.merchant_server.orders[bytes.fromhex(view["txn_id"])]
    assert order.state == ("released_unproven" if variant == "fig7" else "paid")
    # the helper's answers hold no key: no TSK, ETSK or the shared key
    assert "tsk" not in str(view).lower() and stack.shared_key.hex() not in str(view)


def test_a_refusal_is_reported_and_the_open_order_is_swept(stack: Stack, tmp_path: Path,
                                                          http: httpx.Client) -> None:
    poor = card_image(tmp_path, "poor.json", ep=1_000)   # CNY 10.00 for a CNY 12.50 ticket
    h = start_helper(HelperCard(f"virtual:{poor}", tmp_path / "j.jsonl"),
                     [stack.merchant.url])
    try:
        view = wait_job(http, h, pay(http, h, stack.checkout_url()).json()["id"])
    finally:
        h.close()
    assert view["state"] == "refused", view
    assert "balance is too low" in view["message"] and "Nothing was paid" in view["message"]
    assert "goods" not in view and balance(poor) == 1_000
    # the helper's checkout made an order in the merchant's database; it stays open until
    # its time is over, and the expiry sweep deletes it
    assert stack.merchant_server.db.counts() == {"open": 1}
    assert stack.merchant_server.db.sweep(int(time.time() * 1000)) == 0
    assert stack.merchant_server.db.sweep(int(time.time() * 1000) + 3_600_000) == 1
    assert stack.merchant_server.db.counts() == {}


def test_one_payment_at_a_time(stack: Stack, card: Path, tmp_path: Path,
                               http: httpx.Client) -> None:
    # a slow card (20 ms per APDU) keeps the first payment under way
    h = start_helper(HelperCard(f"delayed:20:virtual:{card}", tmp_path / "j.jsonl"),
                     [stack.merchant.url])
    try:
        first = pay(http, h, stack.checkout_url())
        assert first.status_code == 202
        second = pay(http, h, stack.checkout_url())
        assert second.status_code == 409 and "busy" in second.json()["reason"]
        assert http.get(f"{h.url}/v1/hello", headers=h.auth()).json()["busy"] is True
        assert wait_job(http, h, first.json()["id"])["state"] == "paid"
        again = pay(http, h, stack.checkout_url())
        assert again.status_code == 202
        assert wait_job(http, h, again.json()["id"])["state"] == "paid"
    finally:
        h.close()
    assert balance(card) == 10_000 - 2 * 1250


def test_a_page_pays_only_its_own_shop_and_bodies_are_bounded(
        stack: Stack, helper: Helper, card: Path, tmp_path: Path, http: httpx.Client) -> None:
    other = "http://127.0.0.1:9"     # a second allowed shop
    h = start_helper(HelperCard(f"virtual:{card}", tmp_path / "j.jsonl"),
                     [stack.merchant.url, other])
    try:
        # the page of one allowed shop cannot make the helper pay another
        r = pay(http, h, stack.checkout_url(), other)
        assert r.status_code == 403 and "its own shop" in r.json()["reason"]
        # nor a shop no --allow-origin names (a client without Origin, e.g. curl)
        r = pay(http, h, "http://127.0.0.1:1/v1/checkout/ticket")
        assert r.status_code == 403
        for body, status, words in (
                (b"{" * 5000, 413, "at most 4096"),
                (b'{"checkout_url": 1}', 400, "checkout_url"),
                (b'{"checkout_url": "x", "amount": 1}', 400, "amount"),
                (b"[]", 400, "body"),
                (b'{"checkout_url": "file:///etc/passwd"}', 400, "http(s)"),
                (b'{"checkout_url": "' + b"h" * 3000 + b'"}', 400, "checkout_url"),
                (b"not json", 400, "JSON")):
            r = http.post(f"{h.url}/v1/pay", content=body, headers=h.auth() | {
                "Content-Type": "application/json"})
            assert r.status_code == status and words in r.json()["reason"], (body[:40], r.text)
    finally:
        h.close()
    assert stack.merchant_server.db.counts() == {} and balance(card) == 10_000


def test_the_ed_purse_pin_is_asked_by_the_helper(stack: Stack, tmp_path: Path,
                                                 http: httpx.Client) -> None:
    path = card_image(tmp_path, "ed.json")
    image = read_image(path)
    image["app"]["ed"]["balance"] = 5_000
    save_new_image(path, image, overwrite=True)
    asked: list[str] = []

    def pin() -> str:
        asked.append("pin")
        return "123456"

    for source, state in ((None, "refused"), (pin, "paid")):
        h = start_helper(HelperCard(f"virtual:{path}", tmp_path / "j.jsonl", P.PURSE_ED,
                                    source), [stack.merchant.url])
        try:
            view = wait_job(http, h, pay(http, h, stack.checkout_url()).json()["id"])
        finally:
            h.close()
        assert view["state"] == state, view
        if source is None:
            assert "PIN" in view["message"] and "--pin-file" in view["message"]
    assert asked == ["pin"] and balance(path, "ed") == 5_000 - 1250


def test_the_pairing_token_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "helper-token"
    token, made = load_or_create_token(path)
    assert made and len(token) == 43
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(path) == (token, False)
    renewed, made = load_or_create_token(path, renew=True)
    assert made and renewed != token and load_or_create_token(path) == (renewed, False)
    path.chmod(0o644)
    with pytest.raises(PairingError, match="others may read it"):
        load_or_create_token(path)
    path.chmod(0o600)
    path.write_text("short\n")
    with pytest.raises(PairingError, match="not a helper token"):
        load_or_create_token(path)
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(PairingError, match="link"):
        load_or_create_token(link)


def test_origins_are_exact(tmp_path: Path) -> None:
    assert normalise_origin("HTTP://Shop.Example:80/") == "http://shop.example"
    assert normalise_origin("https://shop.example:8443") == "https://shop.example:8443"
    for bad in ("*", "null", "https://*.example", "https://shop.example/pay", "shop.example",
                "ftp://shop.example", "https://user@shop.example", "https://shop.example?x"):
        with pytest.raises(PairingError):
            normalise_origin(bad)


def test_the_command_refuses_other_bind_addresses_and_wildcards(tmp_path: Path) -> None:
    base = ["--card", "virtual:card.json", "--token-file", str(tmp_path / "t")]
    runner = CliRunner()
    for args, words in (
            (["--allow-origin", "http://127.0.0.1:8081", "--host", "0.0.0.0"], "loopback only"),
            (["--allow-origin", "http://127.0.0.1:8081", "--host", "192.168.1.2"],
             "loopback only"),
            (["--allow-origin", "http://127.0.0.1:8081", "--host", "example.org"],
             "loopback only"),
            (["--allow-origin", "*"], "wildcard"),
            (["--allow-origin", "http://127.0.0.1:8081", "--port", "80000"], "80000"),
            ([], "--allow-origin")):
        result = runner.invoke(helper_cmd, base + args)
        assert result.exit_code == 2, (args, result.output)
        assert words in result.output, (args, result.output)
        assert "Traceback" not in result.output
    pin = tmp_path / "pin"
    pin.write_text("123456\n")
    pin.chmod(0o644)
    origin = ["--allow-origin", "http://127.0.0.1:8081"]
    for args, code, words in (
            (["--purse", "ed"], 2, "--pin-file"),     # no terminal to ask on, no PIN file
            (["--purse", "ed", "--pin-file", str(pin)], 3, "others may read it")):
        result = runner.invoke(helper_cmd, base + origin + args)
        assert result.exit_code == code and words in result.output, (args, result.output)
        assert "123456" not in result.output
    assert not (tmp_path / "t").exists()       # refused before the token is made


def test_the_command_pays_through_a_real_process(stack: Stack, card: Path, tmp_path: Path,
                                                 http: httpx.Client) -> None:
    """``svcard helper`` as a person runs it: the token printed and kept 0600, a payment, and
    SIGTERM during a second payment: that payment finishes, then the helper exits 0."""
    port, token_file = free_port(), tmp_path / "token"
    svcard = Path(sys.executable).with_name("svcard")
    process = subprocess.Popen(
        [str(svcard), "helper", "--card", f"delayed:15:virtual:{card}", "--allow-origin",
         stack.merchant.url, "--port", str(port), "--token-file", str(token_file),
         "--journal", str(tmp_path / "journal.jsonl")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "SVCARD_JOURNAL": str(tmp_path / "unused.jsonl")})
    try:
        deadline = time.monotonic() + 30
        while not token_file.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        token = token_file.read_text().strip()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        auth = {"Authorization": f"Bearer {token}"}
        url = f"http://127.0.0.1:{port}"
        wait_http_auth(url, token)
        r = http.post(f"{url}/v1/pay", json={"checkout_url": stack.checkout_url()},
                      headers=auth | {"Origin": stack.merchant.url})
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 30
        while (view := http.get(f"{url}/v1/pay/{r.json()['id']}", headers=auth).json()
               )["state"] not in ("paid", "refused", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert view["state"] == "paid" and view["goods"] == "TICKET-MUSEUM-0042"
        r = http.post(f"{url}/v1/pay", json={"checkout_url": stack.checkout_url("song")},
                      headers=auth)
        assert r.status_code == 202, r.text
    finally:
        process.terminate()
        _out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert token in err and "listening on http://127.0.0.1" in err and "Traceback" not in err
    assert balance(card) == 10_000 - 1250 - 99      # the second payment finished in the drain
    assert stack.merchant_server.db.counts() == {"paid": 2}
    # the journal named on the command line holds the payments
    assert (tmp_path / "journal.jsonl").exists() and not (tmp_path / "unused.jsonl").exists()


def wait_http_auth(url: str, token: str, timeout: float = 30.0) -> None:
    """Poll the helper's hello (with the token) until it answers 200."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/v1/hello", headers={"Authorization": f"Bearer {token}"},
                         timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer"
        time.sleep(0.02)



# --- a failure after the card's debit is pending, not refused ---------------------------------
class FakeFailingMerchant:
    """A stand-in in front of the real merchant, on the merchant's own address (so the
    checkout's status URL reaches it): it passes every request through, except that it answers
    the confirmation (``POST /v1/status/...``) with a 500 while :attr:`failures` is above 0 (one
    less each time), as a merchant whose database broke after the card paid would. A fake
    because no real merchant can be made to fail exactly the confirmation a chosen number of
    times."""

    def __init__(self, real_url: str, port: int) -> None:
        self.real_url, self.failures, self.failed = real_url, 0, 0

        async def forward(request: Request) -> Response:
            if (request.method == "POST" and request.url.path.startswith("/v1/status/")
                    and self.failures > 0):
                self.failures -= 1
                self.failed += 1
                return JSONResponse({"reason": "internal"}, status_code=500)
            async with httpx.AsyncClient(timeout=30) as client:
                answer = await client.request(
                    request.method, self.real_url + request.url.path,
                    params=request.query_params, content=await request.body(),
                    headers={k: v for k, v in request.headers.items() if k != "host"})
            headers = {k: v for k, v in answer.headers.items()
                       if k not in ("content-length", "transfer-encoding", "content-encoding")}
            return Response(answer.content, answer.status_code, headers)

        methods = ["GET", "HEAD", "POST", "OPTIONS"]
        self.server = ServerThread(Starlette(routes=[Route("/{path:path}", forward,
                                                           methods=methods)]), port=port)


@contextmanager
def merchant_behind_fake(stack: Stack) -> Iterator[FakeFailingMerchant]:
    """The stack's merchant moved to another port, a :class:`FakeFailingMerchant` on its own
    address in front of it (``stack.close`` stops the fake, this stops the merchant)."""
    port, config = stack.merchant.port, stack.merchant_server.config
    stack.merchant.stop()
    stack.merchant_server.close()
    stack.merchant_server = MerchantServer(config)
    real = ServerThread(stack.merchant_server.app()).start()
    fake = FakeFailingMerchant(real.url, port)
    stack.merchant = fake.server.start()
    try:
        yield fake
    finally:
        real.stop()


def test_a_merchant_error_after_the_debit_is_pending_and_finished_later(
        stack: Stack, card: Path, tmp_path: Path, http: httpx.Client) -> None:
    journal = tmp_path / "journal.jsonl"
    with merchant_behind_fake(stack) as fake:
        h = start_helper(HelperCard(f"virtual:{card}", journal), [stack.merchant.url])
        try:
            fake.failures = 1_000   # the confirmation fails, and so does the helper's retry
            view = wait_job(http, h, pay(http, h, stack.checkout_url()).json()["id"])
            assert view["state"] == "pending", view
            assert view["message"].startswith("The card was debited; the card helper will "
                                              "finish this payment: the merchant failed "
                                              "(internal)"), view
            assert "Do not pay again." in view["message"] and "refused" not in view["message"]
            assert fake.failed == 2         # the payment's confirmation and one retry now
            txn = view["txn_id"]
            assert balance(card) == 8_750
            assert Journal(journal).is_open(txn)
            assert Journal(journal).entries()[txn]["state"] == "confirmed"
            assert stack.merchant_server.orders[bytes.fromhex(txn)].state != "paid"
            assert not h.helper.payments.busy()

            # the merchant works again: the next payment finishes the pending one first
            fake.failures = 0
            view = wait_job(http, h, pay(http, h, stack.checkout_url()).json()["id"])
            assert view["state"] == "paid", view
            assert view["resumed"] == [{"txn_id": txn, "outcome": "completed"}]
            assert stack.merchant_server.orders[bytes.fromhex(txn)].state == "paid"
            assert not Journal(journal).is_open(txn)
            assert balance(card) == 7_500   # each order paid once

            # one failure only: the helper's retry right away finishes the payment
            fake.failures = 1
            view = wait_job(http, h, pay(http, h, stack.checkout_url()).json()["id"])
            assert view["state"] == "paid", view
            assert (view["goods"], view["amount"]) == ("TICKET-MUSEUM-0042", 1250)
            assert view["resumed"] == [{"txn_id": view["txn_id"], "outcome": "completed"}]
            assert fake.failed == 3 and balance(card) == 6_250
            assert stack.merchant_server.orders[bytes.fromhex(view["txn_id"])].state == "paid"
        finally:
            h.close()
