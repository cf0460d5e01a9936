"""A real card in the wallet (seed 003 with a chip card): charged through seed 002's load flow
with the gateway in the bank's role, and paying a mall (embodiment 1) by its own purse purchase
through the local card helper, the gateway approving only on that purchase's evidence.

Real servers on loopback: the wallet's (financial system, gateway, web server, demo mall), seed
002's payment server with its PSAM pool and its load server with its HSM, and ``svcard
helper`` holding the real card image the financial system "mailed"."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_wallet_network import issue, member

from svcard.host.helper.app import CardHelper
from svcard.host.helper.payments import HelperCard
from svcard.host.kit.serving import ServerThread
from svcard.host.load.stack import DEMO_BANK_ID, DEMO_LOAD_TERMINAL, LoadStack, start_load_stack
from svcard.host.pay.server.app import MerchantAccount
from svcard.host.pay.stack import Stack, start_stack
from svcard.host.terminal.online import PaymentRefused
from svcard.host.wallet.stack import MALL, Browserless, WalletStack, start_wallet
from svcard.protocols import messages as M

try:   # mall-signed orders (the purchase the mall's page hands the wallet carries a MAC)
    from svcard.host.wallet.gateway.matching import sign_order
except ImportError:   # pragma: no cover - before signed orders
    sign_order = None

MALL_MERCHANT = b"MALLPAY1"
ACCOUNT_SECRET = "acct7777"


@dataclass
class World:
    folder: Path
    pay: Stack
    load: LoadStack
    wallet: WalletStack
    mall_merchant_key: bytes


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("wallet-realcard")
    pay = start_stack(folder / "pay", psams=1)
    key = os.urandom(32)
    pay.payment_server.config.merchants[MALL_MERCHANT] = MerchantAccount(
        MALL_MERCHANT, key, frozenset({M.FIG6_SERVER_COMPARES}))
    load = start_load_stack(folder / "load")
    wallet = start_wallet(folder / "wallet", purse={
        "payment_url": pay.payment.url,
        "payment_terminal": pay.payment_server.pool.terminal_id,
        "merchants": {MALL: (MALL_MERCHANT, key)},
        "load_url": load.load.url, "load_terminal": DEMO_LOAD_TERMINAL,
        "bank_id": DEMO_BANK_ID, "bank_key": load.shared_key})
    yield World(folder, pay, load, wallet, key)
    wallet.close()
    load.close()
    pay.close()


@dataclass
class Holder:
    """A member with a real card, and the card helper holding it."""

    b: Browserless
    card: str
    secret: str
    image: Path
    helper: CardHelper
    thread: ServerThread
    token: str
    account: str

    def ask(self, method: str, path: str, body: Any = None,
            origin: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        if origin is not None:
            headers["Origin"] = origin
        return httpx.request(method, self.thread.url + path, json=body, headers=headers,
                             timeout=30)

    def run(self, path: str, body: dict[str, Any], origin: str) -> dict[str, Any]:
        """Start a helper job as the page does and poll it to its end (60 s at most)."""
        r = self.ask("POST", path, body, origin)
        assert r.status_code == 202, r.text
        poll = r.json()["poll"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            view: dict[str, Any] = self.ask("GET", poll, origin=origin).json()
            if view["state"] in ("paid", "pending", "refused", "failed", "loaded"):
                return view
            time.sleep(0.05)
        raise AssertionError(f"the helper's job did not end: {view}")

    def purse_balance(self) -> int:
        return int(json.loads(self.image.read_text())["app"]["ep"]["balance"])

    def close(self) -> None:
        self.thread.stop()


def holder(world: World, name: str) -> Holder:
    b = member(world.wallet, name)
    real = issue(b, "real")
    card = real["number"]
    mail = world.wallet.folder / "mail"
    letter = (mail / f"{card}.letter.txt").read_text()
    secret = letter.split("secret: ")[1].strip()
    account = "1000" + "".join(secrets.choice("0123456789") for _ in range(12))
    world.wallet.open_account(account, ACCOUNT_SECRET, 1_000_000)
    r = b.post("/api/links", {"kind": "account", "number": account, "secret": ACCOUNT_SECRET})
    assert r.status_code == 200, r.text
    image = mail / f"{card}.json"
    token = secrets.token_urlsafe(24)
    helper = CardHelper(HelperCard(f"virtual:{image}", world.folder / f"{name}.journal"),
                        token, [world.wallet.url("web")])
    return Holder(b, card, secret, image, helper, ServerThread(helper.app()).start(), token,
                  account)


def charge(world: World, h: Holder, amount: int, ref: str | None = None) -> dict[str, Any]:
    r = h.b.post("/api/charges", {"kind": "account", "card": h.card, "source": h.account,
                                  "amount": amount, "currency": 156,
                                  "ref": ref or secrets.token_hex(8)})
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def load_card(world: World, h: Holder, order: dict[str, Any]) -> dict[str, Any]:
    web = world.wallet.url("web")
    return h.run("/v1/load", {"bank_url": f"{web}/purse/bank", "account": order["account"],
                              "secret": order["secret"], "amount": order["amount"]}, web)


def new_purchase(amount: int = 1_250) -> dict[str, Any]:
    return {"mall": MALL, "order": secrets.token_hex(8),
            "customer": "shopper-" + secrets.token_hex(4),
            "products": [{"sku": "tea", "qty": 1, "price": amount}], "amount": amount,
            "currency": 156, "nonce": secrets.token_hex(16),
            "expires": int((time.time() + 300) * 1000)}


def choose(world: World, h: Holder, p: dict[str, Any]) -> httpx.Response:
    handed = sign_order(world.wallet.mall_key, p) if sign_order is not None else p
    return h.b.post("/api/purchases", {
        "card": h.card, "secret": h.secret, "purchase": handed,
        "return_url": f"{world.wallet.url('mall')}/shop/?order={p['order']}"})


def pay_purse(world: World, h: Holder, checkout: str,
              card: str | None = None) -> dict[str, Any]:
    """The page has the helper pay the purchase's checkout; ``card``: the card it names
    (the one its member chose; None: no card named, as a plain client)."""
    web = world.wallet.url("web")
    body: dict[str, Any] = {"checkout_url": f"{web}/purse/checkout/{checkout}"}
    if card is not None:
        body["card_serial"] = "0000" + card
    return h.run("/v1/pay", body, web)


def approve(world: World, p: dict[str, Any]) -> tuple[int, Any]:
    with httpx.Client(timeout=30) as http:
        return world.wallet.mall_link(http).post("/v1/approvals", p)


def fin_balance(world: World, h: Holder) -> int:
    return int(next(c["balance"] for c in h.b.wallet()["cards"] if c["number"] == h.card))


def account_balance(world: World, h: Holder) -> int:
    from svcard.host.wallet.fin.ledger import source_state
    state = source_state(world.wallet.fin.engine, "account", h.account)
    assert state is not None
    return int(state["balance"])


# --- charging: the load flow ------------------------------------------------------------------

def test_a_real_card_is_charged_through_the_load_flow(world: World) -> None:
    h = holder(world, "loader1")
    try:
        before = account_balance(world, h)
        answer = charge(world, h, 3_000, "load-ref-1")
        order = answer["load"]
        assert account_balance(world, h) == before - 3_000
        assert h.purse_balance() == 0
        # the same charge asked again (a lost answer): the same load order, no second debit
        again = charge(world, h, 3_000, "load-ref-1")
        assert again["load"] == order and account_balance(world, h) == before - 3_000
        pending = h.b.wallet()["loads"]
        assert [x["account"] for x in pending] == [order["account"]]
        view = load_card(world, h, order)
        assert view["state"] == "loaded", view
        assert h.purse_balance() == 3_000
        assert h.b.wallet()["loads"] == []
        # loaded once: the same order again is refused, the card keeps 3,000
        view = load_card(world, h, order)
        assert view["state"] == "refused" and "loaded already" in view["message"], view
        assert h.purse_balance() == 3_000 and fin_balance(world, h) == 3_000
    finally:
        h.close()


def test_load_order_attacks(world: World) -> None:
    h = holder(world, "loader2")
    other = holder(world, "loader3")
    try:
        order = charge(world, h, 1_000)["load"]
        web = world.wallet.url("web")
        # a forged token, and another card presenting this card's order: nothing loaded
        forged = {**order, "secret": "0" * 64}
        assert load_card(world, h, forged)["state"] == "refused"
        view = load_card(world, other, order)
        assert view["state"] == "refused" and "another card" in view["message"], view
        assert other.purse_balance() == 0
        # another amount than the charge's
        view = load_card(world, h, {**order, "amount": 5_000})
        assert view["state"] == "refused" and h.purse_balance() == 0
        # a foreign page at the helper: refused before anything runs
        r = h.ask("POST", "/v1/load", {"bank_url": f"{web}/purse/bank", **{
            k: order[k] for k in ("account", "secret", "amount")}}, "http://evil.example")
        assert r.status_code == 403
        # a page may load only from its own site
        r = h.ask("POST", "/v1/load", {"bank_url": "http://127.0.0.1:9/purse/bank", **{
            k: order[k] for k in ("account", "secret", "amount")}}, web)
        assert r.status_code == 403
        assert load_card(world, h, order)["state"] == "loaded"
        assert h.purse_balance() == 1_000
    finally:
        h.close()
        other.close()


def test_a_load_started_elsewhere_is_finished_by_its_own_resume(world: World) -> None:
    """The bank's start answered, then the helper stopped: a second start with another
    request id is refused (never two loads of one charge); the helper's journal resumes it
    under its own request id at the next contact and loads the card once."""
    from svcard.host.load import client as LC
    from svcard.host.terminal.journal import Journal
    from svcard.host.terminal.reader_specs import open_reader
    h = holder(world, "loader4")
    try:
        order = charge(world, h, 700)["load"]
        web = world.wallet.url("web")
        book = Journal(world.folder / "loader4.journal")
        with httpx.Client(timeout=30) as http, open_reader(f"virtual:{h.image}") as reader:
            book.write("req-x", "load-starting", kind="load", card_serial="0000" + h.card,
                       aid="", bank_url=f"{web}/purse/bank", account=order["account"],
                       secret=order["secret"], amount=700, request_id="req-x-0123456789")
            params, _ = LC.start_load(http, f"{web}/purse/bank", reader,
                                      account=order["account"], secret=order["secret"],
                                      amount=700, request_id="req-x-0123456789")
            with pytest.raises(PaymentRefused, match="debited already"):
                LC.start_load(http, f"{web}/purse/bank", reader, account=order["account"],
                              secret=order["secret"], amount=700,
                              request_id="another-request-id")
        assert h.purse_balance() == 0
        # the next contact: the helper's own load job resumes the journal first: the card
        # never saw that load, so it ends "not loaded" (a zero-value probe) and the charge's
        # order is ready again; then the new order loads
        again = charge(world, h, 1)["load"]
        view = load_card(world, h, again)
        assert view["state"] == "loaded", view
        assert [r["outcome"] for r in view["resumed"]] == ["not loaded"], view
        assert h.purse_balance() == 1
        assert [x["account"] for x in h.b.wallet()["loads"]] == [order["account"]]
        # completed at the next contact: the 700 loads once, under a new transaction
        view = load_card(world, h, order)
        assert view["state"] == "loaded" and view["txn_id"] != params["txn_id"], view
        assert h.purse_balance() == 701 and fin_balance(world, h) == 701
        assert h.b.wallet()["loads"] == []
    finally:
        h.close()


# --- paying: embodiment 1 by the card's own purse --------------------------------------------

def loaded_holder(world: World, name: str, amount: int) -> Holder:
    h = holder(world, name)
    assert load_card(world, h, charge(world, h, amount)["load"])["state"] == "loaded"
    return h


def test_a_real_card_pays_a_mall_by_its_purse(world: World) -> None:
    h = loaded_holder(world, "payer1", 5_000)
    try:
        p = new_purchase(1_250)
        r = choose(world, h, p)
        assert r.status_code == 200, r.text
        checkout = r.json()["checkout"]
        # no purse payment yet: the mall's approval request approves nothing
        status, answer = approve(world, p)
        assert status == 409 and "purse has not paid" in answer["reason"], answer
        view = pay_purse(world, h, checkout, h.card)
        assert view["state"] == "paid", view
        assert h.purse_balance() == 5_000 - 1_250
        # the financial system's copy follows the purse at once (the same ref as the
        # approval's debit: one debit whenever the mall asks)
        assert fin_balance(world, h) == 5_000 - 1_250
        status, answer = approve(world, p)
        assert status == 200 and answer["approved"], answer
        assert fin_balance(world, h) == 5_000 - 1_250
        # replayed: no second approval, no second debit
        status, answer = approve(world, p)
        assert status == 409 and answer.get("state") == "approved"
        assert h.purse_balance() == 3_750 and fin_balance(world, h) == 3_750
        # the same checkout again: never a second purse debit for one purchase
        view = pay_purse(world, h, checkout)
        assert view["state"] == "refused" and h.purse_balance() == 3_750, view
    finally:
        h.close()


def test_purse_evidence_attacks(world: World) -> None:
    h = loaded_holder(world, "payer2", 5_000)
    other = loaded_holder(world, "payer3", 5_000)
    try:
        web = world.wallet.url("web")
        p, q = new_purchase(1_000), new_purchase(1_000)
        cp = choose(world, h, p).json()["checkout"]
        cq = choose(world, other, q).json()["checkout"]
        # a forged checkout token: no order
        forged = cp[:32] + ("0" if cp[32] != "0" else "1") + cp[33:]
        with httpx.Client(timeout=30) as http:
            r = http.post(f"{web}/purse/checkout/{forged}", headers={"X-Svcard-Client": "1"})
            assert r.status_code == 403
            # without the client header (a page's form or image): no order either
            assert http.post(f"{web}/purse/checkout/{cp}").status_code == 403
        # the page names the chosen card: a helper holding another card pays nothing
        view = pay_purse(world, other, cp, h.card)
        assert view["state"] == "refused" and "not the card chosen" in view["message"], view
        assert other.purse_balance() == 5_000
        # a client naming no card pays with another card: the gateway refuses its evidence
        view = pay_purse(world, other, cp)
        assert view["state"] in ("pending", "refused"), view
        status, _ = approve(world, p)
        assert status == 409
        # the purchase q paid by its own card: evidence of q approves q only
        assert pay_purse(world, other, cq)["state"] == "paid"
        assert approve(world, p)[0] == 409
        assert approve(world, {**q, "amount": 999, "products": [
            {"sku": "tea", "qty": 1, "price": 999}]})[0] == 409
        assert approve(world, q)[0] == 200
        # a forged confirmation at the gateway's status URL: refused, nothing recorded
        from svcard.host.wallet.gateway import purse as PU
        with world.wallet.gateway.engine.connect() as conn:
            txn = conn.execute(PU.orders.select().where(
                PU.orders.c.purchase == cp[:32])).first()
        assert txn is not None
        with httpx.Client(timeout=30) as http:
            r = http.post(f"{world.wallet.url('gateway')}/v1/purse/status/{txn.txn_id}",
                          content=b"SC" + os.urandom(80))
            assert r.status_code == 400
        assert approve(world, p)[0] == 409
    finally:
        h.close()
        other.close()


def test_the_mailed_cards_purse_names_its_number(world: World) -> None:
    """The purse's application serial is ``0000`` + the card number: what the gateway binds
    a load and a purse payment to (its holder file is empty: test_wallet_network)."""
    from svcard.host.terminal.purse import select_purse
    from svcard.host.terminal.reader_specs import open_reader
    h = holder(world, "anon1")
    try:
        with open_reader(f"virtual:{h.image}") as reader:
            assert select_purse(reader).app_serial == ("0000" + h.card).upper()
    finally:
        h.close()


def test_replayed_and_raced_purse_evidence(world: World) -> None:
    """The card's confirmation of purchase A: sent again to A, the same answer and nothing
    more; sent to purchase B's order, refused. 16 checkouts of one purchase at once: one
    order, every one answered with its transaction. 16 approvals of A at once: one
    approval, one debit."""
    from concurrent.futures import ThreadPoolExecutor

    from svcard.host.pay import client as PC
    from svcard.host.terminal.journal import Journal
    from svcard.host.terminal.reader_specs import open_reader
    h = loaded_holder(world, "racer1", 6_000)
    try:
        web = world.wallet.url("web")
        p, q = new_purchase(1_500), new_purchase(1_500)
        cp = choose(world, h, p).json()["checkout"]
        cq = choose(world, h, q).json()["checkout"]
        with httpx.Client(timeout=30) as http, ThreadPoolExecutor(16) as pool:
            raced = list(pool.map(lambda _: http.post(
                f"{web}/purse/checkout/{cq}", headers={"X-Svcard-Client": "1"}),
                range(16)))
        # every one answered, all for the purchase's one transaction (one draw: one debit)
        assert [r.status_code for r in raced] == [200] * 16
        assert len({r.json()["txn_id"] for r in raced}) == 1
        assert len({r.json()["tsk"] for r in raced}) == 16
        sent: list[tuple[str, bytes]] = []

        def keep(request: httpx.Request) -> None:
            if "/v1/purse/status/" in request.url.path:
                sent.append((str(request.url), request.content))
        with httpx.Client(timeout=30, event_hooks={"request": [keep]}) as http, \
                open_reader(f"virtual:{h.image}") as reader:
            outcome = PC.pay(f"{web}/purse/checkout/{cp}", reader,
                             journal=Journal(world.folder / "racer1.pay.journal"), http=http)
        assert outcome.amount == 1_500 and h.purse_balance() == 4_500
        url, confirmation = sent[0]
        with httpx.Client(timeout=30) as http:
            again = http.post(url, content=confirmation)
            assert again.status_code == 200 and again.json()["released"]
            with world.wallet.gateway.engine.connect() as conn:
                from svcard.host.wallet.gateway import purse as PU
                q_order = conn.execute(PU.orders.select().where(
                    PU.orders.c.purchase == cq[:32])).first()
            assert q_order is not None
            other = url.rsplit("/", 1)[0] + "/" + q_order.txn_id
            assert http.post(other, content=confirmation).status_code == 400
            # a confirmation cut short, or grown past the bound: refused
            assert http.post(other, content=confirmation[:20]).status_code == 400
            assert http.post(other, content=confirmation + bytes(5000)).status_code == 413
        assert approve(world, q)[0] == 409          # q: never paid by its card
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda _: approve(world, p)[0], range(16)))
        assert sorted(results) == [200] + [409] * 15
        assert fin_balance(world, h) == 4_500 and h.purse_balance() == 4_500
    finally:
        h.close()


def test_a_report_dated_past_year_9999_is_refused(world: World) -> None:
    """The gateway's report intake bounds ``at`` to a date (a fuzzed 2**51 ms was a 500)."""
    from svcard.host.wallet.links import LinkClient
    with httpx.Client(timeout=30) as http:
        status, answer = LinkClient(http, world.wallet.url("gateway"), "fin",
                                    world.wallet.gateway.config.fin_key).post(
            "/v1/reports", {"reports": [{
                "ref": "far-future", "kind": "cash", "card": "9" * 16, "amount": 1,
                "currency": 156, "balance": 1, "counterparty": "agent:A", "order": "",
                "at": 2**51}]})
    assert status == 400 and "at" in answer["reason"], (status, answer)


def test_a_credit_card_charge_loads_the_card(world: World) -> None:
    h = holder(world, "crediter1")
    try:
        credit = "4000" + "".join(secrets.choice("0123456789") for _ in range(12))
        world.wallet.open_credit(credit, "cvc1234", 10_000)
        r = h.b.post("/api/links", {"kind": "credit", "number": credit, "secret": "cvc1234"})
        assert r.status_code == 200, r.text
        r = h.b.post("/api/charges", {"kind": "credit", "card": h.card, "source": credit,
                                      "amount": 2_500, "currency": 156,
                                      "ref": secrets.token_hex(8)})
        assert r.status_code == 200, r.text
        assert load_card(world, h, r.json()["load"])["state"] == "loaded"
        assert h.purse_balance() == 2_500 and fin_balance(world, h) == 2_500
    finally:
        h.close()


def test_raced_copies_of_one_confirmation_record_it_once(world: World) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from svcard.host.pay import client as PC
    from svcard.host.terminal.journal import Journal
    from svcard.host.terminal.reader_specs import open_reader
    from svcard.host.wallet.gateway import purse as PU
    h = loaded_holder(world, "racer2", 3_000)
    try:
        web = world.wallet.url("web")
        p = new_purchase(800)
        cp = choose(world, h, p).json()["checkout"]
        blocked: list[tuple[str, bytes]] = []

        class Held(httpx.HTTPTransport):
            """The helper's confirmation is kept, never sent (as if the link dropped)."""

            def handle_request(self, request: httpx.Request) -> httpx.Response:
                if "/v1/purse/status/" in request.url.path:
                    blocked.append((str(request.url), request.read()))
                    raise httpx.ConnectError("held back by the test", request=request)
                return super().handle_request(request)
        with httpx.Client(timeout=30, transport=Held()) as http, \
                open_reader(f"virtual:{h.image}") as reader, pytest.raises(httpx.HTTPError):
            PC.pay(f"{web}/purse/checkout/{cp}", reader,
                   journal=Journal(world.folder / "racer2.pay.journal"), http=http)
        assert h.purse_balance() == 2_200 and approve(world, p)[0] == 409
        url, confirmation = blocked[0]
        with httpx.Client(timeout=30) as http, ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(lambda _: http.post(url, content=confirmation).status_code,
                                  range(16)))
        assert codes == [200] * 16          # the same confirmation: the same answer
        with world.wallet.gateway.engine.connect() as conn:
            rows = conn.execute(PU.orders.select().where(
                PU.orders.c.purchase == cp[:32])).all()
        assert [r.state for r in rows] == ["paid"]
        assert approve(world, p)[0] == 200 and approve(world, p)[0] == 409
        assert fin_balance(world, h) == 2_200
    finally:
        h.close()


def test_a_real_cards_statement_agrees_with_its_purse(world: World, tmp_path: Path) -> None:
    """The financial system reports the real card's charge and its purse payment; the day's
    statement of the member shows both and closes at the purse's balance."""
    from test_wallet_faults import wait_for

    from svcard.host.wallet.gateway.journal import day_of, write_statements
    h = loaded_holder(world, "stated1", 4_000)
    try:
        p = new_purchase(1_100)
        assert pay_purse(world, h, choose(world, h, p).json()["checkout"],
                         h.card)["state"] == "paid"
        assert approve(world, p)[0] == 200
        engine = world.wallet.gateway.engine

        def written() -> list[Path]:
            return [f for f in write_statements(engine, tmp_path, day_of(
                int(time.time() * 1000))) if f.name.startswith("stated1")]
        files = wait_for("the statement with both movements", lambda: [
            f for f in written() if len(json.loads(f.read_text())["transactions"]) == 2])
        statement = json.loads(files[0].read_text())
        assert [t["amount"] for t in statement["transactions"]] == [4_000, -1_100]
        assert statement["cards"][h.card]["closing"] == h.purse_balance() == 2_900
    finally:
        h.close()
