"""Issue 15: a merchant agent that is down at its sessions' expiry for longer than the grace
is still paid the links it holds. The mediating agent's clock keeps asking it for its record
(backing off) and clears without it only ``abandon_ms`` after the expiry (7 days by default),
keeping the customer's deposit reserved meanwhile; a merchant that comes back gives its record,
its own session ends, and the clearing pays its proven link."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from svcard.host.kit.db import first_row
from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade import records
from svcard.host.trade.server import closer as Z
from svcard.host.trade.stack import TradeStack, start_trade

GRACE_MS = 1_000


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def stack(tmp_path: Path, clock: Clock) -> Iterator[TradeStack]:
    s = start_trade(tmp_path / "trade", clock=clock, close_seconds=3600, grace_ms=GRACE_MS)
    yield s
    s.close()


def session_then_merchant_down(stack: TradeStack, http: httpx.Client, buys: int = 3
                               ) -> C.Session:
    alice = stack.customer("alice", 10_00)
    s = stack.open(http, alice, 5_00, unit=10)
    for _ in range(buys):
        C.buy(http, s, "tea", 2)                 # 2 links each
    stack.parties["shop"].thread.stop()
    return s


def to(clock: Clock, at_ms: float) -> None:
    clock.offset = at_ms / 1000 - time.time()


def tick(stack: TradeStack) -> dict[str, int]:
    return asyncio.run(stack.acquirer.closer.tick())


def clearing(stack: TradeStack, session: str) -> dict[str, Any] | None:
    row = first_row(stack.acquirer.engine, D.acq_clearings, session=session)
    return None if row is None else dict(json.loads(row["info"]))


def state(stack: TradeStack, table: Any, session: str, engine: Any) -> str:
    row = first_row(engine, table, session=session)
    assert row is not None
    return str(row["state"])


def books_clean(stack: TradeStack) -> None:
    book = records.books([stack.acquirer.engine], [stack.account.engine],
                         [stack.merchant_account.engine])
    assert book.clean, book.problems


def test_a_merchant_down_past_the_grace_at_expiry_is_paid_its_link_when_back(
        stack: TradeStack, clock: Clock) -> None:
    with httpx.Client(timeout=30) as http:
        s = session_then_merchant_down(stack, http)
    to(clock, s.expires + GRACE_MS + 5_000)         # long past the grace: the merchant down
    tick(stack)
    assert clearing(stack, s.session) is None, "cleared without the merchant's record"
    assert state(stack, D.acq_sessions, s.session, stack.acquirer.engine) == D.OPEN
    # the customer's deposit stays reserved at its account manager meanwhile
    assert state(stack, D.am_sessions, s.session, stack.account.engine) == D.OPEN
    to(clock, s.expires + 3_600_000)                # an hour later, still down
    tick(stack)
    assert clearing(stack, s.session) is None
    stack.restart("shop")                            # back
    merchant_row = first_row(stack.merchants["shop"].engine, D.ma_sessions,
                             session=s.session)
    assert merchant_row is not None and merchant_row["state"] == D.OPEN
    to(clock, s.expires + 3_600_000 + Z.PULL_MAX_MS + 1_000)   # past the longest backoff
    assert tick(stack)["cleared"] == 1
    c = clearing(stack, s.session)
    assert c is not None
    assert (c["outcome"], c["paid"], c["index"], c["ended"]) == ("one-sided", 60, 6,
                                                                 "timeout"), c
    shop = stack.merchants["shop"]
    assert state(stack, D.ma_sessions, s.session, shop.engine) == D.TERMINATED
    assert first_row(shop.engine, D.ma_records, session=s.session) is not None
    assert s.session not in stack.acquirer.closer.waiting
    tick(stack)                                      # the receipts delivered
    books_clean(stack)


def test_the_clock_backs_off_asking_a_silent_merchant(stack: TradeStack,
                                                      clock: Clock) -> None:
    with httpx.Client(timeout=30) as http:
        s = session_then_merchant_down(stack, http)
    closer = stack.acquirer.closer
    asked: list[str] = []
    ask = closer._ask

    async def counting(row: dict[str, Any], reason: str) -> None:
        asked.append(row["session"])
        await ask(row, reason)

    closer._ask = counting  # type: ignore[method-assign]
    at = s.expires + GRACE_MS + 1_000
    waits = []
    for _ in range(10):
        to(clock, at)
        tick(stack)
        tick(stack)                                  # at once again: waits its turn
        waits.append(closer.waiting[s.session][1])
        at = closer.waiting[s.session][0]
    assert asked == [s.session] * 10, "asked more than once per backoff step"
    assert waits == [5_000, 10_000, 20_000, 40_000, 80_000, 160_000, 320_000,
                     600_000, 600_000, 600_000]
    assert clearing(stack, s.session) is None


def test_a_merchant_gone_for_good_is_cleared_after_the_bound(stack: TradeStack,
                                                            clock: Clock) -> None:
    with httpx.Client(timeout=30) as http:
        s = session_then_merchant_down(stack, http)
        body, headers = C.record(s)
        answer = http.post(f"{stack.am.url}/v1/sessions/{s.session}/record", content=body,
                           headers=headers)
        assert answer.status_code == 200, answer.text
    bound = stack.acquirer.config.abandon_ms
    assert bound == 7 * 86_400_000
    to(clock, s.expires + bound - 60_000)            # a minute short of the bound
    tick(stack)
    assert clearing(stack, s.session) is None
    to(clock, s.expires + bound)
    assert tick(stack)["cleared"] == 1
    c = clearing(stack, s.session)
    assert c is not None
    # the one-sided rule: the merchant is paid what the customer's own record admits
    assert (c["outcome"], c["paid"], c["index"]) == ("one-sided", 60, 6), c
    assert c["merchant_list"] == "" and c["customer_list"] != ""
    tick(stack)
    books_clean(stack)


def test_no_record_at_all_after_the_bound_returns_the_deposit(stack: TradeStack,
                                                              clock: Clock) -> None:
    with httpx.Client(timeout=30) as http:
        s = session_then_merchant_down(stack, http)
    to(clock, s.expires + stack.acquirer.config.abandon_ms + 1)
    assert tick(stack)["cleared"] == 1
    c = clearing(stack, s.session)
    assert c is not None and (c["outcome"], c["paid"]) == ("one-sided", 0), c
    tick(stack)
    books_clean(stack)
