"""A randomised run of the service provider (seed 001) among the rest of the system: retail
orders of type A customers (no card: the SP pays with its purse pool and bills them) and card
payments of type B customers (their own purse, ``pay.client``), at three merchants behind two
points of sale: one payment server shared by MERCH001 and MERCH002 (FIG. 4B, an acquirer's
POS) and MERCH003 with its own payment server. The SP runs as a real process (``svcard serve
sp``) reached by the merchants through proxies that inject the faults: the SP SIGKILLed at a
step of an order (checkout sent or answered, the card's confirmation sent or answered) and
started again, the SP-merchant link cut before or after the merchant acted or down for a few
requests (the order is left in doubt for the SP's recovery); the customer's own link to the SP
is cut too, and a payment server restarts now and then between orders. The
pool's purses start low (top-ups from the SP's bank through the load flow) and one nears its
counter's end (retired mid-run). Non-billable customers (no account, blocked, over a tight
credit limit) are refused with nothing paid; the tight customer's bills are closed and paid
now and then, freeing its credit.

At the end the SP is restarted (recovery), batches are closed, clearing runs, and the books
must close to the minor unit: no order paid twice, none paid and unbilled, none billed and
unpaid; the purse debits are what the merchants' POS confirmed and clearing cleared; each
customer's bill lines are the payments made for them + fees - discounts; the purses' loads are
their debits + balances; and the whole-system audit, with the SP's database (``svcard audit
--sp-db``), is clean.

``--sp-orders N`` / ``SVCARD_SP_ORDERS`` (default 150; the long run is 2000+) and ``--sp-seed
S`` / ``SVCARD_SP_SEED`` change the run; the seed is printed first and replays the same
sequence of orders and faults (thread timing inside a burst of concurrent orders may differ).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import test_sp_purses as base
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from svcard.card.image import save_new_image
from svcard.host.demo.system import System, card_image, start_system
from svcard.host.kit.serving import ServerThread, free_port, wait_http
from svcard.host.load import client as LC
from svcard.host.load import records as load_records
from svcard.host.pay import client as C
from svcard.host.pay import records as pay_records
from svcard.host.pay.merchant import db as MD
from svcard.host.pay.merchant.server import MerchantConfig, MerchantServer
from svcard.host.pay.server.app import MerchantAccount, PaymentServer
from svcard.host.pay.stack import DEMO_MERCHANT_ID, Stack, psam_images, start_stack
from svcard.host.settle import clearing as CL
from svcard.host.settle import db as SDB
from svcard.host.settle.audit import audit, card_balances
from svcard.host.settle.config import clearing_config
from svcard.host.settle.db import make_engine as make_clearing_engine
from svcard.host.sp import db as D
from svcard.host.sp import records
from svcard.host.sp.billing import close_now, settle_bill
from svcard.host.sp.customers import add_customer, set_blocked
from svcard.host.sp.purses.db import PurseBook
from svcard.host.sp.purses.pool import PursePool
from svcard.host.sp.signing import new_key, signed_lookup, signed_order
from svcard.host.sp.stack import purse_images
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.purse import TerminalError
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import messages as M

SVCARD = str(Path(sys.executable).parent / "svcard")
SHARED, OWN = "shared", "own"
# merchant -> (its POS, the variant the SP asks for)
MERCHANTS = {"MERCH001": (SHARED, None), "MERCH002": (SHARED, "fig5"), "MERCH003": (OWN, "fig8")}
TERMINAL_OWN = bytes.fromhex("000000000002")
# the shared POS's terminals: MERCH001's (the demo PSAMs') and MERCH002's
TERMINAL_SHARED_A, TERMINAL_SHARED_B = bytes.fromhex("000000000001"), bytes.fromhex("000000000004")
# the SP's retail prices; the ticket's wholesale price is agreed (the merchant asks 12.50)
ITEMS = (("song", 120, None), ("ticket", 1300, 1250), ("article", 30, None))
GOOD = ("ann", "ben", "cat", "dan")
TIGHT, BLOCKED, GHOST = "tim", "bob", "gus"    # over a tight limit, blocked, no account
CARDS, FUNDING = 4, 5_000_000
PURSES, WORN_LEFT = 4, 12     # the worn purse retires after about WORN_LEFT payments
OUTAGE = 2        # requests refused after the one an outage starts at
KILL_POINTS = ("checkout-before", "checkout-after", "status-before", "status-after")


class FaultProxy:
    """Forwards to one merchant; armed once, at ``point`` it SIGKILLs the SP (``kill``),
    drops the link (``cut``: before the merchant or after it answered), or starts an
    ``outage``: that request and the next :data:`OUTAGE` ones get 502, so the pool's own
    immediate resume fails too and the order is left in doubt for the SP's recovery."""

    def __init__(self, merchant_url: str) -> None:
        self.merchant_url = merchant_url
        self.point, self.action, self.pid, self.fired = "", "", 0, ""
        self.outage = 0
        self.http = httpx.AsyncClient(timeout=30)

    def arm(self, point: str, action: str, pid: int) -> None:
        self.point, self.action, self.pid, self.fired = point, action, pid, ""

    def _fire(self, point: str) -> bool:
        if self.point != point:
            return False
        self.point, self.fired = "", f"{self.action} {point}"
        if self.action == "kill":
            os.kill(self.pid, signal.SIGKILL)
        elif self.action == "outage":
            self.outage = OUTAGE
        return True

    async def forward(self, request: Request) -> Response:
        step = "checkout" if "/checkout/" in request.url.path else "status"
        if self.outage:
            self.outage -= 1
            return Response(b"", 502)
        if self._fire(f"{step}-before"):
            return Response(b"", 502)
        answer = await self.http.request(
            request.method, self.merchant_url + request.url.path + (
                f"?{request.url.query}" if request.url.query else ""),
            content=await request.body(),
            headers={k: v for k, v in request.headers.items() if k.lower() != "host"})
        if self._fire(f"{step}-after"):
            return Response(b"", 502)
        return Response(answer.content, answer.status_code,
                        media_type=answer.headers.get("content-type"))

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.forward, methods=["GET", "POST"])])


class LinkCut(httpx.Client):
    """A client whose link drops at its n-th POST, before or after the request is sent."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__(timeout=60)
        self.cut_at, self.after_send, self.posts = rng.randrange(1, 5), rng.random() < 0.5, 0

    def post(self, url: Any, **kwargs: Any) -> httpx.Response:
        self.posts += 1
        if self.posts == self.cut_at:
            if self.after_send:
                super().post(url, **kwargs)
            raise httpx.ConnectError("simulated link cut")
        return super().post(url, **kwargs)


@dataclass
class Merchant:
    name: str
    pos: Stack
    server: MerchantServer
    thread: ServerThread
    proxy: FaultProxy
    proxy_thread: ServerThread
    extra: bool = False      # a second merchant on a shared POS (its threads are ours)

    def checkout(self, sku: str, variant: str) -> str:
        return f"{self.thread.url}/v1/checkout/{sku}?variant={variant}"


@dataclass
class SpProcess:
    folder: Path
    config: Path
    db: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> int:
        with open(self.folder / "sp.log", "ab") as log:
            self.proc = subprocess.Popen(
                [SVCARD, "serve", "sp", "--config", str(self.config), "--port", str(self.port)],
                stdout=subprocess.DEVNULL, stderr=log)
        wait_http(f"{self.url}/v1/health", timeout=120)
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)


def add_merchant(system: System, name: str) -> Merchant:
    """A second merchant on the system's payment server (the shared POS, FIG. 4B): its own
    key, commerce server and PSAM terminal (:data:`TERMINAL_SHARED_B`, 2 PSAMs joining the
    pool); the POS routes each payment by merchant id to that merchant's terminal, so clearing
    pays each merchant its own sum. The payment server starts again with both terminals."""
    mid, key, pay = name.encode(), os.urandom(32), system.pay
    config = pay.payment_server.config
    variants = frozenset(M.VARIANTS.values())
    config.merchants[DEMO_MERCHANT_ID] = MerchantAccount(DEMO_MERCHANT_ID, pay.shared_key,
                                                         variants, TERMINAL_SHARED_A)
    config.merchants[mid] = MerchantAccount(mid, key, variants, TERMINAL_SHARED_B)
    folder = system.folder / "psams-b"
    folder.mkdir()
    readers = [m.reader for m in pay.payment_server.pool.members] + [
        open_reader(f"virtual:{p}") for p in psam_images(folder, 2, TERMINAL_SHARED_B,
                                                           first_serial=21)]
    pay.payment.stop()
    pay.payment_server = PaymentServer(config, readers)
    pay.payment = ServerThread(pay.payment_server.app(), port=pay.payment.port).start()
    port = free_port()
    server = MerchantServer(MerchantConfig(
        mid, key, pay.payment.url, TERMINAL_SHARED_B,
        public_url=f"http://127.0.0.1:{port}", variants=frozenset({"fig5", "fig6", "fig8"}),
        db_url=f"sqlite:///{system.folder / f'merchant-{name}.db'}",
        max_open_per_client=10_000))
    thread = ServerThread(server.app(), port=port).start()
    return Merchant(name, pay, server, thread, None, None, extra=True)  # type: ignore[arg-type]


def behind_proxy(m: Merchant) -> Merchant:
    """The merchant's public address (checkout and confirmation) becomes a fault proxy's."""
    m.proxy = FaultProxy(m.thread.url)
    m.proxy_thread = ServerThread(m.proxy.app()).start()
    m.server.config.public_url = m.proxy_thread.url
    return m


def write_sp(folder: Path, system: System, merchants: dict[str, Merchant],
             pos_urls: list[str]) -> SpProcess:
    folder.mkdir(parents=True)
    system.load.account("sp-bank", FUNDING, "sp-bank-pw")
    purses = purse_images(folder / "purses", PURSES, ep=2_000, first_serial=8_300_001)
    worn = json.loads(purses[-1].read_text())
    worn["app"]["ep"]["offline_counter"] = 0xFFFF - 16 - WORN_LEFT
    save_new_image(purses[-1], worn, overwrite=True)
    lines = [f'db = "sqlite:///{folder / "sp.db"}"', 'journal_dir = "journals"',
             "[billing]", "maximum = 2000", "check_seconds = 1"]
    for name, (_pos, variant) in MERCHANTS.items():
        lines += ["[[merchant]]", f'name = "{name}"',
                  f'checkout_url = "{merchants[name].proxy_thread.url}/v1/checkout"',
                  "fee = 5", "pass_on_percent = 50"] + ([f'variant = "{variant}"']
                                                        if variant else [])
        for sku, retail, wholesale in ITEMS:
            lines += ["[[merchant.item]]", f'sku = "{sku}"', f"retail = {retail}"] + (
                [f"wholesale = {wholesale}"] if wholesale else [])
    readers = ", ".join(f'"virtual:{p}"' for p in purses)
    servers = ", ".join(f'"{u}"' for u in pos_urls)
    lines += ["[purses]", f"readers = [{readers}]", f'bank_url = "{system.load.bank_url}"',
              'account = "sp-bank"', 'secret = "sp-bank-pw"', "currency_code = 156",
              "topup_threshold = 1500", "topup_amount = 3000", "lease_timeout = 60",
              f"payment_servers = [{servers}]"]
    (folder / "sp.toml").write_text("\n".join(lines) + "\n")
    return SpProcess(folder, folder / "sp.toml", f"sqlite:///{folder / 'sp.db'}")


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[System, Stack, dict[str, Merchant]]]:
    # every client is on loopback: FIG. 5 holds per merchant and per client address above
    # the PSAMs (a draw then waits for a PSAM), as in benchmarks/bench_payment.py
    system = start_system(tmp_path / "sys", psams=2, hold_timeout=2.0,
                          max_holds_per_merchant=4, max_holds_per_client=4)
    own = start_stack(tmp_path / "own", psams=2, merchant_id=b"MERCH003",
                      terminal_id=TERMINAL_OWN, first_psam_serial=11, hold_timeout=2.0,
                      admin_token=system.admin_token, concentration_dir=str(system.batch_dir),
                      max_holds_per_merchant=4, max_holds_per_client=4)
    merchants: dict[str, Merchant] = {}
    try:
        merchants["MERCH001"] = behind_proxy(Merchant(
            "MERCH001", system.pay, system.pay.merchant_server, system.pay.merchant,
            None, None))  # type: ignore[arg-type]
        merchants["MERCH002"] = behind_proxy(add_merchant(system, "MERCH002"))
        merchants["MERCH003"] = behind_proxy(Merchant(
            "MERCH003", own, own.merchant_server, own.merchant, None, None))  # type: ignore[arg-type]
        yield system, own, merchants
    finally:
        for m in merchants.values():
            if m.proxy_thread is not None:
                m.proxy_thread.stop()
            if m.extra:
                m.thread.stop()
                m.server.close()
        own.close()
        system.close()


def write_clearing_config(path: Path) -> Path:
    from svcard.fixtures import fixture_path
    base = fixture_path("clearing-demo.toml").read_text().replace(
        'profile = "demo-issuer.toml"', f'profile = "{fixture_path("demo-issuer.toml")}"')
    path.write_text(base + f'''
[[terminal]]
terminal_id = "{TERMINAL_SHARED_B.hex()}"
batch_key = "311B7052A40A83B818D99E9EC07821C9"
merchant_id = "{b"MERCH002".hex().upper()}"
acquirer_id = "4143515530303031"

[[terminal]]
terminal_id = "{TERMINAL_OWN.hex()}"
batch_key = "311B7052A40A83B818D99E9EC07821C9"
merchant_id = "{b"MERCH003".hex().upper()}"
acquirer_id = "4143515530303032"
''')
    return path


@dataclass
class Run:
    rng: random.Random
    sp: SpProcess
    merchants: dict[str, Merchant]
    http: httpx.Client
    keys: dict[str, bytes]
    stats: Counter[str] = field(default_factory=Counter)
    breaches: list[str] = field(default_factory=list)

    def order_key(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    def lookup(self, who: str, order_key: str) -> str:
        body, headers = signed_lookup(self.keys[who], who, order_key)
        answer = self.http.post(f"{self.sp.url}/v1/orders/lookup", content=body,
                                headers=headers)
        return str(answer.json().get("state")) if answer.status_code == 200 else \
            f"lookup {answer.status_code}"

    def restart_sp(self) -> None:
        assert self.sp.proc is not None
        self.sp.proc.wait(timeout=60)
        self.sp.start()   # recovery runs before it answers

    def order(self, who: str, merchant: str, sku: str, fault: str = "", retries: int = 0,
              burst: bool = False, key: str = "") -> None:
        """One retail order of type A customer ``who``; ``fault``: '', 'kill', 'cut',
        'outage' (the SP-merchant link) or 'link' (the customer's link to the SP). On a 503
        (busy, nothing paid: e.g. a FIG. 5 hold an interrupted payment left at the POS, until
        it times out) the customer orders again, up to ``retries`` times, backing off.
        ``burst``: one of several orders at once, which may all be busy: no breach then."""
        key = key or self.order_key()
        body, headers = signed_order(self.keys[who], who, merchant, sku, order_key=key)
        proxy = self.merchants[merchant].proxy
        if fault in ("kill", "cut", "outage"):
            assert self.sp.proc is not None
            proxy.arm(self.rng.choice(KILL_POINTS), fault, self.sp.proc.pid)
        lost = fault == "link" and self.rng.random() < 0.5    # cut before the SP got it
        answer: httpx.Response | None = None
        try:
            if not lost:
                answer = self.http.post(f"{self.sp.url}/v1/orders", content=body,
                                        headers=headers)
        except httpx.HTTPError:
            pass
        finally:
            fired = proxy.fired
            proxy.arm("", "", 0)
        if fired:
            self.stats[f"fault: {fired}"] += 1
            if fired.startswith("kill"):
                self.restart_sp()
        if fault == "link":
            answer = None
            self.stats["fault: customer link cut " + ("before" if lost else "after")] += 1
        label = "good" if who in GOOD else who
        if answer is None:
            self.stats[f"A {label}: looked up {self.lookup(who, key)}"] += 1
            return
        kind = answer.json().get("kind", "") if answer.status_code == 402 else ""
        self.stats[f"A {label}: {answer.status_code} {kind}".rstrip()] += 1
        if retries and answer.status_code == 503:   # busy, nothing paid: order again
            time.sleep(0.25 * 2 ** (4 - retries))      # the customer's backoff
            self.order(who, merchant, sku, retries=retries - 1, burst=burst,
                       key=hashlib.sha256(key.encode()).hexdigest()[:32])
        elif burst and answer.status_code == 503:   # busy every time: the customer gives up
            self.stats["A good: 503 every time in a burst"] += 1
        elif who in GOOD and not fault and answer.status_code != 200:
            self.breaches.append(f"clean order of {who} at {merchant} answered "
                                 f"{answer.status_code}: {answer.text[:200]}")
        if who in (BLOCKED, GHOST) and answer.status_code == 200:
            self.breaches.append(f"non-billable {who} was served")


def type_b(run: Run, cards: list[Path], journal: Journal, system: System) -> None:
    rng = run.rng
    card = rng.choice(cards)
    with open_reader(f"virtual:{card}") as reader:
        try:   # what an interruption left on this card, first
            C.resume(reader, journal=journal, http=run.http)
            LC.resume_loads(reader, journal=journal, http=run.http)
        except (TerminalError, httpx.HTTPError) as exc:
            run.stats[f"B resume failed: {type(exc).__name__}"] += 1
        http = LinkCut(rng) if rng.random() < 0.08 else run.http
        if http is not run.http:
            run.stats["fault: card holder's link cut"] += 1
        try:
            if rng.random() < 0.15:
                out = LC.load(system.load.bank_url, reader, account="cust", secret="cust-pw",
                              amount=rng.randrange(2_000, 8_000), journal=journal, http=http)
                run.stats[f"B load {out.outcome}"] += 1
            m = run.merchants[rng.choice(list(MERCHANTS))]
            C.pay(f"{m.proxy_thread.url}/v1/checkout/{rng.choice(ITEMS)[0]}?variant="
                  f"{rng.choice(('fig5', 'fig6', 'fig8'))}", reader, journal=journal,
                  http=http)
            run.stats["B purchase done"] += 1
        except (TerminalError, httpx.HTTPError) as exc:
            run.stats[f"B ended: {type(exc).__name__}"] += 1
        finally:
            if http is not run.http:
                http.close()


def test_sp_randomised_run_closes_to_the_minor_unit(
        world: tuple[System, Stack, dict[str, Merchant]], tmp_path: Path, sp_orders: int,
        sp_seed: int) -> None:
    ORDERS, SEED = sp_orders, sp_seed
    print(f"\nSP simulation: seed {SEED}, {ORDERS} orders (replay: --sp-seed {SEED} "
          f"--sp-orders {ORDERS})")
    started = time.monotonic()
    rng = random.Random(SEED)
    system, own, merchants = world
    sp = write_sp(tmp_path / "sp", system, merchants, [system.pay.payment.url,
                                                       own.payment.url])
    engine = D.make_engine(sp.db)
    keys: dict[str, bytes] = {}
    for who in (*GOOD, TIGHT, BLOCKED, GHOST):
        keys[who], public = new_key()
        if who != GHOST:
            add_customer(engine, who, public, 600 if who == TIGHT else 100_000_000, 156)
    set_blocked(engine, BLOCKED, True, "unpaid bills")
    system.load.account("cust", FUNDING, "cust-pw")
    bank_before = system.load.bank_server.db.totals()["accounts"]
    cards = [card_image(tmp_path, f"card{i}.json", ep=0) for i in range(CARDS)]
    journal = Journal(tmp_path / "journal.jsonl")
    sp.start()
    pos = {SHARED: system.pay, OWN: own}
    try:
        with httpx.Client(timeout=60) as http:
            for card in cards:
                with open_reader(f"virtual:{card}") as reader:
                    assert LC.load(system.load.bank_url, reader, account="cust",
                                   secret="cust-pw", amount=20_000, journal=journal,
                                   http=http).outcome == "loaded"
            run = Run(rng, sp, merchants, http, keys)
            done = 0
            while done < ORDERS:
                roll = rng.random()
                if roll < 0.005:   # a payment server restarts between orders
                    which = rng.choice((SHARED, OWN))
                    pos[which].restart_payment()
                    run.stats[f"fault: {which} POS restarted"] += 1
                elif roll < 0.02:  # the tight customer's open lines billed, its bills paid
                    close_now(engine, TIGHT, 14)
                    for bill in records.bills(sp.db, TIGHT):
                        if bill["state"] == D.ISSUED:
                            assert settle_bill(engine, bill["id"])
                    run.stats["tight customer paid its bills"] += 1
                if roll < 0.03:    # a burst of concurrent orders
                    burst = [(rng.choice(GOOD), rng.choice(list(MERCHANTS)),
                              rng.choice(ITEMS)[0], run.order_key())
                             for _ in range(rng.randrange(3, 9))]
                    with ThreadPoolExecutor(len(burst)) as ex:
                        list(ex.map(lambda a: run.order(a[0], a[1], a[2], retries=4, burst=True,
                                                     key=a[3]),
                                    burst))
                    run.stats["bursts"] += 1
                    done += len(burst)
                elif roll < 0.72:
                    who = rng.choices((*GOOD, TIGHT, BLOCKED, GHOST), (20, 20, 20, 20, 10, 5, 5))[0]
                    merchant, sku = rng.choice(list(MERCHANTS)), rng.choice(ITEMS)[0]
                    f = rng.random() if who in GOOD else 1.0
                    fault = "kill" if f < 0.03 else "cut" if f < 0.06 else \
                        "outage" if f < 0.08 else "link" if f < 0.10 else ""
                    run.order(who, merchant, sku, fault, retries=0 if fault else 4)
                    done += 1
                else:
                    type_b(run, cards, journal, system)
                    done += 1
            # the end: a restart (recovery), then every order settled
            sp.stop()
            sp.start()
            deadline = time.monotonic() + 180
            while records.orders(sp.db, D.PAYING) + records.orders(sp.db, D.PAID) + \
                    records.orders(sp.db, D.IN_DOUBT):
                assert time.monotonic() < deadline, [
                    (o["order_ref"], o["state"], o["reason"]) for o in records.orders(sp.db)
                    if o["state"] in (D.PAYING, D.PAID, D.IN_DOUBT)]
                time.sleep(0.2)
            for _ in range(3):   # every type B card's leftovers
                for card in cards:
                    with open_reader(f"virtual:{card}") as reader:
                        C.resume(reader, journal=journal, http=http)
                        LC.resume_loads(reader, journal=journal, http=http)
        sp.stop()
        print(dict(sorted(run.stats.items())))
        assert run.breaches == [], run.breaches[:20]
        check_books(system, own, merchants, sp, engine, cards, journal, tmp_path,
                    bank_before, run.stats, ORDERS)
        print(f"SP simulation: {ORDERS} orders in {time.monotonic() - started:.0f} s")
    finally:
        sp.stop()
        engine.dispose()


def check_books(system: System, own: Stack, merchants: dict[str, Merchant], sp: SpProcess,
                engine: Any, cards: list[Path], journal: Journal, tmp_path: Path,
                bank_before: int, stats: Counter[str], orders_run: int) -> None:
    """Close batches, clear, audit; the SP's and the pool's books three ways."""
    open_left = [e for e in journal.entries().values()
                 if e["state"] not in ("done", "abandoned", "refused", "load-done")]
    assert open_left == []
    orders = records.orders(sp.db)
    states = Counter(o["state"] for o in orders)
    events = Counter(e["event"] for e in records.order_log(sp.db))
    print("SP orders:", dict(states), "log:", dict(events))
    if orders_run >= 1000:   # the SP's recovery of orders left in doubt was exercised
        assert events["in_doubt"] > 0
    assert set(states) <= {D.REJECTED, D.BILLED, D.FAILED}, states
    billed = {o["order_ref"]: o for o in orders if o["state"] == D.BILLED}
    book = PurseBook(engine)
    payments = book.all_payments()
    paid = {p["order_ref"]: p for p in payments if p["state"] in ("paid", "disputed")}
    # none paid and unbilled, none billed and unpaid, none paid twice (one claim per order)
    assert sorted(paid) == sorted(billed)
    assert len({p["order_ref"] for p in payments}) == len(payments)
    for ref, o in billed.items():
        p = paid[ref]
        assert (o["wholesale"], o["purse_serial"], o["merchant_txn"]) == (
            p["amount"], p["purse_serial"], p["txn_id"]), (o, p)
    # each customer's bill lines = the payments made for them + fees - discounts
    lines = records.bill_lines(sp.db)
    assert sorted(ln["order_ref"] for ln in lines) == sorted(billed)
    for ln in lines:
        o = billed[ln["order_ref"]]
        discount = max(0, o["retail"] - o["wholesale"]) * o["pass_on_percent"] // 100
        assert (ln["wholesale"], ln["fee"], ln["discount"], ln["billed"]) == (
            o["wholesale"], o["fee"], discount, o["retail"] + o["fee"] - discount), ln
    issued = records.bills(sp.db)
    for c in records.customers(sp.db):
        mine = [ln["billed"] for ln in lines if ln["customer"] == c["id"]]
        bills = [b for b in issued if b["customer"] == c["id"]]
        assert c["reserved"] == 0, c
        assert c["open_total"] + sum(b["total"] for b in bills) == sum(mine), c
        assert c["owed"] == sum(b["total"] for b in bills if b["state"] == D.ISSUED), c
        assert all(b["total"] == sum(ln["billed"] for ln in b["items"]) for b in bills)
    # the POS side: the purses' debits are what the merchants' POS confirmed, per merchant
    purses = {p["serial"][-16:].lower(): p for p in book.all_purses()}
    pos_dbs = (system.pay.payment_server.config.db_url, own.payment_server.config.db_url)
    confirmed = [r for url in pos_dbs for r in pay_records.payments(url)
                 if r["state"] == "confirmed"]
    from_sp = [r for r in confirmed if r["card_serial"][-16:].lower() in purses]
    assert sorted(r["txn_id"] for r in from_sp) == sorted(o["merchant_txn"]
                                                          for o in billed.values())
    assert Counter(bytes.fromhex(r["merchant_id"]).decode() for r in from_sp) == \
        Counter(o["merchant"] for o in billed.values())
    for name, m in merchants.items():   # each merchant released what its POS confirmed
        counts = m.server.db.counts()
        assert counts.get(MD.PAID, 0) + counts.get(MD.UNPROVEN, 0) == sum(
            1 for r in confirmed if bytes.fromhex(r["merchant_id"]).decode() == name), name
    # the pool's own books: opening + loaded = debits + balances, each purse's card agrees
    [books] = book.summary().values()
    print("pool books:", books)
    assert books["opening"] + books["loaded"] == books["debits"] + books["balances"]
    assert (books["open_payments"], books["open_loads"]) == (0, 0)
    assert books["debits"] == sum(p["amount"] for p in paid.values()) == \
        sum(r["amount"] for r in from_sp)
    purse_files = [Path(spec.split(":", 1)[1]) for spec in
                   (p["reader"] for p in book.all_purses())]
    assert books["balances"] == sum(json.loads(f.read_text())["app"]["ep"]["balance"]
                                    for f in purse_files)
    # the purses' loads from the SP's bank, as the load server confirmed them
    load_db = system.load.load_server.config.db_url
    loaded = [ld for ld in load_records.loads(load_db, "loaded")
              if ld["card_serial"][-16:].lower() in purses]
    assert sum(ld["amount"] for ld in loaded) == books["loaded"] > 0
    worn = [p for p in book.all_purses() if p["state"] == "retired"]
    if stats.get("A good: 200", 0) >= 8 * WORN_LEFT:
        assert len(worn) == 1 and "counter" in worn[0]["reason"], worn
    # batches closed, clearing, the whole-system audit over every card
    system.close_batches()
    closed = httpx.post(f"{own.payment.url}/v1/batches/close", timeout=60,
                        headers={"Authorization": f"Bearer {system.admin_token}"})
    assert closed.status_code == 200
    config = clearing_config(write_clearing_config(tmp_path / "clearing.toml"))
    report = CL.run_clearing(config, system.batch_dir, make_clearing_engine(system.clearing_db),
                             tmp_path / "settlement", load_db_urls=(load_db,))
    clearing = make_clearing_engine(system.clearing_db)
    try:
        with clearing.connect() as conn:
            cleared = [dict(r._mapping) for r in conn.execute(SDB.records.select())]
    finally:
        clearing.dispose()
    assert sum(r["amount"] for r in cleared if r["card_serial"].lower() in purses
               and r["state"] == "cleared") == books["debits"]
    for name in MERCHANTS:   # FIG. 4B: clearing pays each merchant what its POS confirmed
        mid = name.encode().hex().upper()
        assert sum(r["amount"] for r in cleared if r["merchant_id"].upper() == mid) == sum(
            r["amount"] for r in confirmed if r["merchant_id"].upper() == mid) > 0, name
    readers = [open_reader(f"virtual:{c}") for c in (*cards, *purse_files)]
    for r in readers:
        r.connect()
    try:
        balances = card_balances(readers)
    finally:
        for r in readers:
            r.disconnect()
    result = audit(balances, payment_dbs=pos_dbs, load_dbs=(load_db,),
                   bank_dbs=(system.load.bank_server.config.db_url,),
                   clearing_db=system.clearing_db, opening=books["opening"],
                   sp_dbs=(sp.db,))   # svcard audit --sp-db: the SP's three-way closing
    print(result.figures, [b["counts"] for b in report.batches])
    assert result.clean, result.discrepancies[:20]
    assert result.sp_pending == [] and all(c["ok"] for c in result.checks)
    sp_checks = [c for c in result.checks if c["name"] not in
                 {c2["name"] for c2 in audit(balances, opening=books["opening"]).checks}]
    assert len(sp_checks) >= 3, result.checks   # the three SP equations were checked
    assert report.total_paid == result.figures["purchases settled"]
    totals = system.load.bank_server.db.totals()
    assert totals["accounts"] + totals.get("confirmed", 0) == bank_before
    if orders_run >= 100:   # the run was a real one: many of each kind, and faults
        assert stats["B purchase done"] > orders_run // 8 and stats["A good: 200"] > orders_run // 3
        assert sum(n for k, n in stats.items() if k.startswith("fault: kill")) > 0


engine, sp_system = base.engine, base.sp_system   # test_sp_purses' fixtures
WAITERS = 12


def test_a_purse_given_back_is_not_raced_by_every_waiting_order(
        sp_system: System, engine: Any, tmp_path: Path) -> None:
    """12 orders at once on a pool of one purse: each is paid once, and the pool tries at
    most 3 leases per order (one that wins, a couple lost to a race), not one per waiting
    order per give-back and per poll."""
    spec = base.purse_image(tmp_path, 1, ep=40_000)
    pool = PursePool.open(base.pool_config(sp_system, [spec], lease_timeout=120.0), engine,
                          journal_dir=tmp_path / "j")
    tries = Counter[str]()
    lease = pool.book.lease

    def counted(*args: Any, **kwargs: Any) -> Any:
        tries["lease"] += 1
        return lease(*args, **kwargs)

    pool.book.lease = counted  # type: ignore[method-assign]
    url = sp_system.pay.checkout_url("ticket")

    def one(i: int) -> str:
        with httpx.Client(timeout=60) as http:
            return pool.pay(url, http=http, order_ref=f"wait-{i:02d}",
                            amount=base.TICKET).txn_id

    with ThreadPoolExecutor(WAITERS) as ex:
        paid = list(ex.map(one, range(WAITERS)))
    assert len(set(paid)) == WAITERS
    print(f"lease attempts: {tries['lease']} for {WAITERS} orders")
    assert tries["lease"] <= 3 * WAITERS, tries
