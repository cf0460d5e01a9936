"""The load nodes' HSM leases (host/load/server/leases.py, issue 16) get the two fixes the
payment nodes' PSAM leases had in review (2150eba, e6b4af2) now that both share
host/kit/leases.py: each test failed on the load copy before."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from svcard.host.kit.db import now_ms, step
from svcard.host.load.nodes import OnDemandReader
from svcard.host.load.server import leases as L
from svcard.host.load.server.db import LoadDb, make_engine
from svcard.host.load.stack import DEMO_BANK_ID, hsm_image


async def _sql(fn: Any, *args: Any, **kwargs: Any) -> Any:   # the database inline
    return fn(*args, **kwargs)


def test_an_hsm_lease_taken_but_never_opened_is_not_renewed_for_ever(tmp_path: Path) -> None:
    """A tick took an HSM's lease (committed) and failed before the HSM joined the pool. Every
    later tick renewed all of the node's leases, that one too, while the node never used the
    HSM nor took it again (it never expired): one HSM out of service as long as the node
    lived. Now a renewed lease the pool does not serve is given back and taken again."""
    spec = f"virtual:{hsm_image(tmp_path)}"
    store = L.LeaseStore(make_engine(f"sqlite:///{tmp_path / 'load.db'}"))
    pool = L.LeasedHsmPool([OnDemandReader(spec)])

    async def run() -> None:
        keeper = L.LeaseKeeper(store, pool, "n1", 60.0, _sql, lambda alive: 0)
        store.ensure([spec])
        assert store.take(spec, keeper.node, 60_000) is not None   # the tick that failed
        await pool.start()
        await keeper.start()
        await keeper.tick()
        try:
            assert list(pool.serving) == [0], "the HSM is leased by this node, not used"
        finally:
            await keeper.stop()

    asyncio.run(run())
    assert [h["token"] for h in store.history()] == [1, 2]
    assert all(h["ended"] is not None for h in store.history())   # both given back
    pool.close()
    store.engine.dispose()


def test_a_late_heartbeat_does_not_refuse_a_live_nodes_loads(tmp_path: Path) -> None:
    """Another node settled (refused) the loads of every node not seen within two ticks (2/3
    of a lease), but a node's leases run for a whole lease: a node whose tick came late (a
    slow database, a long HSM open) but still held its HSM had the load it was finishing
    refused under it. Now only loads of nodes unseen for a whole lease are settled."""
    db = LoadDb(make_engine(f"sqlite:///{tmp_path / 'load.db'}"))
    store = L.LeaseStore(db.engine)
    now = now_ms()
    with step(db.engine) as conn:
        for node, age in (("late#1", 45_000), ("dead#2", 61_000)):   # a lease: 60 s
            conn.execute(insert(L.load_nodes).values(node=node, seen=now - age, started=0))
    rows = {node: db.insert({
        "bank_id": DEMO_BANK_ID.hex(), "txn_id": f"{i:032x}", "state": "received",
        "reason": "", "amount": 500, "currency_code": 156, "card_serial": "00" * 10,
        "online_counter": i, "s1": f"{i:08x}", "request_digest": "00" * 32, "node": node})
        for i, node in enumerate(("late#1", "dead#2"))}
    pool = L.LeasedHsmPool([OnDemandReader(f"virtual:{hsm_image(tmp_path)}")])

    async def run() -> None:
        keeper = L.LeaseKeeper(store, pool, "b", 60.0, _sql, db.recover)
        await pool.start()
        await keeper.start()   # its first tick settles the loads of nodes gone
        await keeper.stop()

    asyncio.run(run())
    pool.close()
    states = {r["node"]: r["state"] for r in db.rows() if r["id"] in rows.values()}
    assert states == {"late#1": "received", "dead#2": "refused"}
    db.engine.dispose()


def test_both_servers_lease_on_their_own_tables() -> None:
    """One lease module, two sets of tables: a payment node's PSAM lease and a load node's
    HSM lease of the same slot name never meet (one database may hold both)."""
    from svcard.host.pay.server import leases as P

    assert {t.name for t in L.lease_metadata.sorted_tables} == {
        "hsm_leases", "hsm_lease_history", "load_nodes"}
    assert {t.name for t in P.lease_metadata.sorted_tables} == {
        "psam_leases", "psam_lease_history", "pay_nodes", "psam_serials"}
    assert (L.SCHEMA.component, P.SCHEMA.component) == ("hsm_leases", "psam_leases")
    assert "hsm_leases" in str(L.FENCE) and "psam_leases" in str(P.FENCE)
