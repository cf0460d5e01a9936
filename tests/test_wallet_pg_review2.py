"""Review2's database steps for real cards on PostgreSQL (a private test cluster): the late
match of a purchase its purse paid (one conditional UPDATE with the evidence as a correlated
EXISTS) and the list of paid purchases whose financial-system debit may be missing."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from pg_env import Cluster, start_cluster
from sqlalchemy import Engine, insert

from svcard.host.wallet.gateway import db as D
from svcard.host.wallet.gateway import purse as PU


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    cluster: Cluster = start_cluster()
    try:
        e = D.make_engine(cluster.new_database())
        PU.open_tables(e)
        yield e
        e.dispose()
    finally:
        cluster.stop()


def purchase(engine: Engine, card: str, paid_card: str | None, amount: int = 500
             ) -> dict[str, Any]:
    now = int(time.time() * 1000)
    pid = secrets.token_hex(16)
    p = {"mall": "MALL1", "order": secrets.token_hex(8), "customer": "c1",
         "products_digest": "0" * 64, "amount": amount, "currency": 156,
         "nonce": secrets.token_hex(16), "expires": now - 1_000}
    with engine.begin() as conn:
        conn.execute(insert(D.purchases).values(
            id=pid, member="m1", card=card, state=D.CHOSEN, reason="", created=now,
            updated=now, mall=p["mall"], mall_order=p["order"], customer=p["customer"],
            products_digest=p["products_digest"], amount=amount, currency=156,
            nonce=p["nonce"], expires=p["expires"]))
        if paid_card is not None:
            conn.execute(insert(PU.orders).values(
                txn_id=secrets.token_hex(16), purchase=pid, card=paid_card,
                merchant_id="00" * 8, amount=amount, currency=156, expires=now,
                state=PU.PAID, confirmation="", receipt="", created=now, updated=now))
    return {**p, "id": pid}


def test_the_late_match_needs_its_own_evidence(engine: Engine) -> None:
    now = int(time.time() * 1000)
    paid = purchase(engine, "1" * 16, "1" * 16)
    unpaid = purchase(engine, "2" * 16, None)
    other = purchase(engine, "3" * 16, "4" * 16)       # paid by another card
    assert PU.match_paid(engine, unpaid, now)[0] == "expired"
    assert PU.match_paid(engine, other, now)[0] == "expired"
    with ThreadPoolExecutor(8) as pool:
        outcomes = [how for how, _ in pool.map(lambda _: PU.match_paid(engine, paid, now),
                                               range(8))]
    assert sorted(outcomes) == ["approving"] * 7 + ["matched"], outcomes
    listed = PU.unmirrored(engine, now - 60_000)
    assert unpaid["id"] not in listed and paid["id"] not in listed   # approving now
    assert other["id"] in listed
