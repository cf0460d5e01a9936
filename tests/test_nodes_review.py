"""An attacker's and a crash engineer's review of the PSAM leases (host/pay/server/leases.py,
issue 16): each test is a break found in review, failing before its fix."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pg_env import Cluster, start_cluster

from svcard.host.kit.db import now_ms
from svcard.host.pay.server import leases as L
from svcard.host.pay.server.db import make_engine

SLOT = "virtual:/srv/psam1.json"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    yield c
    c.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'pay.db'}"
    return str(request.getfixturevalue("cluster").new_database())


def _clock(monkeypatch: pytest.MonkeyPatch, skew_ms: int) -> None:
    """This process's clock (as the lease code reads it) off by ``skew_ms``."""
    import svcard.host.kit.leases as shared

    monkeypatch.setattr(shared, "now_ms", lambda: now_ms() + skew_ms)
    monkeypatch.setattr(L, "now_ms", lambda: now_ms() + skew_ms)


def test_a_node_with_a_fast_clock_cannot_take_a_live_lease(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Node A holds the lease for a minute more. Node B's clock runs 2 minutes ahead: by B's
    clock A's lease ran out, and B took it while A still served the PSAM (two holders: before
    the lease times came from the database's clock, B's take succeeded)."""
    store = L.LeaseStore(make_engine(db_url))
    store.ensure([SLOT])
    assert store.take(SLOT, "a#1", ttl_ms=60_000) == (1, None)
    _clock(monkeypatch, +120_000)
    assert store.take(SLOT, "b#2", ttl_ms=60_000) is None
    assert [h["node"] for h in store.history()] == ["a#1"]
    store.engine.dispose()


def test_a_node_with_a_slow_clock_does_not_renew_into_the_past(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Node A's clock runs 2 minutes behind: its take and renewal of a 1-minute lease wrote
    an expiry already past, so any other node could take the PSAM at once while A served it
    for 0.9 minute by its own (monotonic) reckoning."""
    store = L.LeaseStore(make_engine(db_url))
    store.ensure([SLOT])
    _clock(monkeypatch, -120_000)
    assert store.take(SLOT, "a#1", ttl_ms=60_000) == (1, None)
    assert store.renew("a#1", 60_000) == {SLOT: 1}
    monkeypatch.undo()
    assert store.take(SLOT, "b#2", ttl_ms=60_000) is None
    (lease,) = store.history()
    assert lease["until"] > now_ms() + 50_000   # the expiry counted on the database's clock
    store.engine.dispose()


# --- the batch close at a node ------------------------------------------------------------

class OneNode:
    """A payment-server node in this process (SQLite, one PSAM opened on demand, a long lease
    so that no tick comes between the test's steps) and a merchant in front of it."""

    def __init__(self, folder: Path) -> None:
        from svcard.host.kit.serving import ServerThread, free_port
        from svcard.host.pay.merchant.server import MerchantConfig, MerchantServer
        from svcard.host.pay.nodes import OnDemandReader
        from svcard.host.pay.server.app import MerchantAccount, PaymentConfig, PaymentServer
        from svcard.host.pay.server.psam_pool import identify
        from svcard.host.pay.stack import DEMO_MERCHANT_ID, psam_images
        from svcard.host.terminal.reader_specs import open_reader

        (psam,) = psam_images(folder, 1)
        with open_reader(f"virtual:{psam}") as reader:
            terminal_id = identify(reader).terminal_id
        key = bytes(range(32))
        self.db_url = f"sqlite:///{folder / 'pay.db'}"
        self.batches = folder / "concentration"
        self.server = PaymentServer(PaymentConfig(
            {DEMO_MERCHANT_ID: MerchantAccount(DEMO_MERCHANT_ID, key)}, db_url=self.db_url,
            admin_token="t", concentration_dir=str(self.batches), node_name="n1",
            lease_seconds=60.0), [OnDemandReader(f"virtual:{psam}")])
        self.payment = ServerThread(self.server.app(), port=free_port()).start()
        port = free_port()
        self.merchant_server = MerchantServer(MerchantConfig(
            DEMO_MERCHANT_ID, key, self.payment.url, terminal_id,
            public_url=f"http://127.0.0.1:{port}", variants=frozenset(("fig6", "fig8")),
            db_url=f"sqlite:///{folder / 'merchant.db'}"))
        self.merchant = ServerThread(self.merchant_server.app(), port=port).start()
        self.folder = folder

    def pay(self, card: Path, variant: str) -> None:
        import httpx

        from svcard.host.pay import client as C
        from svcard.host.terminal.journal import Journal
        from svcard.host.terminal.reader_specs import open_reader

        with httpx.Client(timeout=60) as http, open_reader(f"virtual:{card}") as reader:
            C.pay(f"{self.merchant.url}/v1/checkout/song?variant={variant}", reader,
                  journal=Journal(self.folder / "journal.jsonl"), http=http)

    def close_batches(self) -> tuple[int, dict[str, object]]:
        import httpx

        answer = httpx.post(self.payment.url + "/v1/batches/close", timeout=60,
                            headers={"Authorization": "Bearer t"})
        return answer.status_code, dict(answer.json()) if answer.status_code == 200 else {
            "text": answer.text}

    def rows(self) -> list[dict[str, object]]:
        from sqlalchemy import select

        from svcard.host.pay.server.db import payments

        with self.server.db.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(payments)
                                                           .order_by(payments.c.id))]

    def stop(self) -> None:
        self.merchant.stop()
        self.merchant_server.close()
        self.payment.stop()


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[OneNode]:
    n = OneNode(tmp_path)
    try:
        yield n
    finally:
        n.stop()


def test_a_batch_with_a_dead_nodes_record_closes(node: OneNode, tmp_path: Path) -> None:
    """A node died after its PSAM answered INIT SAM and before the answer was recorded: the
    draw was voided (no psam_id) and the PSAM's record has no payment row. The next batch close
    found fewer rows than records, called that a lost lease and answered 500 - the node's
    other PSAMs and its late proofs were then not handed in that round."""
    from sqlalchemy import update

    from svcard.host.demo.system import card_image
    from svcard.host.kit.db import step
    from svcard.host.pay.server.db import payments

    card = card_image(tmp_path, ep=10_000)
    node.pay(card, "fig6")
    node.pay(card, "fig6")
    first = node.rows()[0]
    with step(node.server.db.engine) as conn:   # as PaymentDb.recover leaves such a draw
        conn.execute(update(payments).where(payments.c.id == first["id"]).values(
            state="voided", psam_id=None, ttn=None, reason="its node stopped"))
    status, body = node.close_batches()
    assert status == 200, body
    (batch,) = body["batches"]   # type: ignore[misc]
    assert [r["batch"] for r in node.rows()] == [None, Path(str(batch)).name]


def test_a_closed_batch_is_marked_even_if_the_lease_moved_meanwhile(
        node: OneNode, tmp_path: Path) -> None:
    """The lease of the PSAM moved (expired, taken over) between the node's last renewal and
    its batch close. The PSAM did close the batch and its file was written, but the fenced
    marking of the rows was refused: rows left with no batch, so a FIG. 8 payment confirmed
    later never went out in a late-proofs file (late proofs need the row's batch), and the
    merchant was never paid for it."""
    from sqlalchemy import update

    from svcard.host.demo.system import card_image
    from svcard.host.kit.db import step

    card = card_image(tmp_path, ep=10_000)
    node.pay(card, "fig6")
    with step(node.server.db.engine) as conn:   # taken over, as after an expiry
        conn.execute(update(L.psam_leases).values(node="intruder#1",
                                                  token=L.psam_leases.c.token + 1))
    status, body = node.close_batches()
    assert status == 200, body
    (batch,) = body["batches"]   # type: ignore[misc]
    assert [r["batch"] for r in node.rows()] == [Path(str(batch)).name]


def test_a_batch_closed_but_never_written_is_written_at_the_next_close(
        node: OneNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The crash engineer's gap: the PSAM closed its batch, then the server failed before the
    batch file was written (a full disk here; a SIGKILL of the node is the same). The next
    close closed a new, empty batch: the lost batch's records never reached clearing and its
    rows stayed without a batch for ever. Now the next close asks the PSAM for its last closed
    batch again (CLOSE BATCH P1=1), sees that no file of it was written, and writes it."""
    from svcard.card.storage import read_image
    from svcard.fixtures import fixture_path
    from svcard.host.demo.system import card_image
    from svcard.host.pay.server import batches as B
    from svcard.host.settle import clearing as CL
    from svcard.host.settle.config import clearing_config
    from svcard.host.settle.db import make_engine as clearing_engine

    card = card_image(tmp_path, ep=10_000)
    node.pay(card, "fig6")
    node.pay(card, "fig8")
    real = B.write_atomically

    def full_disk(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(B, "write_atomically", full_disk)
    status, _ = node.close_batches()
    assert status != 200 and not list(node.batches.glob("batch-*"))
    monkeypatch.setattr(B, "write_atomically", real)
    status, body = node.close_batches()
    assert status == 200, body
    names = sorted(Path(str(b)).name for b in body["batches"])   # type: ignore[attr-defined]
    assert names == ["batch-000000000001-00000000000000000001-000001.json"]
    assert [r["batch"] for r in node.rows()] == names * 2
    assert node.close_batches() == (200, {"batches": [], "late_proofs": []})   # once only
    report = CL.run_clearing(clearing_config(fixture_path("clearing-demo.toml")),
                             node.batches, clearing_engine(f"sqlite:///{tmp_path / 'cl.db'}"),
                             tmp_path / "settlement")
    debited = 10_000 - int(read_image(card)["app"]["ep"]["balance"])
    assert (report.records_cleared, report.total_paid) == (2, debited)


def test_a_psam_that_fails_to_open_leaves_its_image_unlocked(tmp_path: Path) -> None:
    """Two openers, the other way round: a node took a lease, opened the image (taking its
    file lock) and then the PSAM failed to identify itself (here: the spec names a card image,
    not a PSAM). The node gave the lease back but kept the reader, and so the image lock, for
    as long as it lived: no other node could open that PSAM even while holding its lease."""
    import asyncio

    from svcard.host.demo.system import card_image
    from svcard.host.pay.nodes import OnDemandReader
    from svcard.host.terminal.reader_specs import open_reader

    image = card_image(tmp_path, ep=1_000)   # not a PSAM: SELECT of the PSAM AID fails
    spec = f"virtual:{image}"
    store = L.LeaseStore(make_engine(f"sqlite:///{tmp_path / 'pay.db'}"))
    pool = L.LeasedPsamPool([OnDemandReader(spec)])

    async def sql(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        return fn(*args, **kwargs)

    async def run() -> None:
        keeper = L.LeaseKeeper(store, pool, "n1", 60.0, sql, lambda alive: 0)
        await pool.start()
        await keeper.start()   # its first tick takes the lease, fails to open, gives it back
        assert not pool.serving
        await keeper.stop()

    asyncio.run(run())
    assert [(h["node"].split("#")[0], h["ended"] is not None) for h in store.history()] == [
        ("n1", True)]
    with open_reader(spec, lock_timeout=0.3) as reader:   # before: the lock was still held
        assert reader is not None
    pool.close()
    store.engine.dispose()


def test_a_psam_slot_never_holds_the_keys_of_its_spec() -> None:
    """A jcardsim: spec's PARAMS_HEX may carry the applet's keys; the spec was the lease's
    slot as it was: stored in psam_leases and psam_lease_history and written in the node's
    log lines ("lost the lease of ..."). The slot now shows the spec without them, plus a
    digest so that two specs differing only in their keys are two slots."""
    from svcard.host.pay.nodes import OnDemandReader, slot_name

    secret = "00112233445566778899AABBCCDDEEFF"
    spec = f"jcardsim:com.example.Psam:A00000000386:{secret}"
    for s in (spec, f"delayed:50:{spec}"):
        name = OnDemandReader(s).name
        assert secret not in name.upper() and "com.example.Psam" in name, name
    assert slot_name(spec) != slot_name(spec.replace("FF", "FE"))
    assert slot_name("virtual:/srv/psam1.json") == "virtual:/srv/psam1.json"


def test_a_lease_taken_but_never_opened_is_not_renewed_for_ever(tmp_path: Path) -> None:
    """A tick took a PSAM's lease (committed) and then failed before the PSAM joined the pool
    (a database error as the answer came back, or while giving it back after a failed open).
    Every later tick renewed ALL of the node's leases - that one too - while the node never
    served it and never took it again (it was not expired): one PSAM out of service as long
    as the node lived. Now a renewed lease the pool does not serve is given back, and taken
    again properly."""
    import asyncio

    from svcard.host.pay.nodes import OnDemandReader
    from svcard.host.pay.stack import psam_images

    (psam,) = psam_images(tmp_path, 1)
    spec = f"virtual:{psam}"
    store = L.LeaseStore(make_engine(f"sqlite:///{tmp_path / 'pay.db'}"))
    pool = L.LeasedPsamPool([OnDemandReader(spec)])

    async def sql(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        return fn(*args, **kwargs)

    async def run() -> None:
        keeper = L.LeaseKeeper(store, pool, "n1", 60.0, sql, lambda alive: 0)
        store.ensure([spec])
        assert store.take(spec, keeper.node, 60_000) is not None   # the tick that failed
        await pool.start()
        await keeper.start()
        await keeper.tick()
        try:
            assert list(pool.serving) == [0], "the PSAM is leased by this node, not served"
        finally:
            await keeper.stop()

    asyncio.run(run())
    assert [h["token"] for h in store.history()] == [1, 2]
    pool.close()
    store.engine.dispose()


def test_a_late_heartbeat_does_not_void_a_live_nodes_draws(tmp_path: Path) -> None:
    """Another node settled the draws of every node not seen within two ticks (2/3 of a
    lease), but a node's leases run for a whole lease: a node whose tick came late (a slow
    database, a long PSAM open) but that still held its leases had the draw it was finishing
    voided under it (its PSAM's answer then refused: 409, a PSAM record paid to nobody). Now
    only draws of nodes unseen for a whole lease are settled: their leases have expired."""
    import asyncio

    from sqlalchemy import insert

    from svcard.host.kit.db import step
    from svcard.host.pay.server.db import PaymentDb

    db = PaymentDb(make_engine(f"sqlite:///{tmp_path / 'pay.db'}"))
    store = L.LeaseStore(db.engine)
    now = now_ms()
    rows = {}
    with step(db.engine) as conn:
        for node, age in (("late#1", 45_000), ("dead#2", 61_000)):   # a lease: 60 s
            conn.execute(insert(L.pay_nodes).values(node=node, seen=now - age, started=0))
    for i, node in enumerate(("late#1", "dead#2")):
        rows[node] = db.insert_received({
            "merchant_id": "4D45524348303031", "txn_id": f"{i:032x}", "variant": 2,
            "amount": 99, "currency_code": 156, "card_serial": "00" * 10, "card_counter": i,
            "draw_digest": "00" * 32, "node": node})

    async def sql(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        return fn(*args, **kwargs)

    from svcard.host.pay.nodes import OnDemandReader
    from svcard.host.pay.stack import psam_images

    pool = L.LeasedPsamPool([OnDemandReader(f"virtual:{psam_images(tmp_path, 1)[0]}")])

    async def run() -> None:
        keeper = L.LeaseKeeper(store, pool, "b", 60.0, sql, db.recover)
        await pool.start()
        await keeper.start()   # its first tick settles the draws of nodes gone
        await keeper.stop()

    asyncio.run(run())
    pool.close()
    states = {node: (db.by_id(row) or {}).get("state") for node, row in rows.items()}
    assert states == {"late#1": "received", "dead#2": "voided"}
    db.engine.dispose()
