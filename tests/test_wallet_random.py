"""A randomised run of payments in all three embodiments with faults (issue 14): the financial
system, the payment gateway and the VAN as processes (``svcard serve wallet-*``), SIGKILLed at
random moments (a timer during a payment, or the servers' own crash points between match and
debit) and started again; answers lost and the mall asking again; declines of every kind
(wrong secret, balance too low, an unregistered card, a field of the mall's request that does
not match, a replayed approval, an expired purchase); cash top-ups between payments.

The run keeps its own model (each card's balance, each approval) and asserts every answer
against it as it goes: a payment is approved exactly when the card holds its amount. At the
end: each card's balance at the financial system equals the model's to the minor unit; every
debit is one approved purchase and every approval has its one debit (no double debit, no
approval without its debit); the gateway's journal holds every movement once, nothing is left
``approving``; and the daily statements (``svcard wallet statements``) list exactly the
model's movements per member and card, their closing balances the cards' balances.

Real cards too (issue 14, R-wallet2): ``SVCARD_WALLET_REAL`` members (default 2) hold a real
card, charged by cash and loaded through the load flow (seed 002's load server, the gateway as
the bank), and now and then pay a purchase by the purse (seed 002's payment server and PSAM,
the pay client with its journal, embodiment 1), some with too low a balance first (the card
refuses; loaded, the same checkout pays: the same transaction), the gateway restarted to
SIGKILL itself at the real-card crash points (``gateway-after-purse``,
``gateway-after-purse-paid``) or killed by the timer. At the end the purses, the financial
system's copies and the statements agree with the model. They add about 20 s to the default
run (printed: most of it the gateway's restarts at its crash points).

``--wallet-payments N`` (``SVCARD_WALLET_PAYMENTS``, default 150: about a minute) and
``--wallet-seed S`` (``SVCARD_WALLET_SEED``; printed, the run replays from it: the choices are
the seed's, the kills' exact moments depend on timing)."""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_wallet_attack import random_mutation, signed
from test_wallet_faults import MALL, SVCARD, Servers, wait_for

from svcard.host.kit.serving import ServerThread
from svcard.host.load import client as LC
from svcard.host.load.stack import DEMO_BANK_ID, DEMO_LOAD_TERMINAL, LoadStack, start_load_stack
from svcard.host.pay import client as PC
from svcard.host.pay.server.app import MerchantAccount
from svcard.host.pay.stack import Stack, start_stack
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.online import PaymentRefused
from svcard.host.terminal.purse import Declined, TerminalError
from svcard.host.terminal.reader_specs import open_reader
from svcard.host.wallet.base import CRASH_ENV
from svcard.host.wallet.config import WebConfig
from svcard.host.wallet.web.app import WebServer
from svcard.protocols import messages as M
from svcard.protocols import sw as SW

PAYMENTS = int(os.environ.get("SVCARD_WALLET_PAYMENTS") or 150)
REAL = int(os.environ.get("SVCARD_WALLET_REAL") or 2)      # members with a real card
REAL_SHARE = 0.02      # the share of payments made by a real card (3 more are forced)
PURSE_POINTS = ("gateway-after-purse", "gateway-after-purse-paid")
MERCHANT = b"MALLPAY3"
SEED = int(os.environ.get("SVCARD_WALLET_SEED") or secrets.randbits(32))
WAYS = ("approvals", "card-payments", "van")
KINDS = ("honest", "honest", "honest", "wrong-secret", "low-balance", "unregistered",
         "mismatch", "replay", "expired")
RETRY = (0, 502, 503)
Answer = tuple[int, Any]


class Run:
    """The servers, the mall's and the wallets' requests, and the model they are checked
    against."""

    def __init__(self, servers: Servers, rng: random.Random) -> None:
        self.s, self.rng = servers, rng
        self.cards: dict[str, dict[str, Any]] = {}     # number -> member, secret, balance
        self.approved: dict[str, tuple[str, int, str]] = {}   # purchase id -> card, amount, order
        self.credits: dict[str, list[int]] = {}         # card -> its cash top-ups
        self.outcomes: Counter[str] = Counter()
        self.kills: Counter[str] = Counter()
        self.deferred: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []

    # --- the servers ----------------------------------------------------------------------
    def start(self, name: str, crash: str | None = None) -> None:
        """``svcard serve wallet-NAME`` on its port and database, its stderr kept in
        NAME.log; started again if it exits before answering (its port taken for a moment by
        another process's connection), up to 5 times, each given 180 s (a loaded machine)."""
        env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
        if crash:
            env[CRASH_ENV] = crash
        s = self.s
        for _ in range(5):
            with open(s.folder / f"{name}.log", "ab") as log:
                proc = subprocess.Popen(
                    [SVCARD, "serve", f"wallet-{name}", "--config", str(s.configs[name]),
                     "--db", f"sqlite:///{s.db(name)}", "--port", str(s.ports[name]),
                     "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=log)
            s.procs[name] = proc
            deadline = time.monotonic() + 180
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if httpx.get(f"{s.url[name]}/v1/health", timeout=2).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self.kills["start-retried"] += 1
            time.sleep(1)
        tail = (s.folder / f"{name}.log").read_text(errors="replace")[-2000:]
        raise AssertionError(f"wallet-{name} did not start: {tail}")

    def ensure(self) -> None:
        """Every server that died (SIGKILL) started again."""
        for name, proc in list(self.s.procs.items()):
            if proc.poll() is not None:
                self.start(name)
                self.kills["restarts"] += 1

    def fault(self, forced: str = "") -> threading.Thread | None:
        """Now and then a fault for the next payment: a SIGKILL 0-40 ms into it, or a server
        restarted to kill itself at its crash point (between match and debit). ``forced``:
        this one (so a short run has each kind at least once)."""
        roll = {"timer": 0.0, "armed": 0.02}.get(forced, self.rng.random())
        if roll < 0.012:
            name = self.rng.choice(("gateway", "fin", "van"))
            delay = self.rng.uniform(0, 0.04)

            def kill() -> None:
                proc = self.s.procs[name]
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
            self.kills[f"timer:{name}"] += 1
            timer = threading.Timer(delay, kill)
            timer.start()
            return timer
        if roll < 0.022:
            name, point = self.rng.choice((("gateway", "gateway-after-match"),
                                           ("fin", "fin-after-debit")))
            self.s.kill(name)
            self.start(name, crash=point)
            self.kills[f"armed:{point}"] += 1
        return None

    def definite(self, send: Callable[[], Answer]) -> Answer:
        """``send`` asked until it gets an answer that is not "unknown": a lost connection,
        502/503, or 409 "being approved" (the purchase is ``approving``: its debit's outcome
        is found at the gateway's restart, or on a retry once it was left 10 s)."""
        deadline = time.monotonic() + 120
        while True:
            try:
                status, answer = send()
            except httpx.TransportError:
                status, answer = 0, {"reason": "the connection was lost"}
            busy = status == 409 and "being approved" in str(answer.get("reason", ""))
            if status not in RETRY and not busy:
                return status, answer
            assert time.monotonic() < deadline, (status, answer)
            self.outcomes["retried"] += 1
            self.ensure()
            if busy and self.rng.random() < 0.5:       # the gateway restarted: it asks again
                self.s.kill("gateway")
                self.kills["busy:gateway"] += 1
                self.ensure()
            else:
                time.sleep(0.2)

    def web(self, path: str, data: dict[str, Any]) -> Answer:
        return self.definite(lambda: self.s.link("gateway", "web", "web").post(path, data))

    # --- members, cards, cash -------------------------------------------------------------
    def new_card(self, member: str) -> str:
        status, answer = self.web("/v1/wallet/issue", {"member": member, "kind": "virtual",
                                                       "ref": secrets.token_hex(8)})
        assert status == 200, answer
        number = str(answer["number"])
        self.cards[number] = {"member": member, "secret": answer["secret"], "balance": 0,
                              "wrong": 0, "customer": f"cust-{member}"}
        self.credits[number] = []
        return number

    def topup(self, card: str, amount: int) -> None:
        ref = "cash-" + secrets.token_hex(8)
        status, answer = self.definite(lambda: self.s.link("fin", "AGENT1", "agent").post(
            "/v1/topups", {"ref": ref, "card": card, "amount": amount, "currency": 156}))
        assert status == 200 and answer["result"] == "done", answer
        self.cards[card]["balance"] += amount
        self.credits[card].append(amount)

    # --- one payment ----------------------------------------------------------------------
    def purchase(self, card: str, amount: int | None = None, expires_in: float = 120
                 ) -> dict[str, Any]:
        if amount is None:
            lines = [{"sku": self.rng.choice(("tea", "cup", "pot", "mat")),
                      "qty": self.rng.randint(1, 3), "price": self.rng.randint(100, 3000)}
                     for _ in range(self.rng.randint(1, 3))]
        else:
            lines = [{"sku": "big", "qty": 1, "price": amount}]
        return {"mall": MALL, "order": secrets.token_hex(8),
                "customer": self.cards[card]["customer"], "products": lines,
                "amount": sum(x["qty"] * x["price"] for x in lines), "currency": 156,
                "nonce": secrets.token_hex(16),
                "expires": int((time.time() + expires_in) * 1000)}

    def prepare(self, way: str, card: str, p: dict[str, Any], number: str | None = None
                ) -> tuple[int, dict[str, Any]]:
        """The wallet's choice (embodiment 1) or fill (2, 3): (status, the mall's form)."""
        c = self.cards[card]
        data = {"member": c["member"], "card": number or card,
                "purchase": signed(self.s.keys["mall"], p),
                "return_url": f"http://localhost:9999/shop/?order={p['order']}"}
        if way == "approvals":
            status, answer = self.web("/v1/wallet/choose", {**data, "secret": c["secret"]})
            if status == 200:
                c["wrong"] = 0
            return status, {}
        status, answer = self.web("/v1/wallet/fill", data)
        if status != 200:
            return status, {}
        return status, {"card": card, "secret": c["secret"], "profile": answer["profile"]}

    def ask(self, way: str, p: dict[str, Any], form: dict[str, Any]) -> Answer:
        return self.definite(lambda: self.s.mall_asks(way, p, form))

    def settle(self, way: str, card: str, p: dict[str, Any], form: dict[str, Any],
               status: int, answer: Any) -> bool | None:
        """Check a definite answer against the model and apply it: approved or not (None:
        it expired while the servers were down)."""
        c = self.cards[card]
        enough = c["balance"] >= p["amount"]
        if status == 409 and answer.get("state") in ("approved", "declined"):
            approved = answer["state"] == "approved"        # its first answer was lost
            self.outcomes["lost-answer"] += 1
        elif status == 410 and time.time() * 1000 > p["expires"]:
            # it expired while the servers were down, never matched: nothing moved (a debit
            # made under it would show in the books at the end)
            self.outcomes["expired-in-faults"] += 1
            return None
        else:
            assert status in (200, 402), (way, status, answer)
            approved = status == 200
        assert approved == enough, (way, status, answer, c["balance"], p["amount"])
        pid = form["profile"][:32] if form else str(answer["approval"])
        if approved:
            assert pid not in self.approved
            self.approved[pid] = (card, p["amount"], p["order"])
            c["balance"] -= p["amount"]
        c["wrong"] = 0
        self.outcomes["approved" if approved else "declined-balance"] += 1
        return approved

    def again(self, way: str, p: dict[str, Any], form: dict[str, Any], approved: bool) -> None:
        """The mall asks again (a lost answer, a retry, a replay): never a second approval."""
        status, answer = self.ask(way, p, form)
        if way == "van":        # the VAN keeps no state: the first outcome, marked repeated
            assert status == (200 if approved else 402) and answer["repeated"], answer
        else:
            assert status == 409 and answer.get("state") == (
                "approved" if approved else "declined"), answer
        self.outcomes["replayed"] += 1

    def payment(self, way: str, kind: str, member_cards: list[str]) -> None:
        card = self.rng.choice(member_cards)
        c = self.cards[card]
        if kind == "wrong-secret" and c["wrong"] >= 2:
            kind = "honest"                 # never near the lockout (5 wrong in a row)
        amount = c["balance"] + self.rng.randint(1, 500) if kind == "low-balance" else None
        p = self.purchase(card, amount, 1.5 if kind == "expired" else 120)
        if kind == "unregistered" and way != "van":
            status, _ = self.prepare(way, card, p, number="9" + secrets.token_hex(8)[:15]
                                     .translate(str.maketrans("abcdef", "123456")))
            assert status == 404, status
            self.outcomes["refused-unregistered"] += 1
            return
        if kind == "wrong-secret" and way == "approvals":
            status, answer = self.web("/v1/wallet/choose", {
                "member": c["member"], "card": card, "secret": "wrong" + secrets.token_hex(3),
                "purchase": signed(self.s.keys["mall"], p),
                "return_url": f"http://localhost:9999/shop/?order={p['order']}"})
            assert status == 403, answer
            c["wrong"] += 1
            self.outcomes["refused-secret"] += 1
            return
        status, form = self.prepare(way, card, p)
        if kind == "expired" and status == 400:     # a restart took longer than its 1.5 s
            self.outcomes["refused-expired"] += 1
            return
        if status == 429:               # the member's 50 open purchases (left unpaid)
            self.outcomes["refused-open-limit"] += 1
            return
        if status == 409:               # its answer was lost (a kill): the fill's token too
            self.outcomes["lost-choice"] += 1
            if way != "approvals":
                return
        else:
            assert status == 200, status
        if kind == "expired":
            self.deferred.append((way, card, p, form))
            return
        if kind == "wrong-secret":
            s, answer = self.ask(way, p, {**form, "secret": "wrong" + secrets.token_hex(3)})
            assert s == 403, (way, s, answer)
            c["wrong"] += 1
            self.outcomes["refused-secret"] += 1
        elif kind == "unregistered":            # the VAN given a card no wallet filled
            other = {**form, "card": "8" + "0" * 14 + str(self.rng.randint(0, 9))}
            s, answer = self.ask(way, p, other)
            assert s in (403, 404), (s, answer)
            self.outcomes["refused-unregistered"] += 1
        elif kind == "mismatch":
            name, wrong = random_mutation(self.rng, p)
            s, answer = self.ask(way, wrong, form)
            assert s in (400, 403, 404, 409, 410), (name, s, answer)
            self.outcomes["refused-mismatch"] += 1
        if kind in ("wrong-secret", "unregistered", "mismatch") and self.rng.random() < 0.5:
            return                      # the order is left unpaid
        approved = self.settle(way, card, p, form, *self.ask(way, p, form))
        if approved is not None and (kind == "replay" or self.rng.random() < 0.1):
            self.again(way, p, form, approved)

    def expire(self, wait: bool) -> None:
        """The deferred purchases whose expiry passed: the mall asks now, too late: 410."""
        if wait and self.deferred:
            latest = max(p["expires"] for _, _, p, _ in self.deferred) / 1000
            wait_for("the purchases to expire", lambda: time.time() > latest + 0.05)
        keep = []
        for way, card, p, form in self.deferred:
            if time.time() * 1000 <= p["expires"] + 50:
                keep.append((way, card, p, form))
                continue
            status, answer = self.ask(way, p, form)
            assert status == 410, (way, status, answer)
            self.outcomes["refused-expired"] += 1
        self.deferred = keep


class RealCards:
    """Real cards in the run: seed 002's payment server (with a PSAM) and load server (with
    an HSM) in this process, the gateway given a ``[purse]`` section and started again, and a
    web server for the card's checkout and load links."""

    def __init__(self, run: Run, folder: Path) -> None:
        self.run = run
        s = run.s
        self.folder = folder
        self.pay: Stack = start_stack(folder / "pay", psams=1)
        key = os.urandom(32)
        self.pay.payment_server.config.merchants[MERCHANT] = MerchantAccount(
            MERCHANT, key, frozenset({M.FIG6_SERVER_COMPARES}))
        self.load: LoadStack = start_load_stack(folder / "load")
        with open(s.configs["gateway"], "a") as toml:
            toml.write(
                f'[purse]\npublic_url = "{s.url["gateway"]}"\n'
                f'payment_url = "{self.pay.payment.url}"\n'
                f'payment_terminal_id = "{self.pay.payment_server.pool.terminal_id.hex()}"\n'
                f'load_url = "{self.load.load.url}"\n'
                f'load_terminal_id = "{DEMO_LOAD_TERMINAL.hex()}"\n'
                f'bank_id = "{DEMO_BANK_ID.hex()}"\n'
                f'bank_key = "{self.load.shared_key.hex()}"\n'
                f'[[purse.merchant]]\nmall = "{MALL}"\nmerchant_id = "{MERCHANT.hex()}"\n'
                f'key = "{key.hex()}"\n')
        s.kill("gateway")
        run.start("gateway")
        self.web = WebServer(WebConfig(s.url["gateway"], s.keys["web"],
                                       db_url=f"sqlite:///{folder / 'web.db'}"))
        self.thread = ServerThread(self.web.app()).start()
        self.http = httpx.Client(timeout=30)
        self.members: dict[str, str] = {}       # real card -> member

    def close(self) -> None:
        self.http.close()
        self.thread.stop()
        self.web.close()
        self.load.close()
        self.pay.close()

    def image(self, card: str) -> Path:
        return self.run.s.folder / "mail" / f"{card}.json"

    def purse(self, card: str) -> int:
        return int(json.loads(self.image(card).read_text())["app"]["ep"]["balance"])

    def journal(self, card: str, what: str) -> Journal:
        return Journal(self.folder / f"{card}.{what}.journal")

    def new_card(self, member: str) -> str:
        run = self.run
        status, answer = run.web("/v1/wallet/issue", {"member": member, "kind": "real",
                                                      "ref": secrets.token_hex(8)})
        assert status == 200, answer
        number = str(answer["number"])
        letter = (run.s.folder / "mail" / f"{number}.letter.txt").read_text()
        run.cards[number] = {"member": member, "secret": letter.split("secret: ")[1].strip(),
                             "balance": 0, "wrong": 0, "customer": f"cust-{member}"}
        run.credits[number] = []
        self.members[number] = member
        return number

    def charge(self, card: str, amount: int) -> None:
        """Cash at the financial system, then its load order loaded onto the purse (asked
        again through faults: the journal's resume, a new load of a ``ready`` order)."""
        run = self.run
        run.topup(card, amount)
        c = run.cards[card]
        bank = f"{self.thread.url}/purse/bank"
        deadline = time.monotonic() + 120
        while self.purse(card) != c["balance"]:
            assert time.monotonic() < deadline, (card, self.purse(card), c["balance"])
            try:
                run.ensure()
                with open_reader(f"virtual:{self.image(card)}") as reader:
                    LC.resume_loads(reader, journal=self.journal(card, "load"), http=self.http)
                    status, listed = run.web("/v1/wallet/list", {"member": c["member"]})
                    assert status == 200, listed
                    for order in listed["loads"]:
                        if order["card"] == card and order["state"] == "ready":
                            LC.load(bank, reader, account=order["account"],
                                    secret=order["secret"], amount=order["amount"],
                                    journal=self.journal(card, "load"), http=self.http)
            except (httpx.HTTPError, PaymentRefused, TerminalError):
                run.outcomes["real-load-retried"] += 1
            if self.purse(card) != c["balance"]:
                time.sleep(0.1)      # the financial system's report makes the load order
        run.outcomes["real-loaded"] += 1

    def paid(self, card: str, checkout: str) -> bool:
        """The purse pays the checkout (True), or refuses for its balance (False). Any
        interruption: the servers started again, the journal's resume finishes a payment
        past the card's debit, and only a payment never debited is paid again (the same
        checkout: the same transaction)."""
        url = f"{self.thread.url}/purse/checkout/{checkout}"
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline, card
            try:
                with open_reader(f"virtual:{self.image(card)}") as reader:
                    report = PC.resume(reader, journal=self.journal(card, "pay"),
                                       http=self.http)
                    if any(r["outcome"].startswith("completed") for r in report):
                        return True
                    if any(not r["outcome"].startswith(("abandoned", "refused"))
                           for r in report):
                        raise TerminalError(f"still open: {report}")
                    PC.pay(url, reader, journal=self.journal(card, "pay"), http=self.http)
                return True
            except Declined as exc:
                if exc.sw == SW.INSUFFICIENT_FUNDS:
                    return False
                raise
            except (httpx.HTTPError, PaymentRefused, TerminalError):
                self.run.outcomes["real-retried"] += 1
            time.sleep(0.2)
            self.run.ensure()

    def payment(self, card: str, kind: str, point: str | None) -> None:
        """One purchase paid by the real card's purse, then approved (embodiment 1)."""
        run = self.run
        c = run.cards[card]
        low = kind == "low-balance"
        if not low and c["balance"] < 3_000:
            self.charge(card, run.rng.randint(3_000, 20_000))
        amount = c["balance"] + run.rng.randint(1, 500) if low else \
            run.rng.randint(100, 3_000)
        p = run.purchase(card, amount)
        status, answer = run.web("/v1/wallet/choose", {
            "member": c["member"], "card": card, "secret": c["secret"],
            "purchase": signed(run.s.keys["mall"], p),
            "return_url": f"http://localhost:9999/shop/?order={p['order']}"})
        if status == 409:        # the choice's answer was lost (a kill): no checkout token
            run.outcomes["real-lost-choice"] += 1
            return
        assert status == 200, answer
        checkout = str(answer["checkout"])
        if point is not None:    # the gateway kills itself on this payment's confirmation
            run.s.kill("gateway")
            run.start("gateway", crash=point)
            run.kills[f"armed:{point}"] += 1
        before = self.purse(card)
        if not self.paid(card, checkout):
            assert low and self.purse(card) == before, (kind, before, amount)
            run.outcomes["real-refused-balance"] += 1
            self.charge(card, amount - c["balance"] + run.rng.randint(0, 2_000))
            before = self.purse(card)
            assert self.paid(card, checkout), card      # the same checkout, once loaded
            run.outcomes["real-paid-after-load"] += 1
        assert self.purse(card) == before - amount, (card, before, amount)
        c["balance"] -= amount
        status, answer = run.ask("approvals", p, {})
        assert status == 200 or (status == 409 and answer.get("state") == "approved"), \
            (status, answer)
        pid = checkout[:32]
        assert pid not in run.approved
        run.approved[pid] = (card, amount, p["order"])
        run.outcomes["real-approved"] += 1
        if run.rng.random() < 0.2:
            run.again("approvals", p, {}, True)


@pytest.fixture
def servers(tmp_path: Path) -> Any:
    s = Servers(tmp_path)
    try:
        for name in ("fin", "gateway", "van"):
            s.start(name)
        yield s
    finally:
        s.close()


def test_random_payments_with_faults_agree_to_the_cent(servers: Servers,
                                                       tmp_path: Path) -> None:
    print(f"\nwallet random run: SVCARD_WALLET_SEED={SEED} SVCARD_WALLET_PAYMENTS={PAYMENTS}")
    rng = random.Random(SEED)
    run = Run(servers, rng)
    started = time.monotonic()
    real_started = time.monotonic()
    real = RealCards(run, tmp_path / "real") if REAL else None
    real_seconds = time.monotonic() - real_started      # what the real cards add to the run
    try:
        wallets: dict[str, list[str]] = {}
        for i in range(8):
            member = f"m{i}-{SEED % 10_000}"
            wallets[member] = [run.new_card(member) for _ in range(rng.randint(1, 2))]
            for card in wallets[member]:
                run.topup(card, rng.randint(5_000, 40_000))
        reals = [] if real is None else [real.new_card(f"r{i}-{SEED % 10_000}")
                                         for i in range(REAL)]
        mark = time.monotonic()
        for card in reals:
            assert real is not None
            real.charge(card, rng.randint(5_000, 20_000))
        real_seconds += time.monotonic() - mark
        forced = {PAYMENTS // 4: "armed", PAYMENTS // 2: "timer", 3 * PAYMENTS // 4: "armed"}
        # real-card payments a short run has at least: (kind, crash point)
        forced_real = {PAYMENTS // 8: ("low-balance", PURSE_POINTS[0]),
                       3 * PAYMENTS // 8: ("honest", PURSE_POINTS[1]),
                       5 * PAYMENTS // 8: ("low-balance", None)}
        for n in range(PAYMENTS):
            timer = run.fault(forced.get(n, ""))
            if real is not None and (n in forced_real or rng.random() < REAL_SHARE):
                kind, point = forced_real.get(n) or (
                    rng.choice(("honest", "honest", "low-balance")),
                    rng.choice(PURSE_POINTS) if rng.random() < 0.2 else None)
                mark = time.monotonic()
                real.payment(rng.choice(reals), kind, point)
                real_seconds += time.monotonic() - mark
            else:
                member = rng.choice(sorted(wallets))
                card = rng.choice(wallets[member])
                if rng.random() < (0.5 if run.cards[card]["balance"] < 5_000 else 0.04):
                    run.topup(card, rng.randint(1_000, 20_000))
                run.payment(rng.choice(WAYS), rng.choice(KINDS), wallets[member])
            if timer is not None:
                timer.join()
            run.ensure()
            if n % 20 == 19:
                run.expire(wait=False)
        run.expire(wait=True)
        paid = time.monotonic() - started
        check_books(run, servers, tmp_path / "statements")
        for card in reals:      # each purse holds what its copy and statement say
            assert real is not None and real.purse(card) == run.cards[card]["balance"], card
    finally:
        if real is not None:
            real.close()
    print(f"wallet random run: {PAYMENTS} payments in {paid:.1f} s "
          f"(+{time.monotonic() - started - paid:.1f} s checks; real cards "
          f"{real_seconds:.1f} s of it); "
          f"outcomes {dict(sorted(run.outcomes.items()))}; "
          f"faults {dict(sorted(run.kills.items()))}")


def check_books(run: Run, s: Servers, out: Path) -> None:
    """The balances, the debits, the gateway's purchases and journal and the statements,
    against the model, to the minor unit."""
    run.ensure()
    wait_for("every report taken by the gateway", lambda: s.query(
        "fin", "SELECT count(*) FROM wf_outbox WHERE sent=0")[0][0] == 0, timeout=120)
    for card, c in run.cards.items():
        assert s.balance(card) == c["balance"], card
    debits = s.query("fin", "SELECT ref, card, amount FROM wf_movements WHERE kind='debit' "
                            "AND result='done'")
    by_pid = {ref.removeprefix("pay:"): (card, amount) for ref, card, amount in debits}
    assert len(by_pid) == len(debits)                         # one debit per purchase
    assert by_pid == {pid: (card, amount) for pid, (card, amount, _) in run.approved.items()}
    states = dict(s.query("gateway", "SELECT id, state FROM wg_purchases"))
    assert "approving" not in states.values()
    for pid, state in states.items():
        assert (state == "approved") <= (pid in by_pid), pid    # no approval without a debit
    # the gateway's journal: every movement once
    moved = s.query("fin", "SELECT ref, amount FROM wf_movements WHERE result='done'")
    journal = s.query("gateway", "SELECT ref, amount, card, member, day, mall_order "
                                 "FROM wg_journal")
    assert sorted((r, abs(a)) for r, a, *_ in journal) == sorted((r, a) for r, a in moved)
    # the daily statements, from the CLI, per member and card
    found: dict[str, dict[str, list[tuple[str, int, str]]]] = {}
    closing: dict[str, tuple[str, int]] = {}
    for day in sorted({row[4] for row in journal}):
        done = subprocess.run([SVCARD, "wallet", "statements", "--config",
                               str(s.configs["gateway"]), "--db", f"sqlite:///{s.db('gateway')}",
                               "--day", day, "--out", str(out)], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        for path in sorted((out / day).glob("*.json")):
            st = json.loads(path.read_text())
            for t in st["transactions"]:
                found.setdefault(st["member"], {}).setdefault(t["card"], []).append(
                    (t["kind"], t["amount"], t["order"]))
            for card, totals in st["cards"].items():
                assert totals["closing"] - totals["opening"] == \
                    totals["credited"] - totals["debited"]
                closing[card] = (day, totals["closing"])
    for card, c in run.cards.items():
        lines = found.get(c["member"], {}).get(card, [])
        want = sorted([("cash", a, "") for a in run.credits[card]] + [
            ("debit", -amount, order) for pid, (k, amount, order) in run.approved.items()
            if k == card])
        assert sorted(lines) == want, card
        assert closing[card][1] == c["balance"], card
