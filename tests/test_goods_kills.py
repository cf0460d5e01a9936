"""Seed 000 with the servers as processes and random SIGKILLs of the authentication, payment
and fulfilment servers (each started again at once) while devices buy goods, retrying what
failed; then every card's next contact. Then: 0 goods without a payment, 0 payments without
exactly one good on the card, every balance exact.

``SVCARD_GOODS_KILL_RUNS`` goods (default 8), ``SVCARD_GOODS_KILLS`` kills (default 3),
``SVCARD_GOODS_KILL_SEED`` (default 20261122); the seed is printed."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import select
from test_goods_processes import Processes, run

from svcard.host.goods import db as D
from svcard.host.goods import wire as W
from svcard.host.goods.config import ROLES
from svcard.host.goods.device import Device, DeviceError
from svcard.host.goods.server.bank import add_account
from svcard.host.goods.stack import make_card
from svcard.host.terminal.capp import read_goods
from svcard.host.terminal.reader_specs import open_reader

RUNS = int(os.environ.get("SVCARD_GOODS_KILL_RUNS", "8"))
KILLS = int(os.environ.get("SVCARD_GOODS_KILLS", "3"))
SEED = int(os.environ.get("SVCARD_GOODS_KILL_SEED", "20261122"))
START = 1_000_000
SKUS = ("ticket", "coupon", "airtime", "rides10")
T = TypeVar("T")


def retried(work: Callable[[], T], deadline: float) -> T:
    """``work`` again after a server's failure (down, restarting), until ``deadline``."""
    while True:
        try:
            return work()
        except (DeviceError, httpx.HTTPError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)   # a killed server is being started again


@pytest.fixture
def system(tmp_path: Path) -> Iterator[Processes]:
    run("goods", "init", str(tmp_path / "sys"))
    config = tmp_path / "sys" / "goods.toml"
    config.write_text(config.read_text().replace("pickup_seconds = 604800",
                                                 "pickup_seconds = 604800\nissue_lease = 1"))
    procs = Processes(tmp_path / "sys")
    try:
        for role in ROLES:
            procs.start(role)
        yield procs
    finally:
        procs.stop()


def engine(system: Processes, role: str) -> Any:
    return D.make_engine(str(system.doc["parties"][role]["db"]), role)


def test_goods_survive_random_kills(system: Processes, tmp_path: Path) -> None:
    print(f"goods kill run: SVCARD_GOODS_KILL_RUNS={RUNS} SVCARD_GOODS_KILLS={KILLS} "
          f"SVCARD_GOODS_KILL_SEED={SEED}")
    rng = random.Random(SEED)
    auth = system.doc["parties"]["auth"]
    bank = engine(system, "bank")
    cards: dict[str, Path] = {}
    for n in range(RUNS // 32 + 1):
        serial = 95_000 + n
        cards[f"{serial:020d}"] = make_card(tmp_path / "cards", serial)
        add_account(bank, f"k{serial}", f"{serial:020d}", "123456", START, 156,
                    int(time.time() * 1000))
    device = Device(auth["url"], auth["id"], bytes.fromhex(auth["public_key"]), W.new_key())
    device.register()
    moments = sorted(rng.uniform(0, RUNS) for _ in range(KILLS))
    killed: list[str] = []
    done = threading.Event()
    progress = [0.0]

    def killer() -> None:
        for moment in moments:
            while progress[0] < moment and not done.is_set():
                time.sleep(0.02)   # polling the driver's progress
            role = rng.choice(("auth", "payment", "fulfil"))
            system.kill(role)
            killed.append(role)
            system.start(role)

    thread = threading.Thread(target=killer)
    thread.start()
    merchant = system.url("merchant")
    try:
        with httpx.Client(timeout=30) as http:
            for n in range(RUNS):
                serial = f"{95_000 + n // 32:020d}"
                deadline = time.monotonic() + 120

                def place(sku: str = SKUS[n % len(SKUS)]) -> str:
                    answer = http.post(f"{merchant}/v1/orders",
                                       json={"sku": sku, "device": device.id})
                    assert answer.status_code == 200, answer.text
                    return str(answer.json()["order"])

                order = retried(place, deadline)

                def first_of(order: str = order) -> Any:
                    firsts = [f for f in device.poll(wait=2) if f.order == order]
                    assert firsts, "not offered yet"
                    return firsts[0]

                first = retried(first_of, deadline)

                def authorise(card: Path = cards[serial], first: Any = first) -> Any:
                    with open_reader(f"virtual:{card}") as reader:
                        return device.authorise(reader, first, "123456")

                out = retried(authorise, deadline)
                assert out.paid, out
                progress[0] = n + 1
    finally:
        done.set()
        thread.join()
    print(f"  killed: {killed}")
    deadline = time.monotonic() + 120

    def all_written() -> None:
        for card in cards.values():
            with open_reader(f"virtual:{card}") as reader:
                device.pickup(reader)
        with engine(system, "fulfil").connect() as conn:
            states = [r.state for r in conn.execute(select(D.goods))]
        assert states and set(states) == {"written"}, states

    retried(all_written, deadline)
    with engine(system, "bank").connect() as conn:
        paid = [dict(r._mapping) for r in conn.execute(select(D.bank_payments))]
        accounts = list(conn.execute(select(D.accounts)))
    assert len(paid) == RUNS and all(p["state"] == "paid" for p in paid)
    held: list[bytes] = []
    for card in cards.values():
        with open_reader(f"virtual:{card}") as reader:
            held += [e.record[10:18] for e in read_goods(reader)]
    assert sorted(held) == sorted(bytes.fromhex(p["order_ref"])[:8] for p in paid)
    assert sum(START - a.balance for a in accounts) == sum(p["amount"] for p in paid)
