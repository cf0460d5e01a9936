"""Randomised sessions through the real servers, to the end: customers in EUR and USD;
merchants in JPY, KWD and EUR at operator op1 and in USD and JPY at operator op2 (each
operator with its own mediating agent and merchant account manager); random deposits, units
and purchases. Each session ends one of the four ways (the customer's terminate, the deposit
spent, the merchant's end, the mediating agent's timeout) and some get a lying record from
one side. Then every session is cleared once: honest ones ``agreed`` (``one-sided`` for a
timeout the customer never closed), lying ones ``disputed``, each paid exactly what the
merchant's evidence proves, and all the books close in every currency.

Count: SVCARD_TRADE_CLOSE_SESSIONS (default 12; the long run in the report used 300); seed:
SVCARD_TRADE_CLOSE_SEED (printed)."""

from __future__ import annotations

import os
import random
import secrets
from collections import Counter
from pathlib import Path

import httpx
from test_trade_close import Clock, books_clean, faulty, merchant_record, push, tick

from svcard.host.kit.db import first_row
from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade.stack import add_operator, start_trade

WAYS = ("terminated", "spent", "merchant", "timeout")


def test_random_sessions_clear_once_and_the_books_close(tmp_path: Path) -> None:
    n = int(os.environ.get("SVCARD_TRADE_CLOSE_SESSIONS", "12"))
    seed = int(os.environ.get("SVCARD_TRADE_CLOSE_SEED", str(secrets.randbits(32))))
    print(f"seed {seed} (replay: SVCARD_TRADE_CLOSE_SEED={seed})")
    rng = random.Random(seed)
    clock = Clock()
    stack = start_trade(tmp_path / "trade", merchants={"shop": "JPY", "kiosk": "KWD",
                                                       "cafe": "EUR"},
                        clock=clock, close_seconds=3600, grace_ms=60_000)
    add_operator(stack, tmp_path / "trade", "op2", {"deli": "USD", "bar": "JPY"}, clock=clock,
                 close_seconds=3600, grace_ms=60_000)
    try:
        customers = {cur: stack.customer(f"c{cur}", 10**9, cur) for cur in ("EUR", "USD")}
        expected: dict[str, tuple[str, int]] = {}
        outcomes: Counter[str] = Counter()
        with httpx.Client(timeout=30) as http:
            for _ in range(n):
                who = customers[rng.choice(["EUR", "USD"])]
                merchant = rng.choice(["shop", "kiosk", "cafe", "deli", "bar"])
                s = stack.open(http, who, rng.randint(50, 5_000), merchant,
                               unit=rng.choice([1, 2, 5]))
                s.account_url = stack.am.url
                way = rng.choice(WAYS)
                if way == "spent":
                    while s.spent < s.length:
                        C.buy(http, s, "x", min(s.length - s.spent, rng.randint(1, 50)))
                else:
                    for _ in range(rng.randint(2, 6)):
                        if s.length - s.spent < 1:
                            break
                        C.buy(http, s, f"i{rng.randint(0, 5)}",
                              rng.randint(1, max(1, min(3, s.length - s.spent))))
                fault = rng.random() < 0.3 and len(s.orders) >= 2 and way != "timeout"
                if fault and way != "spent" and rng.random() < 0.5:   # spent: already sent
                    lying = merchant_record(stack, s, entries=faulty(
                        list(s.orders), rng.choice(["dropped", "duplicated", "altered",
                                                    "reordered"])))
                    assert push(stack, http, *lying).status_code == 200
                elif fault:
                    s.orders = faulty(s.orders, rng.choice(["dropped", "duplicated",
                                                            "altered", "reordered"]))
                if way == "merchant":
                    import asyncio
                    asyncio.run(stack.merchants[merchant].closer.end(s.session))
                if way != "timeout":
                    got = C.close(http, s)
                    outcomes[got["clearing"]["outcome"]] += 1
                    want = "disputed" if fault else "agreed"
                    assert got["clearing"]["outcome"] == want, (seed, way, got)
                proven = s.spent * s.unit if way != "timeout" else \
                    first_row(stack.merchants[merchant].engine, D.ma_sessions,
                              session=s.session)["held_index"] * s.unit
                expected[s.session] = (merchant, proven)
        clock.offset = 3600 + 1
        tick(stack)
        clock.offset += 61
        tick(stack)
        tick(stack)             # deliveries left over
        paid = Counter()
        for session, (merchant, proven) in expected.items():
            row = first_row(stack.acquirer_of(merchant).engine, D.acq_clearings,
                            session=session)
            assert row is not None and row["am_done"] and row["mam_done"], session
            op = stack.operator_of.get(merchant, stack.operator)
            mam = stack.merchant_account if op == stack.operator else stack.others[op][1]
            deposit = first_row(mam.engine, D.mam_deposits, session=session)
            assert deposit is not None and deposit["amount"] == proven, (seed, session)
            paid[deposit["currency"]] += proven
        b = books_clean(stack)
        assert b.deposits == {k: v for k, v in paid.items()}
        print(f"{n} sessions: {dict(outcomes)} by the customer's close; withdrawals "
              f"{b.withdrawals}, paid {b.deposits}")
    finally:
        stack.close()
