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
