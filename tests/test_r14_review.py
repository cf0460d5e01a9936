"""Review of the wallet (issue 14, seed 003) as an attacker: odd input that must be refused
cleanly and bounded, on the links and the web server's API."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from test_wallet_attack import new_purchase, signed
from test_wallet_network import issue, member

from svcard.host.wallet.links import MAC, PARTY, STAMP
from svcard.host.wallet.stack import MALL, Browserless, WalletStack, start_wallet


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WalletStack]:
    s = start_wallet(tmp_path_factory.mktemp("wallet-r14"))
    yield s
    s.close()


@pytest.mark.parametrize("stamp", [b"\xb2", b"1\xb3", b"\xb9" * 3])
def test_a_link_time_of_latin1_superscript_digits_is_401_not_500(stack: WalletStack,
                                                                  stamp: bytes) -> None:
    """``str.isdigit`` is true for the superscripts a Latin-1 header carries, but ``int()``
    refuses them: the link check raised ValueError and the gateway answered 500."""
    with httpx.Client(timeout=30) as http:
        for url in (stack.url("gateway") + "/v1/approvals", stack.url("fin") + "/v1/topups",
                    stack.url("van") + "/v1/approvals"):
            party = b"AGENT1" if "/v1/topups" in url else MALL.encode()
            r = http.post(url, content=b"{}", headers=[(PARTY.encode(), party),
                                                       (STAMP.encode(), stamp),
                                                       (MAC.encode(), b"00" * 32)])
            assert r.status_code == 401, (url, r.status_code, r.text)


def test_a_trailing_newline_is_not_part_of_an_id(stack: WalletStack) -> None:
    """``re.match`` with ``$`` takes ``"alice\\n"``: a second member that shows as "alice"
    (and a statement file name with a newline); card numbers and order ids the same."""
    b = Browserless(stack)
    try:
        assert b.post("/api/register", {"member": "lookalike",
                                        "password": "long enough"}).status_code == 201
        r = b.post("/api/register", {"member": "lookalike\n", "password": "long enough"})
        assert r.status_code == 400, r.text
        assert b.post("/api/login", {"member": "lookalike\n",
                                     "password": "long enough"}).status_code == 400
    finally:
        b.close()
    with httpx.Client(timeout=30) as http:
        status, answer = stack.agent(http).post("/v1/topups", {
            "ref": "r14-nl", "card": "9" * 16 + "\n", "amount": 1, "currency": 156})
        assert status == 400, answer
        p = new_purchase()
        p["order"] += "\n"
        status, answer = stack.mall_link(http).post("/v1/approvals", p)
        assert status == 400, answer


def fill(stack: WalletStack, b: Browserless, card: str, p: dict[str, Any]) -> httpx.Response:
    return b.post("/api/fills", {"card": card, "purchase": signed(stack.mall_key, p),
                                 "return_url": f"{stack.url('mall')}/shop/?order={p['order']}"})


def test_open_purchases_per_member_are_bounded(stack: WalletStack) -> None:
    """A logged-in member could store purchases without end (a fill checks no secret and
    costs the gateway one row each): at most MAX_OPEN unpaid, unexpired ones per member."""
    from svcard.host.wallet.gateway.matching import MAX_OPEN
    b = member(stack, "r14-hoarder")
    try:
        card = issue(b)["number"]
        codes = [fill(stack, b, card, new_purchase()).status_code for _ in range(MAX_OPEN)]
        assert codes == [200] * MAX_OPEN
        r = fill(stack, b, card, new_purchase())
        assert r.status_code == 429, r.text
        # another member is not held back by it
        other = member(stack, "r14-other")
        try:
            assert fill(stack, other, issue(other)["number"],
                        new_purchase()).status_code == 200
        finally:
            other.close()
    finally:
        b.close()


def test_open_purchase_cap_counts_only_open_ones() -> None:
    """Expired or settled purchases do not count against the cap (a unit check on the DB
    step, without servers)."""
    from svcard.host.wallet.gateway import db as D
    from svcard.host.wallet.gateway import matching as X
    from svcard.host.wallet.links import purchase
    engine = D.make_engine("sqlite://")
    try:
        def one(expires_in: float) -> dict[str, Any]:
            return purchase(new_purchase(expires_in=expires_in))
        for _ in range(X.MAX_OPEN):
            assert X.store_choice(engine, "m", "9" * 16, one(-10)) is not None  # expired
        for _ in range(X.MAX_OPEN):
            assert X.store_choice(engine, "m", "9" * 16, one(300)) is not None
        with pytest.raises(Exception) as caught:
            X.store_choice(engine, "m", "9" * 16, one(300))
        assert getattr(caught.value, "status", None) == 429 or "429" in repr(caught.value)
        assert X.store_choice(engine, "n", "9" * 16, one(300)) is not None
    finally:
        engine.dispose()


def wallet_js(expression: str) -> Any:
    """``expression`` evaluated by node after the wallet page's script (a stub document)."""
    import json
    import shutil
    import subprocess
    from importlib import resources
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed")
    source = resources.files("svcard.host.wallet.web").joinpath(
        "static", "wallet.js").read_text()
    program = ("const vm = require('vm'); const ctx = {document: {addEventListener() {}}};"
               "vm.createContext(ctx); const out = vm.runInContext(process.argv[1] + "
               "'\\n;JSON.stringify(' + process.argv[2] + ')', ctx);"
               "process.stdout.write(out === undefined ? 'null' : out);")
    done = subprocess.run([node, "-e", program, source, expression], capture_output=True,
                          text=True, timeout=30, check=True)
    return json.loads(done.stdout)


def test_the_wallet_page_shows_amounts_in_each_currencys_exponent() -> None:
    """The page showed every currency with 2 decimals: 1000 yen (exponent 0) as "10.00", 1.234
    dinars (exponent 3) as "12.34": the member confirmed a payment 100x or 10x off."""
    shown = wallet_js("[money(1000, 392), money(1234, 48), money(1234, 156), money(5, 156),"
                      " money(-250, 978), money(7, 999)]")
    assert shown[:5] == ["JPY 1000", "BHD 1.234", "CNY 12.34", "CNY 0.05", "EUR -2.50"]
    assert "7" in shown[5] and "." not in shown[5]      # unknown: minor units, never scaled


def test_the_wallet_page_reads_amounts_in_each_currencys_exponent() -> None:
    """Typed amounts were always x100 (and the charge always in CNY)."""
    read = wallet_js("[minorUnits('10', 392), minorUnits('1.5', 392), minorUnits('1.234', 48),"
                     " minorUnits('12.34', 156), minorUnits('0.1', 156),"
                     " minorUnits('1.234', 156), minorUnits('x', 156)]")
    assert read == [10, None, 1234, 1234, 10, None, None]


@pytest.mark.parametrize(("currency", "typed", "minor"), [(392, "1000", 1000),
                                                          (48, "1.234", 1234),
                                                          (156, "12.34", 1234)])
def test_source_add_places_the_amount_in_the_fin_currencys_exponent(
        tmp_path: Any, currency: int, typed: str, minor: int) -> None:
    """``svcard wallet source add --amount 1000`` on a yen financial system opened an account
    holding 100000 yen (every amount was placed at exponent 2, as CNY)."""
    import os

    from click.testing import CliRunner

    from svcard.host.cli.main import main
    from svcard.host.wallet.fin import ledger as L
    from svcard.host.wallet.fin.db import make_engine
    config = tmp_path / "fin.toml"
    config.write_text(f'secret_key = "{"11" * 32}"\ncurrency = {currency}\n'
                      f'[[gateway]]\nid = "gateway"\nkey = "{"22" * 32}"\n')
    db = f"sqlite:///{tmp_path / 'fin.db'}"
    result = CliRunner().invoke(main, [
        "wallet", "source", "add", "account", "1000000000000009", "--config", str(config),
        "--db", db, "--amount", typed, "--secret-env", "R14_SECRET"],
        env={**os.environ, "R14_SECRET": "acct4321"})
    assert result.exit_code == 0, result.output
    engine = make_engine(db)
    try:
        found = L.source_state(engine, "account", "1000000000000009")
    finally:
        engine.dispose()
    assert found is not None and found["balance"] == minor and found["currency"] == currency


@pytest.mark.parametrize("cart", [[[["tea"], 1]], [[{"a": 1}, 1]], [[None, 1]]])
def test_the_demo_mall_refuses_an_unhashable_sku_with_400(stack: WalletStack,
                                                          cart: list[Any]) -> None:
    """``line[0] in PRICES`` on a list or an object raised TypeError: 500."""
    with httpx.Client(timeout=30) as http:
        r = http.post(stack.url("mall") + "/shop/orders", json={"cart": cart},
                      headers={"X-Mall": "1"})
    assert r.status_code == 400, (r.status_code, r.text)


def test_a_session_cookie_given_over_https_is_secure(tmp_path: Any) -> None:
    """``secure_cookie`` defaults to False for loopback; a web server reached over HTTPS that
    was not told so gave the session cookie without ``Secure`` (sent again over plain HTTP)."""
    from starlette.testclient import TestClient

    from svcard.host.wallet.config import WebConfig
    from svcard.host.wallet.web.app import HEADER, WebServer
    server = WebServer(WebConfig("http://127.0.0.1:9", b"k" * 32,
                                 db_url=f"sqlite:///{tmp_path / 'web.db'}"))
    try:
        with TestClient(server.app(), base_url="https://wallet.test") as client:
            client.headers[HEADER] = "1"
            body = {"member": "r14-https", "password": "long enough"}
            assert client.post("/api/register", json=body).status_code == 201
            r = client.post("/api/login", json=body)
            assert r.status_code == 200, r.text
            cookie = r.headers["set-cookie"].lower()
            assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
        with TestClient(server.app(), base_url="http://127.0.0.1") as client:
            client.headers[HEADER] = "1"
            r = client.post("/api/login", json=body)
            assert r.status_code == 200 and "secure" not in r.headers["set-cookie"].lower()
    finally:
        server.close()


def test_long_party_ids_fit_the_movements_on_postgresql() -> None:
    """A mall or agent id may have 40 characters, but ``wf_movements.source`` held 40 and the
    financial system writes ``mall:ID`` / ``agent:ID`` there: on PostgreSQL every debit for
    such a mall and every top-up by such an agent failed (SQLite does not check lengths)."""
    from pg_env import start_cluster

    from svcard.host.wallet.fin import ledger as L
    from svcard.host.wallet.fin.db import make_engine
    cluster = start_cluster()
    try:
        engine = make_engine(cluster.new_database())
        try:
            number, _, _ = L.issue_card(engine, "issue:r14", "virtual", 156, "ab" * 32,
                                        lambda n: "cd" * 32)
            assert number is not None
            top = L.move(engine, "cash:r14", "cash", number, "agent:" + "A" * 40, 500, 156,
                         "d1" * 32, None, 10**9)
            pay = L.move(engine, "pay:r14", "debit", number, "mall:" + "M" * 40, 200, 156,
                         "d2" * 32, None, 10**9, "order-1")
            assert (top.result, pay.result, pay.balance) == ("done", "done", 300)
        finally:
            engine.dispose()
    finally:
        cluster.stop()


def test_a_charge_sent_twice_with_its_ref_moves_money_once(stack: WalletStack) -> None:
    """The web server made a fresh ref for every ``/api/charges``: a double click or a POST
    the browser sent again after a dropped connection charged the account twice. The page's
    own ``ref`` (kept until an answer comes) now makes the second one a repeat; another
    member's same ref is a different charge."""
    account = "1000000000000014"
    stack.open_account(account, "acct1414", 10_000)
    b = member(stack, "r14-charger")
    try:
        card = issue(b)["number"]
        assert b.post("/api/links", {"kind": "account", "number": account,
                                     "secret": "acct1414"}).status_code == 200
        body = {"kind": "account", "card": card, "source": account, "amount": 700,
                "currency": 156, "ref": "r14-page-ref-0001"}
        first, second = b.post("/api/charges", body), b.post("/api/charges", body)
        assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
        assert second.json()["repeated"] and second.json()["balance"] == 700
        cards = {c["number"]: c["balance"] for c in b.wallet()["cards"]}
        assert cards[card] == 700
        assert b.post("/api/charges", {**body, "ref": "bad ref!"}).status_code == 400
        # without a ref: each request its own charge, as before
        body.pop("ref")
        assert b.post("/api/charges", body).status_code == 200
        assert {c["number"]: c["balance"] for c in b.wallet()["cards"]}[card] == 1_400
    finally:
        b.close()


def test_a_mall_asking_again_after_a_lost_answer_learns_its_order_is_paid(
        stack: WalletStack) -> None:
    """The answer to a mall's approval request lost (or the gateway restarted and finished the
    debit itself): the mall's exact request again got only 409 "approved already", and the
    demo mall showed the order as not paid while the card was debited. The 409 (still no
    second approval, no second debit) now says the state and the approval to that mall for its
    own exact purchase; a mutated one learns nothing."""
    from test_wallet_attack import choose
    b = member(stack, "r14-retry")
    try:
        card = issue(b)
        with httpx.Client(timeout=30) as http:
            status, _ = stack.agent(http).post("/v1/topups", {
                "ref": "r14-retry-cash", "card": card["number"], "amount": 5_000,
                "currency": 156})
            assert status == 200
            r = http.post(stack.url("mall") + "/shop/orders", headers={"X-Mall": "1"},
                          json={"cart": [["tea", 1]]})
            p = {k: v for k, v in r.json()["purchase"].items() if k != "signature"}
            assert choose(stack, b, card, p).status_code == 200
            status, first = stack.mall_link(http).post("/v1/approvals", p)  # answer "lost"
            assert status == 200 and first["approved"], first
            status, again = stack.mall_link(http).post("/v1/approvals", p)
            assert status == 409 and not again.get("approved"), again
            assert again.get("state") == "approved" and again.get("approval") == \
                first["approval"], again
            wrong = {**p, "nonce": "0" * 32}
            status, other = stack.mall_link(http).post("/v1/approvals", wrong)
            assert status == 409 and "state" not in other and "approval" not in other, other
            # the demo mall's page, asking again: paid
            shown = http.post(f"{stack.url('mall')}/shop/orders/{p['order']}/pay",
                              headers={"X-Mall": "1"}).json()
            assert shown["approved"] and shown["approval"] == first["approval"], shown
        cards = {c["number"]: c["balance"] for c in b.wallet()["cards"]}
        assert cards[card["number"]] == 5_000 - p["amount"]        # debited once
    finally:
        b.close()
