"""Load-server nodes on one database (issue 16, point 4 for loads): HSM leases with fencing
tokens (host/load/server/leases.py) and three load-node processes behind Debian's nginx on one
PostgreSQL, SIGKILLed at random while cards load (``--load-node-kills N``, default 4;
``--node-seed``): nothing lost, nothing twice, every HSM leased to one node at a time."""

from __future__ import annotations

import itertools
import random
import signal
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
from svcard.host.demo.system import card_image
from svcard.host.kit.nginx import Nginx, find_nginx
from svcard.host.kit.serving import ServerThread, free_port
from svcard.host.load import client as LC
from svcard.host.load.bank.server import BankConfig, BankServer
from svcard.host.load.nodes import LoadNode, LoadNodeSpec
from svcard.host.load.server import leases as L
from svcard.host.load.server.db import LoadDb, loads, make_engine
from svcard.host.load.stack import DEMO_BANK_ID, DEMO_LOAD_TERMINAL, hsm_image
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    yield c
    c.stop()


def _row(db: LoadDb, txn: str, node: str) -> int:
    return db.insert({"bank_id": DEMO_BANK_ID.hex(), "txn_id": txn, "state": "received",
                      "reason": "", "amount": 500, "currency_code": 156,
                      "card_serial": "00" * 10, "online_counter": 1, "s1": txn[:8],
                      "request_digest": "00" * 32, "node": node})


def _stale_fence_is_refused(url: str) -> None:
    """Node A takes an HSM's lease, lets it expire; B takes it over. A's S2 write and probe
    write with its stale token change nothing; B's go through; a dead A's request is settled
    (no S2 was issued) by B's recovery, B's own is not."""
    db = LoadDb(make_engine(url))
    store = L.LeaseStore(db.engine)
    slot = "virtual:/srv/hsm1.json"
    store.ensure([slot])
    assert store.take(slot, "a#1", ttl_ms=1) == (1, None)
    deadline = time.monotonic() + 5
    while store.take(slot, "b#2", ttl_ms=60_000) is None:
        assert time.monotonic() < deadline, "the expired lease was never taken over"
        time.sleep(0.005)
    history = store.history()
    token = history[-1]["token"]
    assert history[-1]["node"] == "b#2" and history[-1]["previous"] == "a#1" and token >= 2
    stale, current = L.Fence(slot, "a#1", 1), L.Fence(slot, "b#2", token)
    row_id = _row(db, "01" * 16, "a#1")
    before = db.rows()
    assert not db.advance(row_id, "received", stale, state="authorized", s2="00112233",
                          command=b"x")
    assert not db.advance(row_id, "received", L.Fence(slot, "b#2", token - 1),
                          state="authorized", s2="00112233")
    assert not store.current(stale) and store.current(current)
    assert store.renew("a#1", 60_000) == {} and not store.release(slot, "a#1", 1)
    assert db.rows() == before, "a stale token wrote something"
    # B's own request, and a probe: the stale write is refused, B's goes through
    mine = _row(db, "02" * 16, "b#2")
    assert db.advance(mine, "received", current, state="authorized", s2="44556677")
    probe = {"probe_counter": 2, "probe_s2": "8899aabb"}
    assert not db.record_probe(mine, "d1" * 32, stale, **probe)
    assert db.rows()[1]["probe_s2"] is None
    assert db.record_probe(mine, "d1" * 32, current, **probe)
    # A is dead: its request never got an S2 out (it was refused above), so it is settled
    assert db.recover(["b#2"]) == 1
    states = {r["txn_id"]: (r["state"], r["reason"]) for r in db.rows()}
    assert states["01" * 16] == ("refused", "its node stopped before the HSM answered")
    assert states["02" * 16][0] == "authorized"
    db.engine.dispose()


def test_stale_fence_is_refused_on_sqlite(tmp_path: Path) -> None:
    _stale_fence_is_refused(f"sqlite:///{tmp_path / 'loads.db'}")


def test_stale_fence_is_refused_on_postgresql(cluster: Cluster) -> None:
    _stale_fence_is_refused(cluster.new_database())


def test_raced_takes_give_one_holder_on_postgresql(cluster: Cluster) -> None:
    """16 nodes ask for one free HSM at once: one token, one holder, one history row."""
    db = LoadDb(make_engine(cluster.new_database()))
    store = L.LeaseStore(db.engine)
    slot = "virtual:/srv/hsm1.json"
    store.ensure([slot])
    barrier = threading.Barrier(16)
    won: list[tuple[str, Any]] = []

    def take(i: int) -> None:
        barrier.wait()
        won.append((f"n{i}#1", store.take(slot, f"n{i}#1", 60_000)))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [(node, got) for node, got in won if got is not None]
    assert len(won) == 16 and len(winners) == 1 and winners[0][1] == (1, None), won
    assert [(h["node"], h["token"]) for h in store.history()] == [(winners[0][0], 1)]
    db.engine.dispose()


def test_a_take_waits_for_a_fenced_s2_write_in_flight(cluster: Cluster) -> None:
    """PostgreSQL: the S2 write holds the lease row FOR SHARE until it commits, so a takeover
    that starts meanwhile waits for it and bumps the token after it."""
    from svcard.host.kit.db import step

    db = LoadDb(make_engine(cluster.new_database()))
    store = L.LeaseStore(db.engine)
    slot = "virtual:/srv/hsm1.json"
    store.ensure([slot])
    assert store.take(slot, "a#1", ttl_ms=1) == (1, None)
    row_id = _row(db, "03" * 16, "a#1")
    done: dict[str, float] = {}
    with step(db.engine) as conn:   # A's S2 write, not yet committed
        assert conn.execute(loads.update().where(loads.c.id == row_id).where(L.FENCE).values(
            state="authorized", s2="00112233"), L.Fence(slot, "a#1", 1).params()).rowcount
        time.sleep(0.01)   # expired by now: only the row lock holds B back

        def take() -> None:
            done["asked"] = time.monotonic()
            assert store.take(slot, "b#2", 60_000) is not None

        thread = threading.Thread(target=take)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), "the take did not wait for the fenced write"
        committed = time.monotonic()
    thread.join(10)
    assert not thread.is_alive() and committed > done["asked"]
    assert store.history()[-1]["token"] == 2
    db.engine.dispose()


def test_load_schema_upgrade_adds_the_node_column(tmp_path: Path) -> None:
    from sqlalchemy import create_engine, inspect, text

    url = f"sqlite:///{tmp_path / 'old.db'}"
    make_engine(url).dispose()
    raw = create_engine(url)
    with raw.begin() as conn:
        conn.execute(text("ALTER TABLE loads DROP COLUMN node"))
        conn.execute(text("UPDATE svcard_schema SET version = 1 WHERE component = 'load'"))
    raw.dispose()
    make_engine(url).dispose()
    raw = create_engine(url)
    assert "node" in {c["name"] for c in inspect(raw).get_columns("loads")}
    raw.dispose()


def _wait(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _bank(folder: Path, key: bytes, load_url: str) -> tuple[BankServer, ServerThread]:
    server = BankServer(BankConfig(DEMO_BANK_ID, key, load_url, DEMO_LOAD_TERMINAL,
                                   db_url=f"sqlite:///{folder / 'bank.db'}"))
    thread = ServerThread(server.app())
    server.config.public_url = thread.url
    thread.start()
    server.db.create_account("alice", "Alice", server.config.currency_code, 10_000_000, "pw")
    return server, thread


def _holds(node: LoadNode) -> bool:
    try:
        return int(httpx.get(node.url + "/v1/health", timeout=2).json()["hsms_leased"]) > 0
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return False


def test_a_paused_node_issues_no_s2_after_its_lease_is_taken(cluster: Cluster,
                                                            tmp_path: Path) -> None:
    """Node A is stopped (SIGSTOP) while its HSM makes S2 for a load; its lease expires and
    another holder takes it (the test itself: only the fence stands between A and the
    database). A resumes with a stale token: its write of S2 is refused, the load is closed
    'refused' (no S2 left the server), the card is not credited and the bank refunds."""
    db_url = cluster.new_database()
    hsm = hsm_image(tmp_path)
    key = bytes(range(32))
    spec = f"delayed:600:virtual:{hsm}"   # every HSM APDU takes 0.6 s
    a = LoadNode(tmp_path, LoadNodeSpec("loadA", free_port(), db_url, [spec],
                                        DEMO_BANK_ID.hex(), key.hex(),
                                        DEMO_LOAD_TERMINAL.hex(), lease_seconds=2.0,
                                        acquire_timeout=5.0))
    bank, bank_thread = _bank(tmp_path, key, a.url)
    card = card_image(tmp_path, ep=0)
    db = LoadDb(make_engine(db_url))
    store = L.LeaseStore(db.engine)
    outcome: list[Any] = []
    try:
        a.start().wait_ready()
        _wait(lambda: _holds(a), "node A to lease the HSM")

        def load() -> None:
            try:
                with httpx.Client(timeout=60) as http, open_reader(f"virtual:{card}") as r:
                    outcome.append(LC.load(bank_thread.url + "/v1/load", r, account="alice",
                                           secret="pw", amount=700,
                                           journal=Journal(tmp_path / "j.jsonl"), http=http))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=load)
        thread.start()
        _wait(lambda: [r for r in db.rows() if r["state"] == "received"], "the request")
        a.signal(signal.SIGSTOP)       # A's HSM is making S2 now
        _wait(lambda: store.take(spec, "intruder#1", 60_000) is not None,
              "the lease to expire and be taken", timeout=20)
        a.signal(signal.SIGCONT)
        thread.join(120)
        assert not thread.is_alive()
        assert read_image(card)["app"]["ep"]["balance"] == 0, "credited by a stale node's S2"
        assert len(outcome) == 1 and isinstance(outcome[0], LC.LoadOutcome), outcome
        assert outcome[0].outcome == "not loaded", outcome[0]
        [row] = db.rows()
        assert row["state"] == "not_loaded" and row["s2"] is None, row
        assert "lost its HSM lease" in row["reason"] or row["evidence"] == "no-s2", row
        assert read_image(card)["app"]["ep"]["balance"] == 0
        assert bank.db.totals().get("confirmed", 0) == 0
        assert bank.db.totals()["refunded"] == 700
    finally:
        a.kill()
        bank_thread.stop()
        db.engine.dispose()


def test_a_paused_node_records_no_probe_after_its_lease_is_taken(cluster: Cluster,
                                                                tmp_path: Path) -> None:
    """The card does not load (its CREDIT FOR LOAD fails), so the client asks for the
    zero-value probe; node A is stopped while (or before) its HSM makes the probe's S2 and its
    lease is taken meanwhile. A resumed records no probe and answers 503 (nothing decided);
    once the intruder is gone A leases the HSM again, the client's resume probes for real and
    the load is closed 'not loaded' on that evidence, refunded once."""
    from svcard.protocols import purse as P

    db_url = cluster.new_database()
    hsm = hsm_image(tmp_path)
    key = bytes(range(32))
    spec = f"delayed:800:virtual:{hsm}"
    a = LoadNode(tmp_path, LoadNodeSpec("loadA", free_port(), db_url, [spec],
                                        DEMO_BANK_ID.hex(), key.hex(),
                                        DEMO_LOAD_TERMINAL.hex(), lease_seconds=2.0,
                                        acquire_timeout=5.0))
    bank, bank_thread = _bank(tmp_path, key, a.url)
    card = card_image(tmp_path, ep=0)
    db = LoadDb(make_engine(db_url))
    store = L.LeaseStore(db.engine)
    journal = Journal(tmp_path / "j.jsonl")
    probing = threading.Event()
    outcome: list[Any] = []
    try:
        a.start().wait_ready()
        _wait(lambda: _holds(a), "node A to lease the HSM")

        def load() -> None:
            try:
                with httpx.Client(timeout=60) as http, open_reader(f"virtual:{card}") as r:
                    real = r.exchange
                    credits = []

                    def card_apdu(apdu: bytes) -> Any:
                        if apdu[1] == P.INS_CREDIT_FOR_LOAD and not credits:
                            credits.append(apdu)
                            return real(b"\x00\xA4\x00\x00\x02\x00\x00")   # an error SW
                        if credits and apdu[1] == P.INS_INITIALIZE:
                            probing.set()   # the zero-value S1: the probe comes next
                        return real(apdu)

                    r.exchange = card_apdu  # type: ignore[method-assign]
                    outcome.append(LC.load(bank_thread.url + "/v1/load", r, account="alice",
                                           secret="pw", amount=700, journal=journal,
                                           http=http))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=load)
        thread.start()
        assert probing.wait(60), "the client never asked for the probe"
        time.sleep(0.3)                # the result posted; A's HSM makes the probe's S2
        a.signal(signal.SIGSTOP)
        _wait(lambda: store.take(spec, "intruder#1", 60_000) is not None,
              "the lease to expire and be taken", timeout=20)
        a.signal(signal.SIGCONT)
        thread.join(120)
        assert not thread.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], LC.PaymentRefused), outcome
        assert outcome[0].status == 503, outcome[0]
        [row] = db.rows()
        assert row["state"] == "authorized" and row["probe_s2"] is None, row
        # the intruder goes; A takes the HSM back, the client's resume finishes the load
        token = max(h["token"] for h in store.history())
        assert store.release(spec, "intruder#1", token)
        _wait(lambda: _holds(a), "node A to lease the HSM again")
        with httpx.Client(timeout=60) as http, open_reader(f"virtual:{card}") as r:
            report = LC.resume_loads(r, journal=journal, http=http)
        assert [x["outcome"] for x in report] == ["not loaded"], report
        [row] = db.rows()
        assert (row["state"], row["evidence"]) == ("not_loaded", "probe"), row
        assert read_image(card)["app"]["ep"]["balance"] == 0
        assert bank.db.totals().get("refunded") == 700 and "confirmed" not in bank.db.totals()
    finally:
        a.kill()
        bank_thread.stop()
        db.engine.dispose()


def test_a_node_leasing_no_hsm_logs_no_request(cluster: Cluster, tmp_path: Path) -> None:
    """A node whose HSM is leased elsewhere answers a load request 503 before logging it, so
    nginx may ask the next node with the same bytes (a logged request would be closed
    'refused' and the retry refused too: the load lost for a busy node)."""
    db_url = cluster.new_database()
    hsm = f"virtual:{hsm_image(tmp_path)}"
    key = bytes(range(32))
    db = LoadDb(make_engine(db_url))
    store = L.LeaseStore(db.engine)
    store.ensure([hsm])
    assert store.take(hsm, "elsewhere#1", 600_000) == (1, None)
    a = LoadNode(tmp_path, LoadNodeSpec("loadA", free_port(), db_url, [hsm],
                                        DEMO_BANK_ID.hex(), key.hex(),
                                        DEMO_LOAD_TERMINAL.hex(), lease_seconds=2.0))
    _, bank_thread = _bank(tmp_path, key, a.url)
    card = card_image(tmp_path, ep=0)
    try:
        a.start().wait_ready()
        with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as r, \
                pytest.raises(LC.PaymentRefused) as caught:
            LC.load(bank_thread.url + "/v1/load", r, account="alice", secret="pw",
                        amount=300, journal=Journal(tmp_path / "j.jsonl"), http=http)
        assert caught.value.status == 503, caught.value
        assert db.rows() == [], "a request logged by a node that leases no HSM"
        assert read_image(card)["app"]["ep"]["balance"] == 0
    finally:
        a.kill()
        bank_thread.stop()
        db.engine.dispose()


class LoadCluster:
    """Three load nodes on one PostgreSQL behind nginx, three HSM images on a shared folder,
    the bank in this process."""

    def __init__(self, folder: Path, db_url: str, lease_seconds: float) -> None:
        self.db_url, self.lease_seconds = db_url, lease_seconds
        self.key = bytes(range(32))
        self.hsms = [f"virtual:{hsm_image(folder, f'hsm{i}.json')}" for i in range(3)]
        self.nodes = [LoadNode(folder, LoadNodeSpec(
            f"load{i + 1}", free_port(), db_url, self.hsms, DEMO_BANK_ID.hex(),
            self.key.hex(), DEMO_LOAD_TERMINAL.hex(), lease_seconds=lease_seconds,
            acquire_timeout=1.0)) for i in range(3)]
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_ready()
        self.nginx = Nginx(folder / "nginx", [f"127.0.0.1:{n.spec.port}" for n in self.nodes],
                           name="load_nodes").start()
        self.bank, self.bank_thread = _bank(folder, self.key, self.nginx.url)

    @property
    def bank_url(self) -> str:
        return self.bank_thread.url + "/v1/load"

    def close(self) -> None:
        self.bank_thread.stop()
        self.nginx.stop()
        for node in self.nodes:
            node.stop()


def _resume(reader: Any, journal: Journal, http: httpx.Client, deadline: float) -> None:
    """Finish the card's open loads, again until none is left "still open" (a request its
    killed node held stays ``received`` until another node sees that node's heartbeat stop,
    up to a lease later, and voids it; until then the server answers 409 and the resume
    leaves it open) or the deadline passes."""
    while True:   # nodes may be down a moment
        try:
            report = LC.resume_loads(reader, journal=journal, http=http)
            still = [r for r in report if str(r["outcome"]).startswith("still open")]
            if not still:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"loads still open at the deadline: {still}")
        except Exception:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def test_load_nodes_behind_nginx_survive_kills(cluster: Cluster, tmp_path: Path,
                                               load_node_kills: int, node_seed: int) -> None:
    if find_nginx() is None:
        pytest.skip("nginx is not installed (scripts/install-system-deps)")
    print(f"load node kill test: seed {node_seed}, {load_node_kills} kills (replay: "
          f"--node-seed {node_seed} --load-node-kills {load_node_kills})")
    rng = random.Random(node_seed)
    system = LoadCluster(tmp_path, cluster.new_database(), 3.0)
    cards = [card_image(tmp_path, f"card{i}.json", ep=0) for i in range(3)]
    stop = threading.Event()
    errors: list[BaseException] = []
    outcomes: dict[str, int] = {}

    def customer(index: int) -> None:
        local = random.Random(node_seed * 10 + index)
        journal = Journal(tmp_path / f"journal{index}.jsonl")
        try:
            with httpx.Client(timeout=30) as http, \
                    open_reader(f"virtual:{cards[index]}") as reader:
                while not stop.is_set():
                    try:
                        out = LC.load(system.bank_url, reader, account="alice", secret="pw",
                                      amount=local.randint(1, 500), journal=journal,
                                      http=http)
                        key = out.outcome
                    except Exception as exc:
                        key = f"{type(exc).__name__}: {str(exc)[:60]}"
                        _resume(reader, journal, http, time.monotonic() + 120)
                    outcomes[key] = outcomes.get(key, 0) + 1
                _resume(reader, journal, http, time.monotonic() + 120)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=customer, args=(i,)) for i in range(len(cards))]
    try:
        for t in threads:
            t.start()
        for _ in range(load_node_kills):
            time.sleep(rng.uniform(0.3, 2.5))
            victim = rng.choice(system.nodes)
            victim.kill()
            time.sleep(rng.uniform(0.0, 1.0))
            victim.start()
            victim.wait_ready()
        time.sleep(rng.uniform(0.5, 1.5))
        stop.set()
        for t in threads:
            t.join(300)
        assert not errors, errors
        print("loads:", outcomes)
        assert outcomes.get("loaded", 0) > 0
        _audit(system, cards)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        system.close()


def _audit(system: LoadCluster, cards: list[Path]) -> None:
    credited = sum(read_image(c)["app"]["ep"]["balance"] for c in cards)
    engine = make_engine(system.db_url)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(loads))]
        history = [dict(r._mapping) for r in conn.execute(
            select(L.lease_history).order_by(L.lease_history.c.slot, L.lease_history.c.token))]
    engine.dispose()
    loaded = [r for r in rows if r["state"] == "loaded"]
    totals = system.bank.db.totals()
    print(f"loads: {len(rows)} rows, {len(loaded)} loaded = {credited} credited; bank "
          f"{totals}; {len(history)} HSM leases")
    assert sum(r["amount"] for r in loaded) == credited, "a load lost or counted twice"
    assert totals.get("confirmed", 0) == credited, "the bank's debits differ from the cards' loads"
    assert totals["accounts"] + totals.get("confirmed", 0) == 10_000_000
    assert not [r for r in rows if r["state"] in ("received", "authorized")], "a load open"
    gaps = []
    for slot in {h["slot"] for h in history}:
        leases = [h for h in history if h["slot"] == slot]
        assert [h["token"] for h in leases] == list(range(1, len(leases) + 1))
        for before, after in itertools.pairwise(leases):
            assert before["ended"] is not None and before["ended"] <= after["taken"], (
                slot, before, after)
            if before["ended"] == before["until"] and after["previous"] == before["node"]:
                gaps.append(after["taken"] - before["until"])
    print(f"takeovers after expiry: {len(gaps)}, longest gap {max(gaps, default=0)} ms")
    assert all(g <= system.lease_seconds * 1000 for g in gaps), gaps


def _load_toml(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "load.toml"
    path.write_text(f'terminal_id = "000000000009"\n{extra}\n[[bank]]\n'
                    f'id = "{DEMO_BANK_ID.hex()}"\nshared_key = "{"ab" * 32}"\n',
                    encoding="utf-8")
    return path


def test_a_node_from_the_load_toml(tmp_path: Path) -> None:
    from svcard.host.load.config import load_config

    config = load_config(_load_toml(tmp_path, 'node_name = "load-2"\nlease_seconds = 4'))
    assert (config.node_name, config.lease_seconds) == ("load-2", 4.0)
    assert load_config(_load_toml(tmp_path, "")).node_name == ""


@pytest.mark.parametrize(("extra", "field"), [
    ('node_name = "a b"', "node_name"), ('node_name = ""', "node_name"),
    (f'node_name = "{"n" * 61}"', "node_name"),
    ('node_name = "n"\nlease_seconds = 0.5', "lease_seconds"),
    ('node_name = "n"\nlease_seconds = 1e9', "lease_seconds"),
    ("lease_seconds = 5", "lease_seconds"),
])
def test_a_bad_node_setting_is_one_line_naming_file_and_field(tmp_path: Path, extra: str,
                                                              field: str) -> None:
    from svcard.host.kit.config import ConfigError
    from svcard.host.load.config import load_config

    path = _load_toml(tmp_path, extra)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and f"{field}:" in message
    assert "ab" * 32 not in message


def test_an_hsm_slot_never_holds_the_keys_of_its_spec() -> None:
    """The slot goes into hsm_leases, the lease history and the node's log lines: a
    jcardsim: spec's parameters (which may carry keys) are left out, a digest added."""
    from svcard.host.load.nodes import OnDemandReader, slot_name

    secret = "00112233445566778899AABBCCDDEEFF"
    spec = f"jcardsim:com.example.Hsm:A00000000399:{secret}"
    for s in (spec, f"delayed:50:{spec}"):
        name = OnDemandReader(s).name
        assert secret not in name.upper() and "com.example.Hsm" in name, name
    assert slot_name(spec) != slot_name(spec.replace("FF", "FE"))
    assert slot_name("virtual:/srv/hsm1.json") == "virtual:/srv/hsm1.json"
    assert slot_name("delayed:9:virtual:/h.json") == "delayed:9:virtual:/h.json"
