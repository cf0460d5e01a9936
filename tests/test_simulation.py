"""A randomized simulation of the whole system: thousands of mixed loads and purchases across
several cards, bank accounts, merchants (each with its own PSAM pool and acquirer) and PSAMs,
with faults injected at random points (links cut before or after a request reached a server,
card answers lost before or after the card acted, a payment or load server restarted in the
middle of a transaction, its held PSAM sessions lost, or between transactions). Every card's
interrupted transactions are resumed the next time it is used, as ``svcard pay``/``svcard
load`` do; at the end, batches are closed, clearing runs, and the audit must balance to the
cent.

Beside the honest clients run attackers (:mod:`sim_attacks`): forged, replayed, raced,
truncated and out-of-order messages of every kind, and fabricated draws on honest cards'
serials. After the run: no money created or lost, no goods released unpaid, no honest card or
payment blocked, every attack refused, audit clean.

``--sim-ops N`` / ``SVCARD_SIM_OPS`` (default 2000) and ``--sim-seed S`` / ``SVCARD_SIM_SEED``
change the run; the seed is printed first, and a failing seed replays the same sequence of
operations and attacks (thread timing inside a race may differ).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sim_attacks import ATTACKER_ACCOUNT, ATTACKER_SECRET, ATTACKS, Arena

from svcard.fixtures import fixture_path
from svcard.host.demo.system import card_image, start_system
from svcard.host.load import client as LC
from svcard.host.pay import client as C
from svcard.host.pay.stack import start_stack
from svcard.host.settle import clearing as CL
from svcard.host.settle.audit import audit, card_balances
from svcard.host.settle.config import clearing_config
from svcard.host.settle.db import make_engine as make_clearing_engine
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.purse import TerminalError
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import messages as M
from svcard.reader import Reader

ATTACK_RATE = 0.12
RESTART_RATE = 0.01
MERCHANT_B = bytes.fromhex("4D45524348303032")   # "MERCH002"
TERMINAL_B = bytes.fromhex("000000000002")
CARDS, ACCOUNTS, FUNDING = 6, 3, 2_000_000


class CardLost(Exception):
    """The card was pulled out (the simulated fault)."""


class FaultyHttp(httpx.Client):
    """A real HTTP client whose link drops once, at the n-th POST, before or after sending."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__(timeout=30)
        self.cut_at, self.after_send = rng.randrange(1, 6), rng.random() < 0.5
        self.posts = 0

    def post(self, url: Any, **kwargs: Any) -> httpx.Response:  # type: ignore[override]
        self.posts += 1
        if self.posts == self.cut_at:
            if self.after_send:
                super().post(url, **kwargs)
            raise httpx.ConnectError("simulated link cut")
        return super().post(url, **kwargs)


class RestartingHttp(httpx.Client):
    """A real HTTP client during whose transaction a server goes down and comes back: once the
    n-th POST has been answered, the server it reached restarts (its in-memory state, such as a
    held FIG. 5 PSAM session, is lost) before the client's next step."""

    def __init__(self, rng: random.Random, restarts: dict[str, Callable[[], None]]) -> None:
        super().__init__(timeout=30)
        self.restart_at, self.restarts, self.posts = rng.randrange(1, 5), restarts, 0

    def post(self, url: Any, **kwargs: Any) -> httpx.Response:  # type: ignore[override]
        self.posts += 1
        response = super().post(url, **kwargs)
        if self.posts == self.restart_at:
            for base, restart in self.restarts.items():
                if str(url).startswith(base):
                    restart()
                    break
        return response


def pull_card_at(reader: Reader, rng: random.Random) -> None:
    """Make the card vanish around its value command (DEBIT or CREDIT FOR LOAD)."""
    real = reader.exchange
    reached = rng.random() < 0.5

    def exchange(apdu: bytes) -> Any:
        if apdu[:2] in (b"\x80\x54", b"\x80\x52"):
            if reached:
                real(apdu)
            raise CardLost()
        return real(apdu)

    reader.exchange = exchange  # type: ignore[method-assign]


def write_clearing_config(path: Path) -> Path:
    base = (fixture_path("clearing-demo.toml")).read_text().replace(
        'profile = "demo-issuer.toml"', f'profile = "{fixture_path("demo-issuer.toml")}"')
    path.write_text(base + f'''
[[terminal]]
terminal_id = "{TERMINAL_B.hex()}"
batch_key = "311B7052A40A83B818D99E9EC07821C9"
merchant_id = "{MERCHANT_B.hex().upper()}"
acquirer_id = "4143515530303032"
''')
    return path


def test_randomized_simulation_balances_to_the_cent(tmp_path: Path, sim_ops: int,
                                                   sim_seed: int) -> None:
    OPS, SEED = sim_ops, sim_seed
    print(f"\nsimulation: seed {SEED}, {OPS} operations (replay: --sim-seed {SEED} "
          f"--sim-ops {OPS})")
    rng = random.Random(SEED)
    system = start_system(tmp_path / "sys", psams=2, hold_timeout=2.0)
    pay_b = start_stack(tmp_path / "payB", psams=2, merchant_id=MERCHANT_B,
                        terminal_id=TERMINAL_B, first_psam_serial=11, hold_timeout=2.0,
                        admin_token=system.admin_token,
                        concentration_dir=str(system.batch_dir))
    try:
        accounts = [f"acct{i}" for i in range(ACCOUNTS)]
        for a in accounts:
            system.load.account(a, FUNDING, "pw")
        system.load.account(ATTACKER_ACCOUNT, FUNDING, ATTACKER_SECRET)
        system.load.account("victim", FUNDING, "a long secret nobody guesses")
        cards = [card_image(tmp_path, f"card{i}.json", ep=0) for i in range(CARDS)]
        journal = Journal(tmp_path / "journal.jsonl")
        stats: Counter[str] = Counter()
        stacks = [system.pay, pay_b]
        skus = ["song", "ticket", "article", "login"]
        with httpx.Client(timeout=30) as clean_http:
            arena = Arena(rng, stacks, cards, journal, clean_http, load=system.load)
            for _ in range(OPS):
                if rng.random() < ATTACK_RATE:
                    rng.choice(ATTACKS)(arena)
                    continue
                if rng.random() < RESTART_RATE:  # a server goes down and comes back
                    victim = rng.randrange(3)
                    if victim == 2:
                        system.load.restart_load()
                    else:
                        stacks[victim].restart_payment()
                    stats[f"fault: {('payment A', 'payment B', 'load')[victim]} server "
                          f"restarted between transactions"] += 1
                card = rng.choice(cards)
                with open_reader(f"virtual:{card}") as reader:
                    try:  # what an interruption left on this card, first
                        C.resume(reader, journal=journal, http=clean_http)
                        LC.resume_loads(reader, journal=journal, http=clean_http)
                    except (TerminalError, httpx.HTTPError) as exc:
                        stats[f"resume failed: {type(exc).__name__}"] += 1
                    fault = rng.random()
                    http: httpx.Client = clean_http
                    if fault < 0.08:
                        http = FaultyHttp(rng)
                        stats["fault: link cut"] += 1
                    elif fault < 0.12:
                        pull_card_at(reader, rng)
                        stats["fault: card pulled"] += 1
                    elif fault < 0.14:
                        http = RestartingHttp(rng, {
                            system.pay.payment.url: system.pay.restart_payment,
                            pay_b.payment.url: pay_b.restart_payment,
                            system.load.load.url: system.load.restart_load})
                        stats["fault: a server restarted mid-transaction"] += 1
                    try:
                        if rng.random() < 0.25:
                            out = LC.load(system.load.bank_url, reader,
                                          account=rng.choice(accounts), secret="pw",
                                          amount=rng.randrange(100, 3_000), journal=journal,
                                          http=http)
                            stats[f"load {out.outcome}"] += 1
                        else:
                            stack = rng.choice(stacks)
                            C.pay(stack.checkout_url(rng.choice(skus),
                                                     rng.choice(list(M.VARIANTS))),
                                  reader, journal=journal, http=http)
                            stats["purchase done"] += 1
                    except (TerminalError, httpx.HTTPError, CardLost) as exc:
                        stats[f"ended: {type(exc).__name__}"] += 1
                        if ((http is clean_http or isinstance(http, RestartingHttp))
                                and isinstance(exc, C.PaymentRefused)
                                and exc.status == 409):
                            arena.tally.breaches.append(f"honest operation refused: {exc}")
                    finally:
                        if http is not clean_http:
                            http.close()
            for _ in range(3):  # every card's leftovers, until nothing is left
                for card in cards:
                    with open_reader(f"virtual:{card}") as reader:
                        C.resume(reader, journal=journal, http=clean_http)
                        LC.resume_loads(reader, journal=journal, http=clean_http)
        print("attacks:", arena.tally.table())
        assert arena.tally.breaches == [], arena.tally.breaches[:20]
        assert sum(arena.tally.tried.values()) > OPS * ATTACK_RATE / 2
        open_left = [e for e in journal.entries().values()
                     if e["state"] not in ("done", "abandoned", "refused", "load-done")]
        assert open_left == []
        system.close_batches()
        closed = httpx.post(f"{pay_b.payment.url}/v1/batches/close", timeout=60,
                            headers={"Authorization": f"Bearer {system.admin_token}"})
        assert closed.status_code == 200 and closed.json()["batches"]
        config = clearing_config(write_clearing_config(tmp_path / "clearing.toml"))
        report = CL.run_clearing(config, system.batch_dir, make_clearing_engine(system.clearing_db),
                                 tmp_path / "settlement",
                                 load_db_urls=(system.load.load_server.config.db_url,))
        readers = [open_reader(f"virtual:{c}") for c in cards]
        for r in readers:
            r.connect()
        try:
            balances = card_balances(readers)
        finally:
            for r in readers:
                r.disconnect()
        result = audit(balances, payment_dbs=(system.pay.payment_server.config.db_url,
                                              pay_b.payment_server.config.db_url),
                       load_dbs=(system.load.load_server.config.db_url,),
                       bank_dbs=(system.load.bank_server.config.db_url,),
                       clearing_db=system.clearing_db)
        print(dict(stats), result.figures, [b["counts"] for b in report.batches])
        assert result.clean, result.discrepancies[:20]
        # the bank's own books: every unit is in an account or on a confirmed load
        totals = system.load.bank_server.db.totals()
        assert totals["accounts"] + totals.get("confirmed", 0) == (ACCOUNTS + 2) * FUNDING
        assert result.figures["card balances"] == (result.figures["loads confirmed"]
                                                   - result.figures["purchases proven"])
        assert report.total_paid == result.figures["purchases settled"]
        # the run was a real one: many of each, and faults of each kind
        assert stats["purchase done"] > OPS // 4 and stats["load loaded"] > OPS // 20
        if OPS >= 1000:
            assert stats["fault: link cut"] > OPS // 30
            assert stats["fault: card pulled"] > OPS // 60
    finally:
        pay_b.close()
        system.close()
