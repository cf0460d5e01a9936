"""The authentication server remembers the sealed PINs of the authorisations it took in its
database (``goods_auth_seals``), not in memory: a copy of a wrong-PIN authorisation sent after
the server restarted (still within its 300 s) is refused, and the institution counts the wrong
PIN once. The check and the record are one database step: racing copies make one relay.
Each test runs on SQLite and on PostgreSQL (a private test cluster)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pg_env import Cluster, start_cluster
from test_goods_attack import authorisation, challenge_of, offered

from svcard.host.goods import db as D
from svcard.host.goods import wire as W
from svcard.host.goods.config import ROLES
from svcard.host.goods.device import DeviceError
from svcard.host.goods.server.auth import AuthServer, digest
from svcard.host.goods.stack import GoodsStack, make_card, start_goods
from svcard.host.kit.db import first_row
from svcard.host.terminal.reader_specs import open_reader

A = 70_031
SERIAL_A = f"{A:020d}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    yield c
    c.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GoodsStack]:
    urls = None
    if request.param == "postgresql":
        cluster: Cluster = request.getfixturevalue("cluster")
        urls = {r: cluster.new_database() for r in ROLES}
    s = start_goods(tmp_path / "servers", db_urls=urls)
    try:
        yield s
    finally:
        s.close()


def failures(stack: GoodsStack) -> int:
    row = first_row(stack.engine("bank"), D.accounts, account="acc1")
    assert row is not None
    return int(row["pin_failures"])


def test_a_wrong_pin_copy_after_a_restart_is_refused(stack: GoodsStack,
                                                      tmp_path: Path) -> None:
    stack.account("acc1", A)
    card = make_card(tmp_path / "cards", A)
    device = stack.device()
    first = offered(stack, device)
    reader, challenge = challenge_of(card)
    try:
        body = authorisation(device, first, SERIAL_A, challenge, pin="000000")
        assert device._post("/v1/authorisations", W.AUTHORISATION, body)["paid"] is False
        assert failures(stack) == 1
        stack.restart("auth")
        for _ in range(2):
            with pytest.raises(DeviceError, match="409"):
                device._post("/v1/authorisations", W.AUTHORISATION, body)
    finally:
        reader.__exit__(None, None, None)
    assert failures(stack) == 1
    row = first_row(stack.engine("bank"), D.accounts, account="acc1")
    assert row is not None and row["state"] == "active"
    with open_reader(f"virtual:{card}") as r:   # the holder's own retry still pays
        assert device.authorise(r, first, "123456").paid


def test_a_paid_copy_after_a_restart_is_answered_again(stack: GoodsStack,
                                                       tmp_path: Path) -> None:
    stack.account("acc1", A)
    card = make_card(tmp_path / "cards", A)
    device = stack.device()
    first = offered(stack, device)
    reader, challenge = challenge_of(card)
    try:
        body = authorisation(device, first, SERIAL_A, challenge)
        assert device._post("/v1/authorisations", W.AUTHORISATION, body)["paid"] is True
        stack.restart("auth")
        again = device._post("/v1/authorisations", W.AUTHORISATION, body)
        assert again["paid"] is True and again["order"] == first.order
    finally:
        reader.__exit__(None, None, None)
    assert failures(stack) == 0


def test_racing_copies_take_one_seal(stack: GoodsStack) -> None:
    """The check and the record are one step: of 8 threads taking the same seal at once,
    exactly one gets it; a different seal of the same order is its own."""
    auth = stack.servers["auth"]
    assert isinstance(auth, AuthServer)
    seal = digest("sealed-pin-copy")
    with ThreadPoolExecutor(8) as pool:
        taken = list(pool.map(lambda _: auth._take_seal("ab" * 16, seal), range(8)))
    assert taken.count(True) == 1
    assert auth._take_seal("ab" * 16, digest("another")) is True
    auth._seal_paid("ab" * 16, seal)
    assert auth._take_seal("ab" * 16, seal) is True   # paid: answered again
