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

from svcard.host.wallet.base import CRASH_ENV

PAYMENTS = int(os.environ.get("SVCARD_WALLET_PAYMENTS") or 150)
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
    wallets: dict[str, list[str]] = {}
    for i in range(8):
        member = f"m{i}-{SEED % 10_000}"
        wallets[member] = [run.new_card(member) for _ in range(rng.randint(1, 2))]
        for card in wallets[member]:
            run.topup(card, rng.randint(5_000, 40_000))
    forced = {PAYMENTS // 4: "armed", PAYMENTS // 2: "timer", 3 * PAYMENTS // 4: "armed"}
    for n in range(PAYMENTS):
        timer = run.fault(forced.get(n, ""))
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
    print(f"wallet random run: {PAYMENTS} payments in {paid:.1f} s "
          f"(+{time.monotonic() - started - paid:.1f} s checks); "
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
