"""Issue 16 point 3: the PostgreSQL steps of a purchase cost one round trip per statement where a
step is atomic alone (autocommit: no BEGIN, no COMMIT of its own).

Round trips are counted on the client side from SQLAlchemy's events: every statement is one; a
statement met by a psycopg connection outside autocommit with no transaction open costs one
more (psycopg sends BEGIN first, on its own); a commit or rollback of an open transaction costs
one. Connections are made during a warm-up purchase (their setup queries are not counted)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pg_env import Cluster, start_cluster
from sqlalchemy import Engine, event

from svcard.card.storage import read_image
from svcard.host.demo.system import card_image
from svcard.host.pay import client as C
from svcard.host.pay.stack import start_stack
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    yield c
    c.stop()


class RoundTrips:
    """Counts the round trips ``engine``'s connections make (see the module's text)."""

    def __init__(self, engine: Engine) -> None:
        self.count, self.begins, self.ends, self.lock = 0, 0, 0, threading.Lock()
        event.listen(engine, "before_cursor_execute", self._statement)
        event.listen(engine, "commit", self._end)
        event.listen(engine, "rollback", self._end)

    @staticmethod
    def _idle(conn: Any) -> tuple[Any, bool]:
        raw = conn.connection.dbapi_connection
        return raw, raw.info.transaction_status == 0   # psycopg's TransactionStatus.IDLE

    def _statement(self, conn: Any, *_args: Any) -> None:
        raw, idle = self._idle(conn)
        begin = int(idle and not raw.autocommit)
        with self.lock:
            self.count += 1 + begin
            self.begins += begin

    def _end(self, conn: Any) -> None:
        if conn.connection.dbapi_connection is None:
            return
        _raw, idle = self._idle(conn)
        with self.lock:
            self.count += int(not idle)
            self.ends += int(not idle)


# What a purchase may cost: 5 statements, each its own round trip (the draw's look-up and insert,
# the PSAM's answer, the debit's read and compare-and-set). Before, every step was a transaction
# (BEGIN, statements, COMMIT) and every read BEGIN, SELECT, ROLLBACK: 15 for fig5, 11 for the rest.
BOUND = dict.fromkeys(("fig5", "fig6", "fig7", "fig8"), 5)


@pytest.mark.parametrize("variant", sorted(BOUND))
def test_purchase_round_trips_on_postgresql(cluster: Cluster, tmp_path: Path,
                                            variant: str) -> None:
    stack = start_stack(tmp_path / "stack", psams=1, db_url=cluster.new_database())
    purchases = 3
    try:
        card = card_image(tmp_path, ep=5_000)
        journal = Journal(tmp_path / "j.jsonl")
        with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
            C.pay(stack.checkout_url("song", variant), reader, journal=journal, http=http)
            trips = RoundTrips(stack.payment_server.db.engine)
            for _ in range(purchases):
                outcome = C.pay(stack.checkout_url("song", variant), reader, journal=journal,
                                http=http)
                assert outcome.goods.endswith("song-7f3a")
            counted = (trips.count, trips.begins, trips.ends)
        assert read_image(card)["app"]["ep"]["balance"] == 5_000 - (purchases + 1) * 99
        assert stack.payment_server.db.counts() == {"confirmed": purchases + 1}
    finally:
        stack.close()
    per, begins, ends = (n / purchases for n in counted)
    print(f"{variant}: {per:.2f} round trips per purchase "
          f"({begins:.2f} BEGIN, {ends:.2f} COMMIT/ROLLBACK)")
    assert per <= BOUND[variant], f"{variant}: {per:.2f} round trips per purchase"


# A load's steps on the load server's database: the request's get-or-insert, the HSM's answer
# and the card's proof, each a one-write step (read, then write last): 5 statements, one round
# trip each (before: 13, BEGIN and COMMIT or ROLLBACK around each of 4 steps)
LOAD_BOUND = 5


def test_load_round_trips_on_postgresql(cluster: Cluster, tmp_path: Path) -> None:
    from svcard.host.load import client as LC
    from svcard.host.load.stack import start_load_stack

    stack = start_load_stack(tmp_path / "load", bank_db=cluster.new_database(),
                             load_db=cluster.new_database())
    loads = 3
    try:
        stack.account("alice", 10_000, "pw")
        card = card_image(tmp_path, ep=0)
        journal = Journal(tmp_path / "j.jsonl")
        with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
            def one() -> None:
                out = LC.load(stack.bank_url, reader, account="alice", secret="pw",
                              amount=100, journal=journal, http=http)
                assert out.outcome == "loaded"

            one()
            trips = RoundTrips(stack.load_server.db.engine)
            for _ in range(loads):
                one()
            counted = (trips.count, trips.begins, trips.ends)
        assert read_image(card)["app"]["ep"]["balance"] == (loads + 1) * 100
    finally:
        stack.close()
    per, begins, ends = (n / loads for n in counted)
    print(f"load: {per:.2f} round trips ({begins:.2f} BEGIN, {ends:.2f} COMMIT/ROLLBACK)")
    assert per <= LOAD_BOUND, f"a load: {per:.2f} round trips"
