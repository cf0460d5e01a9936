"""The design point of issue 15 (docs/trade.md, "When only the customer's record comes"): the
merchant's record never arrives, the session clears after its expiry plus the bound
(``abandon_ms``) with the customer's record alone, and the merchant is paid what the
customer's OWN signed record admits, when that admission verifies (the committed chain's
link at the record's index, the customer's signed order for it).
An admission that does not verify proves nothing (0, disputed)."""

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
from svcard.host.trade import closing as K
from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade import records
from svcard.host.trade import signing as S
from svcard.host.trade.stack import TradeStack, start_trade


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
    s = start_trade(tmp_path / "trade", clock=clock, close_seconds=3600, grace_ms=1_000)
    yield s
    s.close()


def merchant_down_session(stack: TradeStack, http: httpx.Client, buys: int = 3
                          ) -> C.Session:
    alice = stack.customer("alice", 10_00)
    s = stack.open(http, alice, 5_00, unit=10)
    for _ in range(buys):
        C.buy(http, s, "tea", 2)
    stack.parties["shop"].thread.stop()          # the merchant goes down for good
    return s


def send_record(stack: TradeStack, http: httpx.Client, body: bytes,
                headers: dict[str, str], session: str) -> None:
    answer = http.post(f"{stack.am.url}/v1/sessions/{session}/record", content=body,
                       headers=headers)
    assert answer.status_code == 200, answer.text


def clear_after_expiry(stack: TradeStack, clock: Clock, s: C.Session) -> dict[str, Any]:
    # the merchant down for good: cleared without it only after the bound (abandon_ms)
    clock.offset += (s.expires / 1000 - time.time()) + 5.0 + \
        stack.acquirer.config.abandon_ms / 1000
    asyncio.run(stack.acquirer.closer.tick())
    done = first_row(stack.acquirer.engine, D.acq_clearings, session=s.session)
    assert done is not None, "not cleared after the expiry"
    info: dict[str, Any] = json.loads(done["info"])
    return info


def test_the_customers_verified_admission_pays_the_merchant(stack: TradeStack,
                                                            clock: Clock) -> None:
    with httpx.Client(timeout=30) as http:
        s = merchant_down_session(stack, http)
        body, headers = C.record(s)
        send_record(stack, http, body, headers, s.session)
    rec = json.loads(body)
    assert rec["index"] == 6 and rec["evidence"]["index"] == 6
    c = clear_after_expiry(stack, clock, s)
    assert (c["outcome"], c["paid"], c["index"]) == ("one-sided", 60, 6), c
    assert c["withdrawal"] > 0 and c["returned"] < s.deposit
    book = records.books([stack.acquirer.engine], [stack.account.engine],
                         [stack.merchant_account.engine])
    assert book.clean, book.problems


def test_a_session_with_no_purchase_pays_nothing(stack: TradeStack, clock: Clock) -> None:
    with httpx.Client(timeout=30) as http:
        s = merchant_down_session(stack, http, buys=0)
        body, headers = C.record(s)
        send_record(stack, http, body, headers, s.session)
    assert json.loads(body)["evidence"] is None
    c = clear_after_expiry(stack, clock, s)
    assert (c["outcome"], c["paid"]) == ("one-sided", 0)
    assert c["withdrawal"] <= 1      # at most the conversion's rounding, never a purchase


def _resigned(s: C.Session, change: Any) -> tuple[bytes, dict[str, str]]:
    """The customer's record with ``change`` applied, signed again by the session key (the
    customer lies in its own record: a valid signature, evidence that does not hold)."""
    body, _ = C.record(s)
    rec = json.loads(body)
    change(rec)
    return S.signed(s.session_key, s.pseudonym, S.RECORD, rec)


@pytest.mark.parametrize("lie", ["forged link", "claims more than its link",
                                 "order of another link", "another chain"])
def test_an_admission_that_does_not_verify_proves_nothing(stack: TradeStack, clock: Clock,
                                                          lie: str) -> None:
    with httpx.Client(timeout=30) as http:
        s = merchant_down_session(stack, http)

        def change(rec: dict[str, Any]) -> None:
            ev = rec["evidence"]
            if lie == "forged link":
                ev["link"] = "ab" * 32
            elif lie == "claims more than its link":
                rec["index"], rec["total"] = 9, 90
            elif lie == "order of another link":
                ev["index"] = 4
                ev["link"] = C.link_at(s.seed, s.length, 4).hex()
            else:
                other = C.Wallet.new(s.length)
                ev["link"] = C.link_at(other.seed, s.length, 6).hex()
        body, headers = _resigned(s, change)
        send_record(stack, http, body, headers, s.session)
    c = clear_after_expiry(stack, clock, s)
    assert (c["outcome"], c["paid"]) == ("disputed", 0), c
    assert "customer" in c["reasons"]


def test_with_both_records_the_merchants_evidence_still_decides(stack: TradeStack) -> None:
    """The customer's evidence changes nothing when the merchant's record is there: an honest
    session still agrees, at the merchant's proven link."""
    alice = stack.customer("bob", 10_00)
    with httpx.Client(timeout=30) as http:
        s = stack.open(http, alice, 5_00, unit=10)
        C.buy(http, s, "tea", 3)
        got = C.close(http, s)
    assert got["clearing"]["outcome"] == "agreed" and got["clearing"]["paid"] == 30


def test_compare_uses_the_admission_only_without_the_merchants_record() -> None:
    decision = K.compare({"session": "am1.1", "merchant": "shop", "currency_merchant": "JPY",
                          "deposit_merchant": 100, "session_key": "00" * 32},
                         None, {"index": 0, "count": 0, "total": 0, "currency": "JPY",
                                "list_hash": "00" * 32, "evidence": None})
    assert (decision.amount, decision.outcome) == (0, "one-sided")
