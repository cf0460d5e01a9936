"""The SP's database steps join the SQLite writer thread's group commit (kit/db.py ``step`` and
``reading``): on the writer thread an order's admission, a replay refused by a unique key, its
payment record and its bill line all run in the group's one transaction (nothing of theirs is
visible before the group commits, and no step opens a transaction of its own); a step that
raises rolls back only its own changes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, select
from test_sp_books import NOW, SONG, Paid, request

from svcard.host.kit import db as kitdb
from svcard.host.sp import db as D
from svcard.host.sp.billing import bill_order, settle_bill
from svcard.host.sp.customers import add_customer, set_credit_limit
from svcard.host.sp.purses.db import PurseBook
from svcard.host.sp.server import orders as O
from svcard.host.sp.server.payment import record_paid
from svcard.host.sp.signing import new_key


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = D.make_engine(f"sqlite:///{tmp_path / 'sp.db'}")
    add_customer(e, "alice", new_key()[1], 10_000, 156)
    yield e
    e.dispose()


@pytest.fixture
def group() -> Iterator[kitdb.StepGroup]:
    """This thread acts as the SQLite writer thread (kit/http.py GroupWriter) for the test."""
    g = kitdb.StepGroup()
    kitdb.writer_state.group = g
    try:
        yield g
    finally:
        g.end(commit=False)
        del kitdb.writer_state.group


def committed_orders(engine: Engine) -> list[str]:
    """What another connection (another process) sees: committed rows only."""
    other = create_engine(engine.url)
    try:
        with other.connect() as conn:
            return [str(r) for r in conn.execute(select(D.orders.c.state)).scalars()]
    finally:
        other.dispose()


def test_an_order_from_admission_to_bill_is_one_group(engine: Engine,
                                                      group: kitdb.StepGroup) -> None:
    admission = O.admit(engine, request("alice", "aa" * 16), SONG, "d", 156, NOW)
    assert admission.state == D.PAYING
    replay = O.admit(engine, request("alice", "aa" * 16), SONG, "d", 156, NOW)
    assert (replay.state, replay.order_ref) == ("replay", admission.order_ref)
    assert O.customer_key(engine, "alice") is not None
    assert record_paid(engine, admission.order_ref, Paid(99, "t1"))  # type: ignore[arg-type]
    line = bill_order(engine, admission.order_ref, 10**6, 14, NOW)
    assert line is not None and line["billed"] == 115
    set_credit_limit(engine, "alice", 20_000)
    assert not settle_bill(engine, 12345, NOW)
    # every step ran in the group's transaction: none began one of its own, none committed
    assert not group.foreign and list(group.conns) == [engine]
    assert committed_orders(engine) == []
    group.end()   # the group's one commit
    assert committed_orders(engine) == [D.BILLED]


def test_the_pool_books_steps_join_the_group_too(tmp_path: Path, engine: Engine,
                                                 group: kitdb.StepGroup) -> None:
    book = PurseBook(engine)
    group.end()   # (the book's tables, made as it opens)
    assert book.register("8100001", "virtual:x", currency_code=156, balance=500, limit=10**6,
                         offline_counter=0, online_counter=0)
    assert not book.register("8100001", "virtual:y", currency_code=156, balance=500,
                             limit=10**6, offline_counter=0, online_counter=0)
    book.start_payment("spo-1", "8100001", 156)
    assert book.payment_step(order="spo-1", expect=("started",), state="drawing", txn_id="t")
    assert book.payment("spo-1") is not None and book.purse("8100001") is not None
    assert not group.foreign and list(group.conns) == [engine]
    group.end(commit=False)   # a failed group: nothing of its steps stays
    assert book.payment("spo-1") is None and book.purse("8100001") is None
