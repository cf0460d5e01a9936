"""Review of issue 15's trading-session servers (helper R-15): each test is a break found in
host/trade/ (it failed before its fix) or a check of a property that was found sound."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, select, update

from svcard.host.kit.db import first_row
from svcard.host.trade import closing as K
from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade import signing as S
from svcard.host.trade.money import Amount, conversion_postings, convert
from svcard.host.trade.payword import order_payload
from svcard.host.trade.server import acquirer as A
from svcard.host.trade.server.account import reserve
from svcard.host.trade.server.merchant_close import end_session
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


# --- break 2: an initiation interrupted at the acquirer stayed undecided for ever -----------

def _stuck_initiation(stack: TradeStack, age_ms: int) -> dict[str, Any]:
    """The acquirer stopped after recording an amended initiation (row ``informing``, the
    deposit's postings booked) and before any answer; the account manager's row likewise."""
    now = int(time.time() * 1000)
    created = now - age_ms
    data = {"customer": "dave", "txn": secrets.token_hex(16), "merchant": "shop",
            "operator": "op1", "deposit": 3_00, "currency": "EUR",
            "order": {"item": "x", "price": 0},
            "registration": {"session_key": "33" * 32, "agent": "t"}}
    got = reserve(stack.account.engine, "am1", data, "d" * 64, "pdave", now + 3_600_000, 10,
                  created)
    session = got["session"]
    rate = stack.acquirer.config.table.rate("EUR", "JPY", now)
    conv = convert(Amount(3_00, "EUR"), "JPY", rate)
    row = {"session": session, "account_manager": "am1", "txn": data["txn"], "digest": "e" * 64,
           "merchant": "shop", "pseudonym": "pdave", "session_key": "33" * 32,
           "deposit_customer": 3_00, "currency_customer": "EUR",
           "deposit_merchant": conv.target.minor, "currency_merchant": "JPY",
           "rate": A.rate_text(rate), "rounding": conv.rounding.minor, "table_issuer": "bank-m",
           "state": D.INFORMING, "reason": "", "expires": now + 3_600_000,
           "created": created, "updated": created}
    assert A.record(stack.acquirer.engine, row,
                    conversion_postings(conv, "am:am1", f"deposit:{session}"), created) == "new"
    return {"session": session, "txn": data["txn"]}


def test_an_initiation_interrupted_at_the_acquirer_is_settled(stack: TradeStack) -> None:
    """Killed between booking the deposit and answering, the acquirer answered every lookup
    'being initiated; ask again' for ever: the customer's credit stayed reserved and the
    deposit held in its books. A row undecided for longer than any initiation takes is now
    refused at the lookup, its postings reversed, and the account manager gives credit back."""
    stack.customer("dave", 10_00)
    stuck = _stuck_initiation(stack, age_ms=STUCK_MS + 60_000)
    assert reserved(stack, "dave") == 3_00
    assert asyncio.run(stack.account.recover()) == {"open": 0, "refused": 1, "in_doubt": 0}
    assert reserved(stack, "dave") == 0
    acq = first_row(stack.acquirer.engine, D.acq_sessions, session=stuck["session"])
    assert acq is not None and acq["state"] == D.REFUSED
    assert all(v == 0 for v in postings_by_account(stack.acquirer.engine,
                                                   stuck["session"]).values())


def test_a_young_undecided_initiation_is_left_alone(stack: TradeStack) -> None:
    """Not past the bound: the acquirer may still be waiting for the merchant; ask again."""
    stack.customer("dave", 10_00)
    stuck = _stuck_initiation(stack, age_ms=1_000)
    body, headers = S.signed(stack.am.key, "am1", S.LOOKUP, {
        "account_manager": "am1", "session": stuck["session"], "txn": stuck["txn"],
        "created": int(time.time())})
    answer = httpx.post(f"{stack.url('acq1')}/v1/initiations/lookup", content=body,
                        headers=headers)
    assert answer.status_code == 409
    acq = first_row(stack.acquirer.engine, D.acq_sessions, session=stuck["session"])
    assert acq is not None and acq["state"] == D.INFORMING


def test_an_initiation_refused_meanwhile_is_not_answered_accepted(
        stack: TradeStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The acquirer answered 'accepted' even when its own step that marks the session open
    found it decided otherwise meanwhile (refused by a lookup while the merchant was slow):
    the account manager opened a session whose deposit the acquirer had already given back.
    The answer is now what the acquirer's books say."""
    real = A.conclude

    def raced(engine: Any, session: str, state: str, *args: Any) -> bool:
        if state == D.OPEN:     # a lookup settled it first (as for an initiation too slow)
            acq = first_row(engine, D.acq_sessions, session=session)
            assert acq is not None
            real(engine, session, D.REFUSED, "settled by a lookup meanwhile", None,
                 json.dumps({"payload": {"acquirer": "acq1", "session": session,
                                         "txn": acq["txn"], "accepted": False,
                                         "reason": "settled by a lookup meanwhile"}}),
                 int(time.time() * 1000))
        return real(engine, session, state, *args)

    monkeypatch.setattr(A, "conclude", raced)
    erin = stack.customer("erin", 10_00)
    with httpx.Client(timeout=30) as http, pytest.raises(C.TradeError) as refused:
        stack.open(http, erin, 2_00)
    assert "422" in str(refused.value) or "502" in str(refused.value)
    row = first_row(stack.account.engine, D.am_sessions, customer="erin")
    assert row is not None and row["state"] != D.OPEN
    acq = first_row(stack.acquirer.engine, D.acq_sessions, session=row["session"])
    assert acq is not None and acq["state"] == D.REFUSED


# --- break 3: a session could take more purchases than a record can carry ------------------

def test_a_session_never_takes_more_purchases_than_its_record_can_list(
        stack: TradeStack) -> None:
    """A session took purchases up to its chain's length (up to 1,000,000 links), but a record
    lists at most what fits in MAX_RECORD (2 MiB: about 5,000 entries with long item names,
    5,500 with short ones). Past that the merchant's record was refused by the mediating agent
    (413) and the session cleared without it: the merchant was paid nothing for everything
    sold (a customer buying one link at a time could do it on purpose). The merchant now
    refuses the purchase past the cap, and a record at the cap fits."""
    cap = 4_000
    alice = stack.customer("alice", 10_000_00)
    engine = stack.merchants["shop"].engine
    with httpx.Client(timeout=30) as http:
        s = stack.open(http, alice, 100_00)                         # ~15,800 JPY links
        assert s.length > cap + 10
        now = int(time.time() * 1000)
        rows = []
        wallet = s.wallet()
        for _ in range(cap):                # the merchant took `cap` purchases of 1 link
            index, link = wallet.pay(1)
            order = order_payload(s.session, index, "i" * 32, 1)
            rows.append({"session": s.session, "link_index": index, "units": 1,
                         "amount": s.unit, "item": "i" * 32, "link": link.hex(),
                         "order_body": S.canonical(order).decode(),
                         "order_signature": S.sign(s.session_key, S.ORDER, S.canonical(order)),
                         "at": now})
        s.spent = wallet.spent
        msg = {"index": index, "link": link.hex()}
        with engine.begin() as conn:
            conn.execute(insert(D.ma_purchases), rows)
            conn.execute(update(D.ma_sessions).where(
                D.ma_sessions.c.session == s.session).values(
                held_index=msg["index"], held_link=msg["link"]))
        with pytest.raises(C.TradeError, match="409"):
            C.buy(http, s, "one-more", 1)
    row = first_row(engine, D.ma_sessions, session=s.session)
    assert row is not None and row["held_index"] == cap
    got = end_session(engine, s.session, "merchant", "shop", stack.parties["shop"].key, now)
    assert got is not None
    assert len(got[0]) <= K.MAX_RECORD
    assert K.parse_record(got[0].encode())["count"] == cap


# --- break 4: an unsigned deeply nested body was a 500 at the mediating agent ---------------

def test_a_deeply_nested_customer_record_envelope_is_a_400(stack: TradeStack) -> None:
    """``POST /v1/records/customer`` parsed the (unauthenticated) body with json.loads and
    caught only ValueError: 100,000 nested brackets raised RecursionError, a 500."""
    for body in (b"[" * 100_000, b'{"a":' * 50_000):
        answer = httpx.post(f"{stack.url('acq1')}/v1/records/customer", content=body,
                            headers={S.SIGNER: "am1", S.SIGNATURE: "00" * 64})
        assert answer.status_code == 400, answer.status_code


# --- break 5: a merchant down for the grace lost everything it sold ------------------------

def test_a_merchant_down_past_the_grace_is_still_paid_its_proven_link(tmp_path: Path) -> None:
    """The customer ended the session and sent its record while the merchant agent was down.
    ``grace_ms`` after that record (60 s by default) the mediating agent cleared the session
    with the customer's record alone, and the amount cleared is what the MERCHANT's evidence
    proves: none, so the merchant was paid 0 for what it sold. Without the merchant's record
    the session now waits until its expiry (+ grace), and clears at the proven link once the
    merchant is back."""
    offset = [0.0]
    s_ = start_trade(tmp_path / "trade", clock=lambda: time.time() + offset[0], grace_ms=1_000,
                     close_seconds=3600)
    try:
        alice = s_.customer("alice", 10_00)
        with httpx.Client(timeout=30) as http:
            s = s_.open(http, alice, 5_00)
            for _ in range(3):
                C.buy(http, s, "tea", 2)
            s_.parties["shop"].thread.stop()                    # the merchant goes down
            body, headers = C.record(s)
            answer = http.post(f"{s_.am.url}/v1/sessions/{s.session}/record", content=body,
                               headers=headers)
            assert answer.status_code == 200, answer.text
        offset[0] += 5.0                                        # past the grace, not expiry
        asyncio.run(s_.acquirer.closer.tick())
        row = first_row(s_.acquirer.engine, D.acq_sessions, session=s.session)
        assert row is not None and row["state"] == D.OPEN, "cleared without the merchant"
        s_.restart("shop")
        offset[0] += 6.0            # the agent asks a silent merchant again after 5 s (T5)
        asyncio.run(s_.acquirer.closer.tick())
        done = first_row(s_.acquirer.engine, D.acq_clearings, session=s.session)
        assert done is not None
        assert json.loads(done["info"])["paid"] == 6 * s.unit
    finally:
        s_.close()


# --- break 6: the customer agent hashed its whole chain again for every purchase -----------

def test_the_customer_agent_makes_its_chain_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """C.purchase built a fresh Wallet each time, and its first payment makes all ``length``
    links: 0.5 s per purchase on a 1,000,000-link chain (a 10,000 EUR deposit into JPY). Now
    the links are made once; the session file still holds no chain."""
    from svcard.host.trade import payword as P
    s = C.Session("am1.1", "p1", "shop", "", 100, "EUR", 20_000, "JPY", "1/1", 2**43, 1,
                  20_000, 0, b"k" * 32, b"s" * 32)
    calls = [0]
    real = P.h

    def counted(link: bytes) -> bytes:
        calls[0] += 1
        return real(link)

    monkeypatch.setattr(P, "h", counted)
    for _ in range(5):
        C.purchase(s, "tea", 1)
    assert calls[0] <= 20_000 + 10, calls[0]
    assert "_wallet" not in s.to_json() and C.Session.from_json(s.to_json()).spent == 5
