"""Trading sessions end to end (seed 004 FIG. 2, claims 1-10): the initiation through the
account manager, the mediating trusted agent and the merchant agent with real servers, every
message signed; the exchange rate returned; the credit limit held over concurrent sessions;
the refusals that give the reservation back and the failures that keep it; purchases inside
the deposit with the customer agent and the merchant agent only."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from svcard.host.kit.db import first_row
from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade import signing as S
from svcard.host.trade.money import Amount
from svcard.host.trade.stack import TradeStack, demo_table, start_trade


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[TradeStack]:
    s = start_trade(tmp_path / "trade", merchants={"shop": "JPY", "kiosk": "KWD"})
    yield s
    s.close()


def rows(engine: Any, table: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(table)).all()]


def test_initiation_as_the_claims_say(stack: TradeStack) -> None:
    alice = stack.customer("alice", 50_00)
    with httpx.Client(timeout=30) as http:
        s = stack.open(http, alice, 10_00)
    # claim 8: the rate came back through the account manager, signed by the acquirer
    opened = s.opened
    assert opened["rate"] == "316469/2000" and Fraction(opened["rate"]) == Fraction("158.2345")
    assert (s.deposit, s.currency, s.deposit_merchant, s.currency_merchant) == \
        (10_00, "EUR", 1582, "JPY")
    acq = stack.parties["acq1"]
    assert S.verify(acq.public, S.AGENT_ACK, opened["acquirer_ack"].encode(),
                    opened["acquirer_signature"])
    ack = json.loads(opened["acquirer_ack"])
    assert ack["accepted"] and ack["session"] == s.session == "am1.1"
    # each party's books
    am = first_row(stack.account.engine, D.am_sessions, session=s.session)
    assert am is not None and am["state"] == D.OPEN and am["pseudonym"] == s.pseudonym
    assert first_row(stack.account.engine, D.am_customers, id="alice")["reserved"] == 10_00
    aq = first_row(stack.acquirer.engine, D.acq_sessions, session=s.session)
    assert aq is not None and aq["state"] == D.OPEN and aq["merchant_ack"]
    # the amended message carried a pseudonym, never the customer's identity
    assert "alice" not in json.dumps(aq) and aq["pseudonym"] == s.pseudonym
    ma = first_row(stack.merchants["shop"].engine, D.ma_sessions, session=s.session)
    assert ma is not None and ma["state"] == D.OPEN and ma["deposit"] == 1582
    assert "alice" not in json.dumps(ma)
    # the acquirer's books close in each currency; the rounding leftover is booked
    totals: dict[str, int] = defaultdict(int)
    for p in rows(stack.acquirer.engine, D.acq_postings):
        totals[p["currency"]] += p["minor"]
    assert set(totals) == {"EUR", "JPY"} and not any(totals.values())


def test_purchases_inside_the_deposit_then_spent(stack: TradeStack) -> None:
    bob = stack.customer("bob", 50_00)
    with httpx.Client(timeout=30) as http:
        s = stack.open(http, bob, 1_00, unit=10)          # 158 JPY -> 15 links of 10 JPY
        assert (s.length, s.unit) == (15, 10)
        got = [C.buy(http, s, f"song{i}", 1)["amount"] for i in range(5)]
        assert got == [10] * 5
        last = C.buy(http, s, "album", 10)
        assert last["state"] == D.SPENT and last["left"] == 0   # claim 1: deposit reached
        with pytest.raises(C.TradeError, match="left"):
            C.buy(http, s, "more", 1)
        status = http.get(f"{s.merchant_url}/v1/sessions/{s.session}",
                     params={"pseudonym": s.pseudonym}).json()
        assert (status["state"], status["taken"]) == (D.SPENT, 150)
    purchases = rows(stack.merchants["shop"].engine, D.ma_purchases)
    assert [p["link_index"] for p in purchases] == [1, 2, 3, 4, 5, 15]
    for p in purchases:   # the evidence: each signed order verifies with the session's key
        assert S.verify(S.public_of(s.session_key), S.ORDER, p["order_body"].encode(),
                        p["order_signature"])


def test_terminate_by_the_customer(stack: TradeStack) -> None:
    carol = stack.customer("carol")
    with httpx.Client(timeout=30) as http:
        s = stack.open(http, carol, 5_000, merchant="kiosk")   # 50 EUR -> 16.560 KWD
        assert (s.deposit_merchant, s.currency_merchant) == (16_560, "KWD")
        C.buy(http, s, "tea", 7)
        assert C.terminate(http, s) == {"session": s.session, "state": D.TERMINATED,
                                        "index": 7, "taken": 7 * s.unit}
        with pytest.raises(C.TradeError, match="terminated"):
            C.buy(http, s, "tea", 1)


def test_credit_limit_over_concurrent_sessions(stack: TradeStack) -> None:
    """50 initiations at once, room for 20: exactly 20 open, never more reserved."""
    dave = stack.customer("dave", 20 * 1_00)
    answers: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(50)

    def one() -> None:
        _, public = S.new_key()
        body, headers = C.initiation("dave", dave.key, public, "shop", "op1",
                                     Amount(1_00, "EUR"), "x", 0)
        with httpx.Client(timeout=60) as http:
            barrier.wait()
            status = http.post(f"{stack.am.url}/v1/sessions", content=body,
                               headers=headers).status_code
        with lock:
            answers.append(status)

    threads = [threading.Thread(target=one) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(answers) == [200] * 20 + [402] * 30
    row = first_row(stack.account.engine, D.am_customers, id="dave")
    assert row is not None and row["reserved"] == 20 * 1_00
    opened = [r for r in rows(stack.account.engine, D.am_sessions) if r["state"] == D.OPEN]
    assert len(opened) == 20


def test_refusals_give_the_reservation_back(stack: TradeStack, tmp_path: Path) -> None:
    erin = stack.customer("erin", 10_00)
    with httpx.Client(timeout=30) as http:
        with pytest.raises(C.TradeError, match=r"422.*not a merchant of this operator"):
            C.open_session(
                http, stack.am.url, "am1", stack.am.public, "erin", erin.key, "nobody",
                stack.url("shop"), "op1", Amount(5_00, "EUR"))
        with pytest.raises(C.TradeError, match=r"404.*not an operator"):
            C.open_session(http, stack.am.url, "am1", stack.am.public, "erin", erin.key,
                           "shop", stack.url("shop"), "op9", Amount(5_00, "EUR"))
        with pytest.raises(C.TradeError, match=r"402.*kept in EUR"):
            C.open_session(http, stack.am.url, "am1", stack.am.public, "erin", erin.key,
                           "shop", stack.url("shop"), "op1", Amount(5_00, "USD"))
    states = [r["state"] for r in rows(stack.account.engine, D.am_sessions)]
    assert states == [D.REFUSED]
    assert first_row(stack.account.engine, D.am_customers, id="erin")["reserved"] == 0


def test_expired_exchange_table_refused(tmp_path: Path) -> None:
    stack = start_trade(tmp_path / "t", table=demo_table(100_000, 1))   # valid only in 1970
    try:
        frank = stack.customer("frank")
        with httpx.Client(timeout=30) as http, \
                pytest.raises(C.TradeError, match="fetch a new one"):
            stack.open(http, frank, 1_00)
        assert first_row(stack.account.engine, D.am_customers, id="frank")["reserved"] == 0
        assert rows(stack.acquirer.engine, D.acq_postings) == []
    finally:
        stack.close()


def test_acquirer_unreachable_keeps_the_reservation(stack: TradeStack) -> None:
    gina = stack.customer("gina")
    stack.parties["acq1"].thread.stop()
    with httpx.Client(timeout=30) as http, pytest.raises(C.TradeError, match="502"):
        stack.open(http, gina, 3_00)
    row = first_row(stack.account.engine, D.am_sessions, customer="gina")
    assert row is not None and row["state"] == D.IN_DOUBT
    assert first_row(stack.account.engine, D.am_customers, id="gina")["reserved"] == 3_00


def test_session_file_round_trip_hides_secrets(stack: TradeStack, tmp_path: Path) -> None:
    hal = stack.customer("hal")
    with httpx.Client(timeout=30) as http:
        s = stack.open(http, hal, 2_00)
        C.buy(http, s, "a", 2)
        path = tmp_path / "s.json"
        C.save(path, s)
        assert path.stat().st_mode & 0o777 == 0o600
        back = C.load(path)
        assert back.spent == 2 and back.seed == s.seed
        assert s.seed.hex() not in repr(back) and s.session_key.hex() not in repr(back)
        assert C.buy(http, back, "b", 1)["index"] == 3


def test_servers_restarted_mid_session(stack: TradeStack) -> None:
    """Every party's state is in its database: after each server is stopped and started again
    the session goes on where it was, and a replayed purchase is still a replay."""
    ivy = stack.customer("ivy")
    with httpx.Client(timeout=30) as http:
        s = stack.open(http, ivy, 2_00)
        message = C.purchase(s, "song", 2)
        url = f"{s.merchant_url}/v1/sessions/{s.session}/purchases"
        assert http.post(url, json=message).status_code == 200
        for party in ("shop", "acq1", "am1"):
            stack.restart(party)
        assert http.post(url, json=message).status_code == 409
        assert C.buy(http, s, "song", 1)["index"] == 3
        again = stack.open(http, ivy, 1_00)           # the account manager goes on counting
        assert again.session == "am1.2"
    assert first_row(stack.account.engine, D.am_customers, id="ivy")["reserved"] == 3_00
