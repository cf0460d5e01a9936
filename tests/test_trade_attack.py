"""Attacks on each trading-session message: forged, replayed, truncated, reordered, stale,
raced and aimed at another session or party. Each is refused and changes nothing."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from svcard.host.kit.db import first_row
from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade import signing as S
from svcard.host.trade.money import Amount
from svcard.host.trade.payword import LINK
from svcard.host.trade.stack import TradeStack, start_trade
from svcard.host.trade.trust import certs


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[TradeStack]:
    s = start_trade(tmp_path / "trade", merchants={"shop": "JPY", "kiosk": "EUR"})
    yield s
    s.close()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def count(engine: Any, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def reserved(stack: TradeStack, who: str) -> int:
    row = first_row(stack.account.engine, D.am_customers, id=who)
    assert row is not None
    return int(row["reserved"])


# --- the initiation (customer agent -> account manager) -------------------------------------

def test_initiation_attacks(stack: TradeStack, http: httpx.Client) -> None:
    alice = stack.customer("alice", 10_00)
    mallory = stack.customer("mallory", 10_00)
    url = f"{stack.am.url}/v1/sessions"
    _, pub = S.new_key()

    def init(**kw: Any) -> tuple[bytes, dict[str, str]]:
        return C.initiation("alice", alice.key, pub, "shop", "op1", Amount(1_00, "EUR"),
                            "x", 0, **kw)

    body, headers = init()
    forged = {**headers, S.SIGNATURE: S.sign(mallory.key, S.INITIATION, body)}
    assert http.post(url, content=body, headers=forged).status_code == 401
    # mallory signs an initiation in alice's name: the signer must be the customer named
    as_mallory = {**headers, S.SIGNER: "mallory",
                  S.SIGNATURE: S.sign(mallory.key, S.INITIATION, body)}
    assert http.post(url, content=body, headers=as_mallory).status_code == 403
    # another kind of message's signature (the domain label differs)
    other_kind = {**headers, S.SIGNATURE: S.sign(alice.key, S.TERMINATE, body)}
    assert http.post(url, content=body, headers=other_kind).status_code == 401
    tampered = body.replace(b'"deposit":100', b'"deposit":900')
    assert http.post(url, content=tampered, headers=headers).status_code == 401
    assert http.post(url, content=body[:-7], headers=headers).status_code == 400  # truncated
    assert http.post(url, content=b"{" * 5000, headers=headers).status_code == 413
    stale, stale_headers = init(created=int(time.time()) - 3600)
    assert http.post(url, content=stale, headers=stale_headers).status_code == 401
    payload = json.loads(body)
    extra, extra_headers = S.signed(alice.key, "alice", S.INITIATION, {**payload, "x": 1})
    assert http.post(url, content=extra, headers=extra_headers).status_code == 400
    for field, bad in (("deposit", 0), ("deposit", -5), ("currency", "XYZ"), ("txn", "zz"),
                       ("deposit", True)):
        b, h = S.signed(alice.key, "alice", S.INITIATION, {**payload, field: bad})
        assert http.post(url, content=b, headers=h).status_code == 400, field
    assert count(stack.account.engine, D.am_sessions) == 0 and reserved(stack, "alice") == 0
    # the honest one, then its replay
    assert http.post(url, content=body, headers=headers).status_code == 200
    again = http.post(url, content=body, headers=headers)
    assert again.status_code == 409 and again.json()["session"] == "am1.1"
    assert count(stack.account.engine, D.am_sessions) == 1 and reserved(stack, "alice") == 1_00
    assert count(stack.acquirer.engine, D.acq_sessions) == 1


# --- the amended initiation (account manager -> mediating agent) -----------------------------

def amended(stack: TradeStack, session: str = "am1.77", **kw: Any) -> dict[str, Any]:
    cert = certs.issue(stack.am.key, "am1", session, bytes.fromhex("11" * 32),
                       int(time.time())).decode()
    return {"account_manager": "am1", "session": session, "txn": "ab" * 8, "merchant": "shop",
            "deposit": 1_00, "currency": "EUR", "pseudonym": "p1", "session_key": "11" * 32,
            "cert": cert, "vouched": True, "expires": int(time.time() * 1000) + 60_000,
            "created": int(time.time()), **kw}


def test_amended_initiation_attacks(stack: TradeStack, http: httpx.Client) -> None:
    url = f"{stack.url('acq1')}/v1/initiations"
    am_key = stack.am.key
    rogue, _ = S.new_key()
    payload = amended(stack)
    body, headers = S.signed(am_key, "am1", S.AMENDED, payload)
    assert http.post(url, content=body, headers={
        **headers, S.SIGNATURE: S.sign(rogue, S.AMENDED, body)}).status_code == 401
    b, h = S.signed(rogue, "am9", S.AMENDED, {**payload, "account_manager": "am9",
                                              "session": "am9.1"})
    assert http.post(url, content=b, headers=h).status_code == 403       # unknown AM
    b, h = S.signed(am_key, "am1", S.AMENDED, {**payload, "session": "am2.5"})
    assert http.post(url, content=b, headers=h).status_code == 403       # another AM's
    b, h = S.signed(am_key, "am1", S.AMENDED, {**payload, "vouched": False})
    assert http.post(url, content=b, headers=h).status_code == 400       # not vouched for
    assert http.post(url, content=body[:40], headers=headers).status_code == 400
    assert count(stack.acquirer.engine, D.acq_sessions) == 0
    first = http.post(url, content=body, headers=headers)
    assert first.status_code == 200 and json.loads(first.content)["accepted"] is True
    postings = count(stack.acquirer.engine, D.acq_postings)
    again = http.post(url, content=body, headers=headers)              # replayed: same ack
    assert again.status_code == 200 and again.content == first.content
    assert count(stack.acquirer.engine, D.acq_postings) == postings    # booked once
    b, h = S.signed(am_key, "am1", S.AMENDED, {**payload, "deposit": 9_00})
    assert http.post(url, content=b, headers=h).status_code == 409      # same id, new body
    assert count(stack.merchants["shop"].engine, D.ma_sessions) == 1


# --- the information message (mediating agent -> merchant agent) ----------------------------

def merchant_cert(stack: TradeStack, session: str, key: bytes) -> str:
    """The temporary certificate for ``key`` as the merchant gets it: issued by the account
    manager, signed again by the acquirer."""
    now = int(time.time())
    issued = certs.issue(stack.am.key, "am1", session, key, now)
    return certs.resign(stack.parties["acq1"].key, {"am1": stack.am.public}, issued,
                        now).decode()


def test_information_attacks(stack: TradeStack, http: httpx.Client) -> None:
    url = f"{stack.url('shop')}/v1/sessions"
    acq = stack.parties["acq1"]
    info = {"acquirer": "acq1", "merchant": "shop", "session": "am1.5", "pseudonym": "p1",
            "deposit": 500, "currency": "JPY",
            "cert": merchant_cert(stack, "am1.5", bytes.fromhex("22" * 32)),
            "expires": int(time.time() * 1000) + 60_000, "created": int(time.time())}
    body, headers = S.signed(acq.key, "acq1", S.INFORMATION, info)
    rogue, _ = S.new_key()
    assert http.post(url, content=body, headers={
        **headers, S.SIGNATURE: S.sign(rogue, S.INFORMATION, body)}).status_code == 401
    b, h = S.signed(rogue, "acq2", S.INFORMATION, {**info, "acquirer": "acq2"})
    assert http.post(url, content=b, headers=h).status_code == 403     # not our acquirer
    b, h = S.signed(acq.key, "acq1", S.INFORMATION, {**info, "merchant": "kiosk"})
    assert http.post(url, content=b, headers=h).status_code == 403     # for another merchant
    b, h = S.signed(acq.key, "acq1", S.INFORMATION, {**info, "currency": "EUR"})
    assert http.post(url, content=b, headers=h).status_code == 422     # not our currency
    assert count(stack.merchants["shop"].engine, D.ma_sessions) == 0
    first = http.post(url, content=body, headers=headers)
    assert first.status_code == 200
    assert http.post(url, content=body, headers=headers).content == first.content
    b, h = S.signed(acq.key, "acq1", S.INFORMATION, {**info, "deposit": 999})
    assert http.post(url, content=b, headers=h).status_code == 409
    assert count(stack.merchants["shop"].engine, D.ma_sessions) == 1


# --- commitment, purchases and terminate (customer agent <-> merchant agent) -----------------

def test_purchase_attacks(stack: TradeStack, http: httpx.Client) -> None:
    alice, bob = stack.customer("alice"), stack.customer("bob")
    a = stack.open(http, alice, 1_00)
    b = stack.open(http, bob, 1_00)
    url = f"{a.merchant_url}/v1/sessions/{a.session}/purchases"

    def post(message: dict[str, Any], to: str = url) -> int:
        return http.post(to, json=message).status_code

    m1, m2 = C.purchase(a, "song", 1), C.purchase(a, "song", 2)
    rogue, _ = S.new_key()
    # a forged link under the customer's own signed order: refused by the hash check
    order = m1["order"]
    forged = {**m1, "link": (b"\x01" * LINK).hex()}
    assert post(forged) == 402
    assert post({**m1, "signature": S.sign(rogue, S.ORDER, S.canonical(order))}) == 401
    assert post({**m1, "link": m1["link"][:60]}) == 400                 # truncated link
    assert post({**m1, "order": {**order, "units": 3}}) == 401          # order changed
    assert post(m1, to=f"{b.merchant_url}/v1/sessions/{b.session}/purchases") == 400
    assert post(m2) == 409                                              # reordered
    assert post(m1) == 200 and post(m2) == 200                          # then in order
    assert post(m1) == 409 and post(m2) == 409                          # replayed
    # claims more than the link it holds: index past what was revealed
    m3 = C.purchase(a, "song", 1)
    assert post({**m3, "index": 5, "order": {**m3["order"], "index": 5},
                 "signature": S.sign(a.session_key, S.ORDER, S.canonical(
                     {**m3["order"], "index": 5}))}) == 402
    assert post(m3) == 200
    status = http.get(f"{a.merchant_url}/v1/sessions/{a.session}",
                     params={"pseudonym": a.pseudonym}).json()
    assert (status["index"], status["taken"]) == (4, 4)
    assert count(stack.merchants["shop"].engine, D.ma_purchases) == 3


def test_purchases_raced_for_one_link(stack: TradeStack, http: httpx.Client) -> None:
    alice = stack.customer("alice")
    s = stack.open(http, alice, 1_00)
    message = C.purchase(s, "song", 1)
    url = f"{s.merchant_url}/v1/sessions/{s.session}/purchases"
    codes: list[int] = []
    barrier = threading.Barrier(8)

    def one() -> None:
        with httpx.Client(timeout=30) as h:
            barrier.wait()
            codes.append(h.post(url, json=message).status_code)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(codes) == [200] + [409] * 7
    assert count(stack.merchants["shop"].engine, D.ma_purchases) == 1


def test_commitment_attacks(stack: TradeStack, http: httpx.Client) -> None:
    alice = stack.customer("alice")
    s = stack.open(http, alice, 1_00)             # the commitment is taken at open
    url = f"{s.merchant_url}/v1/sessions/{s.session}/commitment"
    accepted = {"acquirer_ack": s.opened["acquirer_ack"],
                "acquirer_signature": s.opened["acquirer_signature"]}
    c = {"session": s.session, "merchant": "shop", "root": "33" * 32, "length": 10,
         "unit": 1, "currency": "JPY", "expires": s.expires}
    sig = S.sign(s.session_key, S.COMMITMENT, S.canonical(c))
    assert http.post(url, json={"commitment": c, "signature": sig,
                                **accepted}).status_code == 409      # a second one
    rogue, _ = S.new_key()
    assert http.post(url, json={"commitment": c, "signature": S.sign(
        rogue, S.COMMITMENT, S.canonical(c)), **accepted}).status_code == 401
    # a session the merchant was told of but whose acceptance it never saw
    info_url = f"{s.merchant_url}/v1/sessions"
    acq = stack.parties["acq1"]
    key, pub = S.new_key()
    info = {"acquirer": "acq1", "merchant": "shop", "session": "am1.50", "pseudonym": "p9",
            "deposit": 100, "currency": "JPY", "cert": merchant_cert(stack, "am1.50", pub),
            "expires": s.expires, "created": int(time.time())}
    b, h = S.signed(acq.key, "acq1", S.INFORMATION, info)
    assert http.post(info_url, content=b, headers=h).status_code == 200
    url = f"{s.merchant_url}/v1/sessions/am1.50/commitment"
    mine = {**c, "session": "am1.50"}
    signature = S.sign(key, S.COMMITMENT, S.canonical(mine))

    def commit(ack: dict[str, object] | None, by: bytes = acq.key,
               commitment: dict[str, object] = mine, sig: str = signature) -> int:
        body: dict[str, object] = {"commitment": commitment, "signature": sig}
        if ack is not None:
            text = S.canonical(ack).decode()
            body.update(acquirer_ack=text, acquirer_signature=S.sign(by, S.AGENT_ACK,
                                                                     text.encode()))
        return http.post(url, json=body).status_code

    good = {**json.loads(s.opened["acquirer_ack"]), "session": "am1.50", "pseudonym": "p9",
            "deposit_merchant": 100}
    assert commit(None) == 400                                    # no acceptance at all
    assert commit(good, by=rogue) == 401                          # not the acquirer's
    assert commit({**good, "session": s.session}) == 403          # another session's
    assert commit({**good, "deposit_merchant": 99}) == 403        # another deposit
    refusal = {k: good[k] for k in ("acquirer", "session", "txn")}
    assert commit({**refusal, "accepted": False, "reason": "no"}) == 403
    for bad, code in (({**mine, "length": 101}, 402),
                      ({**mine, "merchant": "kiosk"}, 400),
                      ({**mine, "session": s.session}, 400),
                      ({**mine, "currency": "EUR"}, 402),
                      ({**mine, "expires": s.expires + 1}, 402)):
        assert commit(good, commitment=bad,
                      sig=S.sign(key, S.COMMITMENT, S.canonical(bad))) == code
    row = first_row(stack.merchants["shop"].engine, D.ma_sessions, session="am1.50")
    assert row is not None and row["state"] == D.INFORMED
    assert commit(good) == 200                                    # with all of it: open


def test_terminate_attacks(stack: TradeStack, http: httpx.Client) -> None:
    alice, bob = stack.customer("alice"), stack.customer("bob")
    a = stack.open(http, alice, 1_00)
    b = stack.open(http, bob, 1_00)
    url = f"{a.merchant_url}/v1/sessions/{a.session}/terminate"
    payload = {"session": a.session, "index": 0, "created": int(time.time())}
    body, headers = S.signed(b.session_key, a.pseudonym, S.TERMINATE, payload)
    assert http.post(url, content=body, headers=headers).status_code == 401   # bob's key
    body, headers = S.signed(b.session_key, b.pseudonym, S.TERMINATE, payload)
    assert http.post(url, content=body, headers=headers).status_code == 403   # bob's name
    body, headers = S.signed(a.session_key, a.pseudonym, S.TERMINATE,
                             {**payload, "session": b.session})
    assert http.post(url, content=body, headers=headers).status_code == 403   # at b's URL?
    stale, sh = S.signed(a.session_key, a.pseudonym, S.TERMINATE,
                         {**payload, "created": int(time.time()) - 3600})
    assert http.post(url, content=stale, headers=sh).status_code == 401
    assert http.get(f"{a.merchant_url}/v1/sessions/{a.session}",
                     params={"pseudonym": a.pseudonym}).json()["state"] == D.OPEN
    assert C.terminate(http, a)["state"] == D.TERMINATED
    assert http.get(f"{b.merchant_url}/v1/sessions/{b.session}",
                     params={"pseudonym": b.pseudonym}).json()["state"] == D.OPEN


# --- the acknowledgement to the account manager (mediating agent -> account manager) ---------

def test_forged_agent_ack_leaves_the_session_in_doubt(tmp_path: Path,
                                                      http: httpx.Client) -> None:
    stack = start_trade(tmp_path / "t")
    try:
        # the account manager's operator entry keeps the acquirer's URL but another key: the
        # acquirer's real, signed answers no longer verify, as a forged one would not
        real = stack.account.config.operators["op1"]
        _, other = S.new_key()
        stack.account.config.operators["op1"] = type(real)(real.id, real.url, other)
        alice = stack.customer("alice")
        with pytest.raises(C.TradeError, match="502"):
            stack.open(http, alice, 1_00)
        row = first_row(stack.account.engine, D.am_sessions, customer="alice")
        assert row is not None and row["state"] == D.IN_DOUBT
        assert "no signed answer" in row["reason"] and reserved(stack, "alice") == 1_00
    finally:
        stack.close()


def test_session_state_only_for_who_knows_the_pseudonym(stack: TradeStack,
                                                        http: httpx.Client) -> None:
    alice = stack.customer("alice")
    s = stack.open(http, alice, 1_00)
    C.buy(http, s, "song", 2)
    url = f"{s.merchant_url}/v1/sessions/{s.session}"
    assert http.get(url).status_code == 404
    assert http.get(url, params={"pseudonym": "p" + "0" * 24}).status_code == 404
    assert http.get(url, params={"pseudonym": s.pseudonym}).json()["taken"] == 2


def test_amended_initiation_expiry_bounded(stack: TradeStack, http: httpx.Client) -> None:
    url = f"{stack.url('acq1')}/v1/initiations"
    now_ms = int(time.time() * 1000)
    for session, expires in (("am1.80", now_ms - 1), ("am1.81", now_ms + 8 * 86_400_000)):
        body, headers = S.signed(stack.am.key, "am1", S.AMENDED,
                                 amended(stack, session, expires=expires))
        answer = http.post(url, content=body, headers=headers)
        assert answer.status_code == 200 and b'"accepted":false' in answer.content
        assert b"expiry" in answer.content
    assert count(stack.acquirer.engine, D.acq_sessions) == 0
