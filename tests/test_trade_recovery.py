"""The account manager settles initiations it could not finish: sessions left ``in_doubt``
(no signed answer) or ``initiating`` (it stopped mid-way) are looked up at the mediating agent,
signed; the agent answers the acknowledgement it gave, or closes a session it never saw so that
the amended message can never open it later. The reservation follows the signed answer only."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from svcard.host.kit.db import first_row
from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade import signing as S
from svcard.host.trade.config import Peer
from svcard.host.trade.server.account import reserve
from svcard.host.trade.stack import TradeStack, start_trade
from svcard.host.trade.trust import certs


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[TradeStack]:
    s = start_trade(tmp_path / "trade")
    yield s
    s.close()


def session_row(stack: TradeStack, customer: str) -> dict[str, object]:
    row = first_row(stack.account.engine, D.am_sessions, customer=customer)
    assert row is not None
    return row


def reserved(stack: TradeStack, customer: str) -> int:
    row = first_row(stack.account.engine, D.am_customers, id=customer)
    assert row is not None
    return int(row["reserved"])


def test_in_doubt_then_opened_by_the_agents_signed_answer(stack: TradeStack) -> None:
    """The acquirer opened the session but the account manager could not check its answer
    (here: a wrong key for it); once it can, recovery opens the session, nothing twice."""
    real = stack.account.config.operators["op1"]
    stack.account.config.operators["op1"] = Peer(real.id, real.url, S.new_key()[1])
    alice = stack.customer("alice")
    with httpx.Client(timeout=30) as http, pytest.raises(C.TradeError, match="502"):
        stack.open(http, alice, 2_00)
    assert session_row(stack, "alice")["state"] == D.IN_DOUBT
    assert asyncio.run(stack.account.recover()) == {"open": 0, "refused": 0, "in_doubt": 1}
    stack.account.config.operators["op1"] = real
    assert asyncio.run(stack.account.recover()) == {"open": 1, "refused": 0, "in_doubt": 0}
    row = session_row(stack, "alice")
    assert row["state"] == D.OPEN and "deposit_merchant" in str(row["opened"])
    assert reserved(stack, "alice") == 2_00
    assert asyncio.run(stack.account.recover()) == {"open": 0, "refused": 0, "in_doubt": 0}


def test_never_received_is_closed_and_the_reservation_given_back(stack: TradeStack) -> None:
    bob = stack.customer("bob")
    stack.parties["acq1"].thread.stop()
    with httpx.Client(timeout=30) as http, pytest.raises(C.TradeError, match="502"):
        stack.open(http, bob, 3_00)
    assert reserved(stack, "bob") == 3_00
    stack.restart("acq1")
    assert asyncio.run(stack.account.recover()) == {"open": 0, "refused": 1, "in_doubt": 0}
    row = session_row(stack, "bob")
    assert row["state"] == D.REFUSED and "never received" in str(row["reason"])
    assert reserved(stack, "bob") == 0
    # the amended message for that session, arriving now, can never open it
    amended = {"account_manager": "am1", "session": row["session"], "txn": row["txn"],
               "merchant": "shop", "deposit": 3_00, "currency": "EUR",
               "pseudonym": row["pseudonym"], "session_key": "11" * 32, "vouched": True,
               "cert": certs.issue(stack.am.key, "am1", row["session"],
                                   bytes.fromhex("11" * 32), int(time.time())).decode(),
               "expires": int(time.time() * 1000) + 60_000, "created": int(time.time())}
    body, headers = S.signed(stack.am.key, "am1", S.AMENDED, amended)
    answer = httpx.post(f"{stack.url('acq1')}/v1/initiations", content=body, headers=headers)
    assert answer.status_code == 409
    assert first_row(stack.merchants["shop"].engine, D.ma_sessions,
                     session=row["session"]) is None


def test_interrupted_initiation_settled_at_restart(stack: TradeStack) -> None:
    """The account manager stopped right after reserving: the session is ``initiating``;
    the restarted server's recovery closes it at the acquirer and gives the deposit back."""
    carol = stack.customer("carol", 5_00)
    data = {"customer": "carol", "txn": secrets.token_hex(16), "merchant": "shop",
            "operator": "op1", "deposit": 4_00, "currency": "EUR",
            "order": {"item": "x", "price": 0},
            "registration": {"session_key": "22" * 32, "agent": "t"}}
    long_ago = int(time.time() * 1000) - 600_000
    reserve(stack.account.engine, "am1", data, "d" * 64, "pz", long_ago + 3_600_000, 10,
            long_ago)
    assert reserved(stack, "carol") == 4_00
    stack.restart("am1")                        # recovery runs as the server starts
    deadline = time.monotonic() + 30
    while session_row(stack, "carol")["state"] == D.INITIATING:
        assert time.monotonic() < deadline, "recovery did not settle the session"
        time.sleep(0.05)
    assert session_row(stack, "carol")["state"] == D.REFUSED
    assert reserved(stack, "carol") == 0
    with httpx.Client(timeout=30) as http:
        assert stack.open(http, carol, 5_00).deposit == 5_00   # the whole limit again


def test_lookup_attacks(stack: TradeStack) -> None:
    url = f"{stack.url('acq1')}/v1/initiations/lookup"
    alice = stack.customer("alice")
    with httpx.Client(timeout=30) as http:
        s = stack.open(http, alice, 1_00)
        txn = session_row(stack, "alice")["txn"]
        payload = {"account_manager": "am1", "session": s.session, "txn": txn,
                   "created": int(time.time())}
        body, headers = S.signed(stack.am.key, "am1", S.LOOKUP, payload)
        answer = http.post(url, content=body, headers=headers)
        assert answer.status_code == 200 and b'"accepted":true' in answer.content
        rogue, _ = S.new_key()
        assert http.post(url, content=body, headers={
            **headers, S.SIGNATURE: S.sign(rogue, S.LOOKUP, body)}).status_code == 401
        assert http.post(url, content=body, headers={
            **headers, S.SIGNATURE: S.sign(stack.am.key, S.AMENDED, body)}).status_code == 401
        b, h = S.signed(stack.am.key, "am1", S.LOOKUP, {**payload, "session": "am2.1"})
        assert http.post(url, content=b, headers=h).status_code == 403    # another AM's
        b, h = S.signed(stack.am.key, "am1", S.LOOKUP, {**payload, "txn": "ab" * 8})
        assert http.post(url, content=b, headers=h).status_code == 409    # another txn
        b, h = S.signed(stack.am.key, "am1", S.LOOKUP,
                        {**payload, "created": int(time.time()) - 3600})
        assert http.post(url, content=b, headers=h).status_code == 401    # stale
        assert http.post(url, content=body[:20], headers=headers).status_code == 400
    row = first_row(stack.acquirer.engine, D.acq_sessions, session=s.session)
    assert row is not None and row["state"] == D.OPEN
