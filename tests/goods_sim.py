"""The randomised goods run of issue 12 (seed 000), shared by tests/test_goods_random_run.py and
a long run by hand.

The five goods servers run as ``svcard serve goods-*`` processes on loopback (SQLite). Device
threads, each with its own key and its own card images (virtual reader), buy goods; every
good's fate is drawn from its own random stream (``Random(f"{seed}/{n}")``), so a run replays
its plan from the seed whatever the threads' timing:

* ``honest``; ``decline``; ``walk-away`` (the first message never answered);
* ``wrong-pin`` (VERIFY PIN refused by the card, sometimes torn at the try counter's write,
  then the right PIN);
* ``cut-before`` / ``cut-after``: the card pulled at the goods write (before the card took it,
  or after it did and its answer was lost) (:class:`test_goods_pickup.LinkCut`);
* ``tear``: the power cut at a random step of the card's persistent write of the good (the
  tearing harness: :class:`test_goods_pickup.Tear` on the card image);
* ``net-before`` / ``net-after``: the device's link to the authentication server cut on the
  authorisation or the "written" message (the request never sent, or its answer lost).

Each good is paid either from the bank account (the secure write) or, with ``purse`` on, by
the card's purse (the composite purchase: ``Device.pay_with_purse``; the cuts and tears then
fall on its UPDATE CAPP DATA CACHE and DEBIT, the link cuts on the debit and proof messages).
The payment server then holds two PSAMs (started by tests/goods_sim_serve.py). The card
proves only its last transaction, so a DEBIT whose answer was lost must be proved before the
next purchase opens, and none may open while that proof cannot reach the payment server
(``Device.pay_with_purse`` does so since ef9f12d; before, this run ended with goods on cards,
paid by the purse, whose orders expired). With ``settle_first`` the run proves it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
from sqlalchemy import select
from test_goods_pickup import LinkCut, Tear
from test_goods_processes import Processes, run

from svcard.card.image import open_card
from svcard.card.storage import WRITE_STEPS, PowerCut, read_image
from svcard.host.goods import db as D
from svcard.host.goods import wire as W
from svcard.host.goods.config import goods_config
from svcard.host.goods.device import Device, DeviceError, FirstMessage
from svcard.host.goods.server import payment as payment_server
from svcard.host.goods.server.bank import add_account
from svcard.host.goods.stack import SERVERS, make_card, psam_images
from svcard.host.kit.serving import wait_http
from svcard.host.terminal.capp import read_goods
from svcard.host.terminal.purse import prove, read_log_info
from svcard.protocols import purse as P
from svcard.reader.base import CardRemovedError, Reader
from svcard.reader.virtual import VirtualReader

T = TypeVar("T")
START = 1_000_000        # each bank account's balance
EP = 100_000             # each card's purse (the purse path), the demo profile's limit
PIN, WRONG_PIN = "123456", "654321"
SKUS = ("ticket", "coupon", "airtime", "rides10")
PER_CARD = 32            # kinds in turn, 8 records a kind: a card is changed before a file fills
KILLED = ("auth", "payment", "fulfil")
FATES = {"honest": 6, "decline": 1, "walk-away": 1, "wrong-pin": 2, "cut-before": 2,
         "cut-after": 2, "tear": 3, "net-before": 1, "net-after": 2}
STALE_OFFERS = 8         # a device declines first messages it left this many behind
RETRY = 90.0             # s a device keeps trying one step while servers are killed
CAPP_CACHE, CAPP_DEBIT, SECURE_WRITE = b"\x84\xde", b"\x80\x54", b"\x04\xdc"
SERVE = str(Path(__file__).parent / "goods_sim_serve.py")


class CutAt:
    """A reader whose link fails at the first command starting with ``prefix``: ``after``
    True, the card took it and its answer was lost; False, it never reached the card."""

    def __init__(self, inner: Reader, prefix: bytes, after: bool) -> None:
        self.inner, self.prefix, self.after = inner, prefix, after

    def exchange(self, apdu: bytes) -> Any:
        if apdu.startswith(self.prefix):
            if self.after:
                self.inner.exchange(apdu)
            raise CardRemovedError("the card was pulled")
        return self.inner.exchange(apdu)


class NetCut(httpx.BaseTransport):
    """The device's link to the authentication server, cut once on the next request to a
    path: ``after`` False, the request never leaves; True, the server takes it and the answer
    is lost."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.armed: tuple[str, bool] | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        armed, self.armed = self.armed, None
        if armed is not None and request.url.path == armed[0]:
            if armed[1]:
                self.inner.handle_request(request).read()
            raise httpx.ReadError("the link was cut", request=request)
        if armed is not None:
            self.armed = armed
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


@dataclass(frozen=True)
class Good:
    """One good's fate, drawn from its own stream."""
    n: int
    fate: str
    cut_at: int              # the tear's step (of the write, the PIN try, or a pick-up's)
    torn_pin: bool           # wrong-pin: the power cut at the try counter's write
    give_up: float           # chance the holder gives up after a server failure
    pickup: str              # now | later | never (before the end's pick-ups)
    torn_pickup: int | None  # a pick-up torn at this step
    purse: bool              # paid by the purse (when the run has the purse path)
    debit_cut_at: int        # the tear's step in a DEBIT FOR CAPP PURCHASE (two writes)


def draw(seed: int, n: int) -> Good:
    rng = random.Random(f"{seed}/{n}")
    fate = rng.choices(list(FATES), list(FATES.values()))[0]
    return Good(n, fate, rng.randrange(len(WRITE_STEPS)), rng.random() < 0.3,
                rng.choice((0.0, 0.0, 0.2)),
                rng.choices(("now", "later", "never"), (2, 1, 2))[0],
                rng.randrange(2 * len(WRITE_STEPS)) if rng.random() < 0.15 else None,
                rng.random() < 0.5, rng.randrange(2 * len(WRITE_STEPS)))


@dataclass
class Figures:
    fates: Counter[str] = field(default_factory=Counter)
    ways: Counter[str] = field(default_factory=Counter)   # who was to pay: bank | purse
    events: Counter[str] = field(default_factory=Counter)
    kills: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.events[what] += n


def retried(work: Callable[[], T], deadline: float, figures: Figures) -> T:
    """``work`` again after a server's failure (killed, restarting) until ``deadline``."""
    while True:
        try:
            return work()
        except (DeviceError, httpx.HTTPError, AssertionError):
            figures.note("retries")
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)   # a killed server is being started again


@contextlib.contextmanager
def card_at(path: Path, tear: Tear | None = None) -> Iterator[Reader]:
    """The card image at ``path`` in a virtual reader, its writes watched by ``tear``."""
    card = open_card(path, tear=tear)
    try:
        reader = VirtualReader(card)
        reader.connect()
        yield reader
    finally:
        card.close()


class ArmAt:
    """Arms ``tear`` at the first command starting with ``prefix``."""

    def __init__(self, inner: Reader, tear: Tear, prefix: bytes) -> None:
        self.inner, self.tear, self.prefix = inner, tear, prefix

    def exchange(self, apdu: bytes) -> Any:
        if apdu.startswith(self.prefix):
            self.tear.armed = True
        return self.inner.exchange(apdu)


class SimProcesses(Processes):
    """The five processes; the payment server with PSAMs (tests/goods_sim_serve.py) when
    ``psams`` are given."""

    def __init__(self, folder: Path, psams: list[Path]) -> None:
        super().__init__(folder)
        self.psams = psams

    def start(self, role: str) -> None:
        if role != "payment" or not self.psams:
            super().start(role)
            return
        log = self.folder / f"{role}.log"
        with log.open("ab") as err:
            self.procs[role] = subprocess.Popen(
                [sys.executable, SERVE, str(self.config), *map(str, self.psams)],
                stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_http(f"{self.url(role)}/v1/health", timeout=60)
        except TimeoutError:
            raise AssertionError(f"goods-{role} did not start: {log.read_text()[-2000:]}"
                                 ) from None


class System:
    """The five processes of one goods system, the cards and the accounts."""

    def __init__(self, folder: Path, pickup_seconds: int, purse: bool = False,
                 settle_first: bool = True) -> None:
        run("goods", "init", str(folder / "sys"))
        config = folder / "sys" / "goods.toml"
        config.write_text(config.read_text().replace(
            "pickup_seconds = 604800",
            f"pickup_seconds = {pickup_seconds}\nissue_lease = 1"))
        self.folder = folder
        self.config = config
        self.pickup_seconds = pickup_seconds
        self.purse, self.settle_first = purse, settle_first
        psams = psam_images(folder / "sys" / "psams", 2) if purse else []
        self.procs = SimProcesses(folder / "sys", psams)
        self.cards: dict[str, Path] = {}   # made before the buyers start
        self.lock = threading.Lock()   # one restart at a time (killer and end phase)

    def start(self) -> None:
        for role in ("merchant", "bank", "fulfil", "payment", "auth"):
            self.procs.start(role)

    def stop(self) -> None:
        self.procs.stop()

    def db(self, role: str) -> str:
        return str(self.procs.doc["parties"][role]["db"])

    def engine(self, role: str) -> Any:
        return D.make_engine(self.db(role), role)

    def kill(self, role: str) -> None:
        with self.lock:
            self.procs.kill(role)
            self.procs.start(role)

    def card(self, serial: int) -> Path:
        name = f"{serial:020d}"
        if name not in self.cards:
            path = make_card(self.folder / "cards", serial, ep=EP if self.purse else 0)
            engine = self.engine("bank")
            try:
                add_account(engine, f"acc{serial}", name, PIN, START, 156,
                            int(time.time() * 1000))
            finally:
                engine.dispose()
            self.cards[name] = path
        return self.cards[name]

    def device(self, figures: Figures) -> tuple[Device, NetCut]:
        auth = self.procs.doc["parties"]["auth"]
        link = NetCut()
        device = Device(auth["url"], auth["id"], bytes.fromhex(auth["public_key"]),
                        W.new_key(), http=httpx.Client(timeout=30, transport=link))
        retried(device.register, time.monotonic() + RETRY, figures)
        return device, link

    def in_process(self, role: str, skew: float = 0.0) -> Any:
        """Party ``role`` as an object in this process (its process killed first), its clock
        ``skew`` s ahead; :meth:`resume` starts the process again."""
        self.lock.acquire()
        self.procs.kill(role)
        return SERVERS[role](goods_config(self.config, role),
                             clock=lambda: time.time() + skew)

    def resume(self, role: str, server: Any) -> None:
        server.close()
        try:
            self.procs.start(role)
        finally:
            self.lock.release()


class Buyer:
    """One device thread: its goods (every ``devices``-th of the run), its own cards."""

    def __init__(self, system: System, index: int, figures: Figures, seed: int,
                 progress: Callable[[], None]) -> None:
        self.system, self.index, self.figures, self.seed = system, index, figures, seed
        self.progress = progress
        self.device, self.link = system.device(figures)
        self.http = httpx.Client(timeout=30)
        self.merchant = system.procs.url("merchant")
        self.bought = 0
        self.error: BaseException | None = None
        self.halt = threading.Event()   # the killer failed: stop buying

    def serial(self, k: int) -> int:
        return 100_000 + 1_000 * self.index + k // PER_CARD

    def buy_all(self, goods: list[int]) -> None:
        try:
            for n in goods:
                if self.halt.is_set():
                    return
                self.buy(draw(self.seed, n), self.bought)
                self.bought += 1
                self.progress()
        except BaseException as exc:  # handed to the test's thread
            self.error = exc

    def buy(self, good: Good, k: int) -> None:
        f = self.figures
        deadline = time.monotonic() + RETRY
        with f.lock:
            f.fates[good.fate] += 1
        path = self.system.card(self.serial(k))
        sku = SKUS[k % len(SKUS)]

        def place() -> str:
            answer = self.http.post(f"{self.merchant}/v1/orders",
                                    json={"sku": sku, "device": self.device.id})
            assert answer.status_code == 200, answer.text
            return str(answer.json()["order"])

        order = retried(place, deadline, f)
        first = retried(lambda: self.first_of(order, path), deadline, f)
        purse = self.system.purse and good.purse and good.fate != "decline"
        with f.lock:
            f.ways["purse" if purse else "bank"] += 1
        if good.fate == "walk-away":
            return
        if good.fate == "wrong-pin":
            self.wrong_pin(path, first, good, purse)
        rng = random.Random(f"{self.seed}/{good.n}/tries")
        tries = 0
        while True:
            try:
                if purse:
                    self.attempt_purse(path, first, good if tries == 0 else None)
                else:
                    self.attempt(path, first, good if tries == 0 else None)
                break
            except (CardRemovedError, PowerCut):
                f.note("card pulled or torn")
                break
            except (DeviceError, httpx.HTTPError) as exc:
                if "(409)" in str(exc) or "answered 409" in str(exc):
                    f.note("refused, not retried")   # for good: the purse's order expired,
                    break                             # its counter moved
                f.note("server failures")
                tries += 1
                if rng.random() < good.give_up:
                    f.note("gave up")
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"good {good.n}: still failing: {exc}") from exc
                time.sleep(0.1)   # a killed server is being started again
        if good.pickup == "now":
            self.pickup(path, good.torn_pickup, deadline)

    def first_of(self, order: str, path: Path) -> FirstMessage:
        firsts = self.device.poll(wait=2)
        mine = [m for m in firsts if m.order == order]
        if len(firsts) >= STALE_OFFERS:   # the holder answers the old ones: no
            for old in firsts:
                if old.order != order:
                    with contextlib.suppress(DeviceError, httpx.HTTPError), \
                            card_at(path) as reader:
                        self.device.authorise(reader, old, PIN, approve=False)
                        self.figures.note("old offers declined")
        assert mine, "not offered yet"
        return mine[0]

    def wrong_pin(self, path: Path, first: FirstMessage, good: Good, purse: bool) -> None:
        tear = Tear(good.cut_at) if good.torn_pin else None
        try:
            with card_at(path, tear) as reader:
                link = cast(Reader, ArmAt(reader, tear, b"\x00\x20")) if tear else reader
                if purse:
                    self.device.pay_with_purse(link, first, WRONG_PIN)
                else:
                    self.device.authorise(link, first, WRONG_PIN)
            raise AssertionError("a wrong PIN was taken")
        except DeviceError as exc:
            assert "63C" in str(exc), exc
            self.figures.note("wrong PINs refused")
        except PowerCut:
            self.figures.note("tears: at the PIN try counter")

    def attempt(self, path: Path, first: FirstMessage, good: Good | None) -> None:
        fate = good.fate if good else "honest"
        tear = Tear(good.cut_at) if good and fate == "tear" else None
        with card_at(path, tear) as reader:
            link: Reader = reader
            if fate in ("cut-before", "cut-after"):
                link = cast(Reader, LinkCut(reader, after=fate == "cut-after"))
            elif tear is not None:
                link = cast(Reader, ArmAt(reader, tear, b"\x04\xdc"))
            if fate in ("net-before", "net-after"):
                path_cut = "/v1/authorisations" if good and good.cut_at % 2 else "/v1/written"
                self.link.armed = (path_cut, fate == "net-after")
            try:
                out = self.device.authorise(link, first, PIN, approve=fate != "decline")
            except PowerCut:
                self.figures.note("tears: at the goods write")
                raise
            except DeviceError as exc:   # the device tries again, as after a server's failure
                if "link was cut" in str(exc):
                    self.figures.note("device links cut")
                raise
            finally:
                self.link.armed = None
        self.figures.note("written at once" if out.written else
                          "paid, not written at once" if out.paid else "not paid")

    def attempt_purse(self, path: Path, first: FirstMessage, good: Good | None) -> None:
        """The purse pays: one composite purchase, cut, torn or its messages lost."""
        fate = good.fate if good else "honest"
        tear = Tear(good.debit_cut_at) if good and fate == "tear" else None
        with card_at(path, tear) as reader:
            link: Reader = reader
            if good and fate in ("cut-before", "cut-after"):
                at = CAPP_DEBIT if fate == "cut-after" or good.cut_at % 2 else CAPP_CACHE
                link = cast(Reader, CutAt(reader, at, after=fate == "cut-after"))
            elif tear is not None:
                link = cast(Reader, ArmAt(reader, tear, CAPP_DEBIT))
            if good and fate in ("net-before", "net-after"):
                cut = "/v1/purse/debits" if good.cut_at % 2 else "/v1/purse/proofs"
                self.link.armed = (cut, fate == "net-after")
            try:
                if self.system.settle_first and self.settle_first(reader):
                    self.figures.note("purse: last purchase proved first")
                out = self.device.pay_with_purse(link, first, PIN)
            except PowerCut:
                self.figures.note("tears: in the purse's DEBIT")
                raise
            except DeviceError as exc:
                if "link was cut" in str(exc):
                    self.figures.note("device links cut")
                raise
            finally:
                self.link.armed = None
        self.figures.note("purse: written with its debit" if out.written else
                          "purse: not paid")

    def settle_first(self, reader: Reader) -> bool:
        """The card's last composite purchase proved before another is opened; a server's
        failure is raised (the purchase waits: the card proves only its last transaction),
        a refusal (nobody's order at that counter) is not. Whether a proof was taken."""
        info, log = read_log_info(reader)
        if not log or log[0].txn_type != P.TYPE_COMPOSITE_PURCHASE:
            return False
        proof = prove(reader, P.TYPE_COMPOSITE_PURCHASE, log[0].counter)
        if proof is None:
            return False
        try:
            self.device._prove(info.app_serial, log[0].counter, *proof)
        except DeviceError as exc:
            if "(409)" in str(exc) or "answered 409" in str(exc):
                return False
            raise
        return True

    def pickup(self, path: Path, torn: int | None, deadline: float) -> None:
        tear = Tear(torn) if torn is not None else None

        def once() -> None:
            with card_at(path, tear) as reader:
                if tear is not None:
                    tear.armed = True
                self.device.pickup(reader)

        try:
            retried(once, deadline, self.figures)
        except PowerCut:
            self.figures.note("tears: at a pick-up's write")
        self.figures.note("pick-ups")


def killer(system: System, seed: int, runs: int, devices: int, kills: int,
           done: Callable[[], int],
           stop: threading.Event, figures: Figures, errors: list[BaseException],
           halt: threading.Event) -> None:
    """SIGKILL a random one of :data:`KILLED` at ``kills`` random moments of the run (measured
    in goods done), each started again at once."""
    rng = random.Random(f"{seed}/kills")
    last = max(1, runs - 2 * devices)   # while goods are still being bought
    plan = sorted((rng.uniform(0, last), rng.choice(KILLED)) for _ in range(kills))
    try:
        for moment, role in plan:
            while done() < moment and not stop.is_set():
                time.sleep(0.02)   # polling the buyers' progress
            if stop.is_set():
                return
            time.sleep(rng.uniform(0, 0.3))   # somewhere inside the next good's steps
            system.kill(role)
            figures.kills.append(role)
    except BaseException as exc:  # handed to the test's thread
        errors.append(exc)
        halt.set()


def buy_goods(system: System, seed: int, runs: int, kills: int, devices: int,
              figures: Figures) -> list[Buyer]:
    """The buying part of the run: ``runs`` goods on ``devices`` threads, ``kills`` SIGKILLs."""
    count = [0]
    lock = threading.Lock()

    def progress() -> None:
        with lock:
            count[0] += 1

    buyers = [Buyer(system, i, figures, seed, progress) for i in range(devices)]
    for i, b in enumerate(buyers):
        for k in range(0, len(range(i, runs, devices)), PER_CARD):
            system.card(b.serial(k))
    stop, halt = threading.Event(), threading.Event()
    for b in buyers:
        b.halt = halt
    errors: list[BaseException] = []
    kill_thread = threading.Thread(target=killer, args=(system, seed, runs, devices, kills,
                                                        lambda: count[0], stop, figures,
                                                        errors, halt))
    threads = [threading.Thread(target=b.buy_all, args=(list(range(i, runs, devices)),))
               for i, b in enumerate(buyers)]
    kill_thread.start()
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    finally:
        halt.set()
        stop.set()
        kill_thread.join()
    for error in [*errors, *(b.error for b in buyers if b.error is not None)]:
        raise error
    return buyers


def settle(system: System, buyers: list[Buyer], seed: int, figures: Figures) -> int:
    """The end: recovery of paid answers lost, pick-ups, refunds past the deadline, every
    card's next contact until no good is open. How many goods the refund clock refunded."""
    payment = system.in_process("payment", skew=payment_server.STATUS_AFTER + 5)
    try:
        asyncio.run(payment.recover())   # asks the institution about orders `authorising`
    finally:
        system.resume("payment", payment)
    rng = random.Random(f"{seed}/end")
    for b in buyers:
        for k in range(0, b.bought, PER_CARD):
            if rng.random() < 0.5:      # this card comes back before the deadline
                b.pickup(system.cards[f"{b.serial(k):020d}"], None,
                         time.monotonic() + RETRY)
    fulfil = system.in_process("fulfil")
    try:
        later = fulfil.now_ms() + (system.pickup_seconds + 1) * 1000
        refunded = asyncio.run(fulfil.refund_due(at_ms=later))
        refunded += asyncio.run(fulfil.refund_due(at_ms=later))   # finish `refunding`
        figures.note("purse goods expired by the end's clock", fulfil.purse_expire(later))
    finally:
        system.resume("fulfil", fulfil)
    figures.note("refunded by the end's refund clock", refunded)
    deadline = time.monotonic() + 2 * RETRY

    def every_card() -> None:
        for b in buyers:
            for k in range(0, b.bought, PER_CARD):
                b.pickup(system.cards[f"{b.serial(k):020d}"], None, deadline)
        engine = system.engine("fulfil")
        try:
            with engine.connect() as conn:
                states = Counter(r.state for r in conn.execute(select(D.goods.c.state)))
                purse = Counter(r.state for r in conn.execute(select(D.purse_goods.c.state)))
        finally:
            engine.dispose()
        assert set(states) <= {D.WRITTEN, D.REFUNDED}, states
        assert set(purse) <= {D.WRITTEN, D.EXPIRED}, purse

    retried(every_card, deadline, figures)
    return refunded


def check(system: System) -> dict[str, int]:
    """Every database and every card: 0 goods without payment, 0 payments without exactly one
    good on its card or a refund, no good twice on a card, every account's balance and every
    purse exact. Figures."""
    on_cards: dict[str, list[bytes]] = {}
    purses: dict[str, int] = {}
    for serial, path in system.cards.items():
        with card_at(path) as reader:
            on_cards[serial] = [e.record[10:18] for e in read_goods(reader)]
        purses[serial] = int(read_image(path)["app"]["ep"]["balance"])
    bank, fulfil, payment = (system.engine(r) for r in ("bank", "fulfil", "payment"))
    try:
        with bank.connect() as conn:
            paid = [dict(r._mapping) for r in conn.execute(select(D.bank_payments))]
            accounts = {r.card: r for r in conn.execute(select(D.accounts))}
        with fulfil.connect() as conn:
            goods = {r.order_ref: r for r in conn.execute(select(D.goods))}
            purse_goods = {r.order_ref: r for r in conn.execute(select(D.purse_goods))}
        with payment.connect() as conn:
            orders = {r.order_ref: r for r in conn.execute(select(D.payment_orders))}
            sessions = [r for r in conn.execute(select(D.purse_sessions))
                        if r.state == D.COMMITTED]
    finally:
        for engine in (bank, fulfil, payment):
            engine.dispose()
    for serial, held in on_cards.items():
        twice = [g.hex() for g, n in Counter(held).items() if n > 1]
        assert not twice, f"card {serial} holds goods {twice} twice"
    by_id = {bytes.fromhex(p["order_ref"])[:8]: p for p in paid}
    for p in paid:
        order, good = p["order_ref"], goods.get(p["order_ref"])
        assert good is not None, f"order {order}: paid, unknown to the fulfilment server"
        copies = on_cards[good.card].count(bytes.fromhex(order)[:8])
        if p["state"] == "refunded":
            assert copies == 0 and good.state == D.REFUNDED, (order, copies, good.state)
        else:
            assert copies == 1 and good.state == D.WRITTEN, (order, copies, good.state)
    assert set(goods) <= {p["order_ref"] for p in paid}, "a good without a payment"
    # the purse: a good written <=> its order paid by a proved debit <=> once on its card
    proved = Counter(r.order_ref for r in sessions)
    assert all(n == 1 for n in proved.values()), f"an order debited twice: {proved}"
    purse_by_id = {bytes.fromhex(o)[:8]: g for o, g in purse_goods.items()}
    for order, good in purse_goods.items():
        copies = on_cards[good.card].count(bytes.fromhex(order)[:8])
        state = orders[order].state
        if good.state == D.WRITTEN:
            assert copies == 1 and state == D.PURSE_PAID and proved[order] == 1, \
                (order, copies, state)
        else:
            assert copies == 0 and state != D.PURSE_PAID and order not in proved, \
                (order, good.state, copies, state)
    for serial, held in on_cards.items():
        for good_id in held:
            p, g = by_id.get(good_id), purse_by_id.get(good_id)
            assert (p is not None and p["state"] == "paid" and goods[p["order_ref"]].card ==
                    serial) or (g is not None and g.state == D.WRITTEN and g.card == serial), \
                f"card {serial} holds {good_id.hex()}, which nobody paid for"
    for serial, account in accounts.items():
        spent = sum(p["amount"] for p in paid
                    if p["state"] == "paid" and goods[p["order_ref"]].card == serial)
        assert account.balance == START - spent, (serial, account.balance, START - spent)
    for serial, balance in purses.items():
        spent = sum(g.amount for g in purse_goods.values()
                    if g.card == serial and g.state == D.WRITTEN)
        opening = EP if system.purse else 0
        assert balance == opening - spent, f"card {serial}: purse {balance}, " \
            f"{opening} - purse goods written {spent} = {opening - spent}"
    kept = [p for p in paid if p["state"] == "paid"]
    written = [g for g in purse_goods.values() if g.state == D.WRITTEN]
    return {"bank payments": len(paid), "bank written": len(kept),
            "refunded": len(paid) - len(kept), "purse written": len(written),
            "purse expired": len(purse_goods) - len(written),
            "on cards": sum(map(len, on_cards.values())),
            "debited": sum(p["amount"] for p in paid),
            "kept": sum(p["amount"] for p in kept),
            "purse debited": sum(g.amount for g in written), "cards": len(system.cards)}
