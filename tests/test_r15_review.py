"""Review of issue 15's trading-session servers (helper R-15): each test is a break found in
host/trade/ (it failed before its fix) or a check of a property that was found sound."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from svcard.host.kit.db import first_row
from svcard.host.trade import db as D
from svcard.host.trade import signing as S
from svcard.host.trade.server import acquirer as A
from svcard.host.trade.stack import TradeStack, add_operator, start_trade

STUCK_MS = getattr(A, "INFORMING_TIMEOUT_MS", 300_000)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[TradeStack]:
    s = start_trade(tmp_path / "trade", close_seconds=3600)
    yield s
    s.close()


def reserved(stack: TradeStack, customer: str) -> int:
    row = first_row(stack.account.engine, D.am_customers, id=customer)
    assert row is not None
    return int(row["reserved"])


def postings_by_account(engine: Any, session: str) -> dict[tuple[str, str], int]:
    p = D.acq_postings.c
    out: dict[tuple[str, str], int] = defaultdict(int)
    with engine.connect() as conn:
        for r in conn.execute(select(D.acq_postings).where(p.session == session)).all():
            out[(r.account, r.currency)] += r.minor
    return dict(out)


# --- break 1: a known acquirer of ANOTHER operator cleared a session it never held ----------

def test_a_foreign_acquirer_cannot_clear_another_operators_session(stack: TradeStack,
                                                                   tmp_path: Path) -> None:
    """The account manager took signed clearing information from any acquirer it knows and
    charged the customer from it: acq2 (operator op2) could end and bill a session that op1's
    acquirer holds. Only the session's own mediating agent may clear it."""
    (tmp_path / "op2").mkdir()
    add_operator(stack, tmp_path / "op2", "op2", {"stall": "EUR"}, close_seconds=3600)
    alice = stack.customer("alice", 10_00)
    with httpx.Client(timeout=30) as http:
        s = stack.open(http, alice, 5_00)                  # at shop, operator op1
        row = first_row(stack.account.engine, D.am_sessions, session=s.session)
        assert row is not None and row["state"] == D.OPEN
        info = {"acquirer": "acq2", "session": s.session, "account_manager": "am1",
                "merchant": "shop", "pseudonym": s.pseudonym, "ended": "terminated",
                "outcome": "agreed", "reasons": "", "index": 0, "paid": 0,
                "deposit_merchant": s.deposit_merchant, "currency_merchant": "JPY",
                "deposit_customer": 5_00, "currency_customer": "EUR", "returned": 0,
                "withdrawal": 5_00, "rounding": 0, "rate": s.rate, "merchant_list": "",
                "customer_list": "", "created": int(time.time())}
        body, headers = S.signed(stack.parties["acq2"].key, "acq2", S.CLEARING, info)
        answer = http.post(f"{stack.am.url}/v1/clearings", content=body, headers=headers)
    assert answer.status_code == 403, answer.text
    after = first_row(stack.account.engine, D.am_sessions, session=s.session)
    assert after is not None and after["state"] == D.OPEN
    assert first_row(stack.account.engine, D.am_withdrawals, session=s.session) is None
    assert reserved(stack, "alice") == 5_00
