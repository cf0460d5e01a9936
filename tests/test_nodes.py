"""Payment-server nodes on one database (issue 16, points 4 and 5): PSAM leases with fencing
tokens (host/pay/server/leases.py), and three node processes behind Debian's nginx on one
PostgreSQL, SIGKILLed at random moments while purchases run (``--node-kills N``, default 5;
``--node-seed``), then batches closed, cleared and audited: nothing lost, nothing twice, every
PSAM leased to one node at a time, leases re-homed within the expiry."""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pg_env import Cluster, start_cluster
from sqlalchemy import select

from svcard.card.storage import read_image
from svcard.fixtures import fixture_path
from svcard.host.demo.system import card_image
from svcard.host.kit.db import step
from svcard.host.kit.serving import ServerThread, free_port
from svcard.host.pay import client as C
from svcard.host.pay.client_terminal import ClientTerminal, add_terminal, remove_terminal
from svcard.host.pay.merchant.server import MerchantConfig, MerchantServer
from svcard.host.pay.nodes import Nginx, Node, NodeSpec, find_nginx
from svcard.host.pay.server import leases as L
from svcard.host.pay.server.db import PaymentDb, make_engine, payments
from svcard.host.pay.server.psam_pool import identify
from svcard.host.pay.stack import DEMO_MERCHANT_ID, psam_images
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader

ADMIN = "node-test-admin"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    yield c
    c.stop()


# --- the fence, statement by statement ---------------------------------------------------

def _draw_row(db: PaymentDb, txn: str) -> int:
    return db.insert_received({
        "merchant_id": DEMO_MERCHANT_ID.hex(), "txn_id": txn, "variant": 2, "amount": 99,
        "currency_code": 156, "card_serial": "00" * 10, "card_counter": 1,
        "draw_digest": "00" * 32, "node": "a#1"})


def _stale_fence_is_refused(url: str) -> None:
    """Node A takes a PSAM's lease, lets it expire; node B takes it over. A's writes with its
    (stale) fencing token change nothing, B's go through; A's renewal finds no lease."""
    db = PaymentDb(make_engine(url))
    store = L.LeaseStore(db.engine)
    slot = "virtual:/srv/psam1.json"
    store.ensure([slot])
    taken = store.take(slot, "a#1", ttl_ms=1)
    assert taken == (1, None)
    deadline = time.monotonic() + 5
    while store.take(slot, "b#2", ttl_ms=60_000) is None:
        assert time.monotonic() < deadline, "the expired lease was never taken over"
        time.sleep(0.005)
    history = store.history()
    b_token = max(h["token"] for h in history)
    assert b_token >= 2 and history[-1]["node"] == "b#2" and history[-1]["previous"] == "a#1"
    stale, current = L.Fence(slot, "a#1", 1), L.Fence(slot, "b#2", b_token)
    row_id = _draw_row(db, "01" * 16)
    before = db.by_id(row_id)
    # the attacker: a paused node A wakes up and records its PSAM's answer
    assert not db.advance(row_id, "received", stale, state="issued", psam_id="aa" * 10,
                          ttn=7, mac1="00112233")
    assert db.by_id(row_id) == before
    assert not db.advance(row_id, "received", L.Fence(slot, "b#2", b_token - 1),
                          state="issued")             # B's node name with an old token
    assert db.mark_handed("aa" * 10, "batch-x.json", 1, [(7, True)], stale) == 0
    assert store.renew("a#1", 60_000) == {}
    assert not store.release(slot, "a#1", 1)
    assert db.by_id(row_id) == before
    # the holder's write goes through
    assert db.advance(row_id, "received", current, state="issued", psam_id="aa" * 10, ttn=7)
    assert db.mark_handed("aa" * 10, "batch-x.json", 1, [(7, True)], current) == 1
    assert store.renew("b#2", 60_000) == {slot: b_token}
    assert db.recover(["b#2"]) == 0
    db.engine.dispose()


def test_stale_fence_is_refused_on_sqlite(tmp_path: Path) -> None:
    _stale_fence_is_refused(f"sqlite:///{tmp_path / 'pay.db'}")


def test_stale_fence_is_refused_on_postgresql(cluster: Cluster) -> None:
    _stale_fence_is_refused(cluster.new_database())


def test_a_take_waits_for_a_fenced_write_in_flight(cluster: Cluster) -> None:
    """PostgreSQL: a fenced write holds the lease row FOR SHARE until it commits, so a
    takeover that starts meanwhile waits for it (and bumps the token after it)."""
    url = cluster.new_database()
    db = PaymentDb(make_engine(url))
    store = L.LeaseStore(db.engine)
    slot = "virtual:/srv/psam1.json"
    store.ensure([slot])
    assert store.take(slot, "a#1", ttl_ms=1) == (1, None)
    row_id = _draw_row(db, "02" * 16)
    done: dict[str, float] = {}
    with step(db.engine) as conn:   # A's write, not yet committed
        conn.execute(payments.update().where(payments.c.id == row_id).where(L.FENCE).values(
            reason="A"), L.Fence(slot, "a#1", 1).params())
        time.sleep(0.01)   # the lease has expired by now: only the row lock holds B back

        def take() -> None:
            done["taken"] = time.monotonic()
            assert store.take(slot, "b#2", 60_000) is not None

        thread = threading.Thread(target=take)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), "the take did not wait for the fenced write"
        committed = time.monotonic()
    thread.join(10)
    assert not thread.is_alive()
    with db.engine.connect() as conn:
        token = conn.execute(select(L.psam_leases.c.token)).scalar()
    assert token == 2 and committed > done["taken"]
    db.engine.dispose()


def test_payment_schema_upgrade_adds_the_node_column(tmp_path: Path) -> None:
    """A version-1 payment database gets ``payments.node`` when a node opens it."""
    from sqlalchemy import create_engine, inspect, text

    url = f"sqlite:///{tmp_path / 'old.db'}"
    make_engine(url).dispose()
    raw = create_engine(url)
    with raw.begin() as conn:
        conn.execute(text("ALTER TABLE payments DROP COLUMN node"))
        conn.execute(text("UPDATE svcard_schema SET version = 1 WHERE component = 'payment'"))
    assert "node" not in {c["name"] for c in inspect(raw).get_columns("payments")}
    raw.dispose()
    make_engine(url).dispose()
    raw = create_engine(url)
    assert "node" in {c["name"] for c in inspect(raw).get_columns("payments")}
    raw.dispose()


def _holds(node: Node) -> int:
    try:
        return int(httpx.get(node.url + "/v1/health", timeout=2).json().get("psams", 0))
    except (httpx.HTTPError, ValueError):
        return 0


def _wait(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_paused_node_writes_nothing_after_its_lease_is_taken(cluster: Cluster,
                                                              tmp_path: Path) -> None:
    """The attacker is time: node A is stopped (SIGSTOP) while its PSAM runs INIT SAM for a
    draw; its lease expires and another holder takes it (here the test itself, so that no
    node settles A's draw meanwhile: only the fence stands between A and the database). A
    resumes with a stale fencing token: its write of the PSAM's answer is refused, the draw is
    voided, the card is never debited; once the intruder's lease runs out, A leases the PSAM
    again and serves it."""
    import signal

    db_url = cluster.new_database()
    psam = psam_images(tmp_path, 1)[0]
    spec = f"delayed:400:virtual:{psam}"   # every PSAM APDU takes 0.4 s
    with open_reader(f"virtual:{psam}") as reader:
        terminal_id = identify(reader).terminal_id
    key = bytes(range(32))
    a = Node(tmp_path, NodeSpec("nodeA", free_port(), db_url, [spec], DEMO_MERCHANT_ID.hex(),
                                key.hex(), lease_seconds=3.0, acquire_timeout=5.0))
    port = free_port()
    merchant_server = MerchantServer(MerchantConfig(
        DEMO_MERCHANT_ID, key, a.url, terminal_id, public_url=f"http://127.0.0.1:{port}",
        variants=frozenset(("fig8",)), default_variant="fig8",
        db_url=f"sqlite:///{tmp_path / 'merchant.db'}"))
    merchant = ServerThread(merchant_server.app(), port=port).start()
    card = card_image(tmp_path, ep=5_000)
    engine = make_engine(db_url)
    store = L.LeaseStore(engine)
    try:
        a.start().wait_ready()
        _wait(lambda: _holds(a) == 1, "node A to lease the PSAM")
        failure: list[BaseException] = []

        def pay() -> None:
            try:
                with httpx.Client(timeout=60) as http, open_reader(f"virtual:{card}") as r:
                    C.pay(f"{merchant.url}/v1/checkout/song?variant=fig8", r,
                          journal=Journal(tmp_path / "j.jsonl"), http=http)
            except BaseException as exc:
                failure.append(exc)

        def rows() -> list[dict[str, Any]]:
            with engine.connect() as conn:
                return [dict(r._mapping) for r in conn.execute(select(payments))]

        thread = threading.Thread(target=pay)
        thread.start()
        _wait(lambda: bool(rows()), "the draw's row")
        time.sleep(0.15)                       # INIT SAM is running on A's PSAM
        assert a.proc is not None
        a.proc.send_signal(signal.SIGSTOP)
        try:
            _wait(lambda: store.take(spec, "intruder#1", 2_000) is not None,
                  "A's lease to expire")
            assert rows()[0]["state"] == "received"   # nobody settled it: the fence must hold
        finally:
            a.proc.send_signal(signal.SIGCONT)
        thread.join(60)
        assert failure and getattr(failure[0], "status", None) == 409, failure
        (row,) = rows()
        assert row["state"] == "voided" and row["reason"] == "this node lost the PSAM's lease"
        assert row["psam_id"] is None and row["ttn"] is None and row["debit_command"] is None
        assert read_image(card)["app"]["ep"]["balance"] == 5_000
        _wait(lambda: _holds(a) == 1, "node A to lease the PSAM again")
        history = store.history()
        assert [h["node"].split("#")[0] for h in history] == ["nodeA", "intruder", "nodeA"]
        assert [h["token"] for h in history] == [1, 2, 3]
    finally:
        merchant.stop()
        merchant_server.close()
        a.stop()
        engine.dispose()


# --- three nodes behind nginx, killed at random -----------------------------------------

class Cluster3:
    """Three payment-server nodes on one PostgreSQL behind nginx, a merchant in this
    process, PSAM images on a shared folder."""

    def __init__(self, folder: Path, db_url: str, lease_seconds: float) -> None:
        self.folder = folder
        self.db_url = db_url
        self.lease_seconds = lease_seconds
        self.psams = psam_images(folder, 3)
        with open_reader(f"virtual:{self.psams[0]}") as reader:
            self.terminal_id = identify(reader).terminal_id
        self.key = bytes(range(32))
        self.batches = folder / "concentration"
        self.nodes = [Node(folder, NodeSpec(
            f"node{i + 1}", free_port(), db_url, [f"virtual:{p}" for p in self.psams],
            DEMO_MERCHANT_ID.hex(), self.key.hex(), lease_seconds=lease_seconds,
            acquire_timeout=1.0, hold_timeout=5.0, concentration_dir=str(self.batches),
            admin_token=ADMIN, max_holds=3)) for i in range(3)]
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_ready()
        self.nginx = Nginx(folder / "nginx", [f"127.0.0.1:{n.spec.port}" for n in self.nodes])
        self.nginx.start()
        self.terminal = ClientTerminal.generate()
        add_terminal(self.terminal)
        port = free_port()
        self.merchant_server = MerchantServer(MerchantConfig(
            DEMO_MERCHANT_ID, self.key, self.nginx.url, self.terminal_id,
            public_url=f"http://127.0.0.1:{port}", variants=frozenset(
                ("fig5", "fig6", "fig7", "fig8")),
            client_terminals={self.terminal.terminal_id: self.terminal.public_key},
            db_url=f"sqlite:///{folder / 'merchant.db'}", max_open_per_client=10_000))
        self.merchant = ServerThread(self.merchant_server.app(), port=port).start()

    def checkout(self, variant: str) -> str:
        url = f"{self.merchant.url}/v1/checkout/song?variant={variant}"
        if variant == "fig7":
            url += f"&terminal={self.terminal.terminal_id.hex().upper()}"
        return url

    def held(self) -> int:
        """PSAMs served right now, over the nodes (each node's health)."""
        total = 0
        for node in self.nodes:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                total += int(httpx.get(node.url + "/v1/health", timeout=2).json()
                             .get("psams", 0))
        return total

    def close(self) -> None:
        self.merchant.stop()
        self.merchant_server.close()
        self.nginx.stop()
        for node in self.nodes:
            node.stop()
        remove_terminal(self.terminal)


def _settle(reader: Any, journal: Journal, http: httpx.Client, deadline: float) -> None:
    """Finish every unfinished payment of the card (nodes may be down a moment)."""
    while True:
        try:
            C.resume(reader, journal=journal, http=http)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_nodes_behind_nginx_survive_kills(cluster: Cluster, tmp_path: Path, node_kills: int,
                                          node_seed: int) -> None:
    if find_nginx() is None:
        pytest.skip("nginx is not installed (scripts/install-system-deps)")
    print(f"node kill test: seed {node_seed}, {node_kills} kills (replay: --node-seed "
          f"{node_seed} --node-kills {node_kills})")
    rng = random.Random(node_seed)
    lease_seconds = 3.0
    system = Cluster3(tmp_path, cluster.new_database(), lease_seconds)
    cards = [card_image(tmp_path, f"card{i}.json", ep=1_000_000) for i in range(3)]
    stop = threading.Event()
    errors: list[BaseException] = []
    outcomes: dict[str, int] = {}
    kills: list[tuple[str, float]] = []

    def shopper(index: int) -> None:
        local = random.Random(node_seed * 10 + index)
        journal = Journal(tmp_path / f"journal{index}.jsonl")
        try:
            with httpx.Client(timeout=30) as http, \
                    open_reader(f"virtual:{cards[index]}") as reader:
                while not stop.is_set():
                    variant = local.choice(["fig5", "fig6", "fig6", "fig7", "fig8", "fig8"])
                    try:
                        C.pay(system.checkout(variant), reader, journal=journal, http=http)
                        key = "paid"
                    except Exception as exc:
                        key = f"{type(exc).__name__}: {str(exc)[:60]}"
                        _settle(reader, journal, http, time.monotonic() + 120)
                    outcomes[key] = outcomes.get(key, 0) + 1
                _settle(reader, journal, http, time.monotonic() + 120)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=shopper, args=(i,)) for i in range(len(cards))]
    try:
        for t in threads:
            t.start()
        for _ in range(node_kills):
            time.sleep(rng.uniform(0.3, 2.5))
            victim = rng.choice(system.nodes)
            victim.kill()
            kills.append((victim.spec.name, time.time()))
            time.sleep(rng.uniform(0.0, 1.0))
            victim.start()
            victim.wait_ready()
        deadline = time.monotonic() + 4 * lease_seconds + 30
        while system.held() < 3:  # every PSAM re-homed on a live node
            assert time.monotonic() < deadline, "PSAMs not re-homed"
            time.sleep(0.1)
        time.sleep(rng.uniform(0.5, 1.5))
        stop.set()
        for t in threads:
            t.join(300)
        assert not errors, errors
        print("purchases:", outcomes, "kills:", [k for k, _ in kills])
        assert outcomes.get("paid", 0) > 0
        _close_batches(system)
        _audit(system, cards, tmp_path)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        system.close()


def _close_batches(system: Cluster3, timeout: float = 120.0) -> None:
    """Each node closes the batches of the PSAMs it leases; a PSAM that moved to a node
    already asked (the nodes still rebalance) is closed at the next round: until every
    payment a PSAM answered went out in a batch."""
    engine = make_engine(system.db_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            for node in system.nodes:
                answer = httpx.post(node.url + "/v1/batches/close", timeout=120,
                                    headers={"Authorization": f"Bearer {ADMIN}"})
                assert answer.status_code in (200, 500, 503), answer.text
            with engine.connect() as conn:
                left = conn.execute(select(payments.c.psam_id).where(
                    payments.c.psam_id.is_not(None), payments.c.batch.is_(None))).all()
                # a late proof is handed by the node leasing its PSAM at that moment
                late = conn.execute(select(payments.c.id).where(
                    payments.c.state == "confirmed", payments.c.batch.is_not(None),
                    payments.c.tac.is_not(None), payments.c.proof_handed == 0)).all()
            if not left and not late:
                return
            print(f"batch close: {len(left)} rows and {len(late)} late proofs of PSAMs that "
                  "moved meanwhile; again")
            assert time.monotonic() < deadline, "batches not all closed"
    finally:
        engine.dispose()


def _audit(system: Cluster3, cards: list[Path], folder: Path) -> None:
    from svcard.host.settle import clearing as CL
    from svcard.host.settle.config import clearing_config
    from svcard.host.settle.db import make_engine as clearing_engine

    debited = sum(1_000_000 - read_image(c)["app"]["ep"]["balance"] for c in cards)
    engine = make_engine(system.db_url)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(payments))]
        history = [dict(r._mapping) for r in conn.execute(
            select(L.lease_history).order_by(L.lease_history.c.slot, L.lease_history.c.token))]
    engine.dispose()
    confirmed = [r for r in rows if r["state"] == "confirmed"]
    assert sum(r["amount"] for r in confirmed) == debited, "a debit lost or counted twice"
    assert not [r for r in rows if r["state"] in ("received",)], "a draw never settled"
    report = CL.run_clearing(clearing_config(fixture_path("clearing-demo.toml")),
                             system.batches, clearing_engine(f"sqlite:///{folder / 'cl.db'}"),
                             folder / "settlement")
    print(f"cleared {report.records_cleared} records, {report.total_paid} paid; card debits "
          f"{debited}; rows {len(rows)}, confirmed {len(confirmed)}")
    unhanded: dict[str, int] = {}
    for r in confirmed:
        if r["batch"] is None:
            unhanded[r["psam_id"]] = unhanded.get(r["psam_id"], 0) + 1
    if report.total_paid != debited:   # what went wrong, for the replay
        from collections import Counter
        print("batches:", [(Path(str(b.get("file"))).name, b.get("state"),
                            dict(Counter(b.get("states") or []))) for b in report.batches],
              "confirmed rows never handed, per PSAM:", unhanded)
    assert report.total_paid == debited
    assert report.records_cleared == len(confirmed)
    # one node at a time per PSAM, and a dead node's PSAMs taken within the expiry
    gaps = []
    for slot in {h["slot"] for h in history}:
        leases = [h for h in history if h["slot"] == slot]
        assert [h["token"] for h in leases] == list(range(1, len(leases) + 1))
        for before, after in itertools.pairwise(leases):
            assert before["ended"] is not None and before["ended"] <= after["taken"], (
                slot, before, after)
            if before["ended"] == before["until"] and after["previous"] == before["node"]:
                gaps.append(after["taken"] - before["until"])
    print(f"lease history: {len(history)} leases; takeovers after expiry: {len(gaps)}, "
          f"longest gap {max(gaps, default=0)} ms")
    assert all(g <= system.lease_seconds * 1000 for g in gaps), gaps
