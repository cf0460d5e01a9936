"""Temporary certificates carried by the trading-session servers (seed 004's PKI, issue 15
point 5): the customer's FI (the account manager) issues the session key's certificate in the
amended initiation, the merchant's FI (the mediating agent) signs it again in the information
message, and the merchant takes the session key from it, checked with its own FI's key only.
The reverse direction gives the customer the merchant's key. Every request the merchant agent
receives is inspected for the customer's identity."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from svcard.host.kit.db import first_row
from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade import signing as S
from svcard.host.trade.money import Amount
from svcard.host.trade.server.merchant import MerchantAgent
from svcard.host.trade.stack import TradeStack, start_trade
from svcard.host.trade.trust import buyer, certs

Seen = list[dict[str, Any]]


def recording(seen: Seen) -> Callable[[MerchantAgent], Any]:
    """MerchantAgent.app wrapped so that every request (path, query, headers, body) is kept."""
    original = MerchantAgent.app

    def app(self: MerchantAgent) -> Any:
        inner = original(self)

        async def wrapped(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await inner(scope, receive, send)
                return
            entry = {"path": scope["path"], "query": scope["query_string"].decode(),
                     "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
                     "body": b""}
            seen.append(entry)

            async def keep() -> Any:
                message = await receive()
                if message["type"] == "http.request":
                    entry["body"] += message.get("body", b"")
                return message
            await inner(scope, keep, send)
        return wrapped
    return app


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Seen:
    got: Seen = []
    monkeypatch.setattr(MerchantAgent, "app", recording(got))
    return got


@pytest.fixture
def stack(tmp_path: Path, seen: Seen) -> Iterator[TradeStack]:
    s = start_trade(tmp_path / "trade", merchants={"shop": "JPY", "kiosk": "KWD"})
    yield s
    s.close()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def test_the_merchant_takes_the_session_key_from_its_own_fis_certificate(
        stack: TradeStack, http: httpx.Client, seen: Seen) -> None:
    alice = stack.customer("alice", 50_00)
    s = C.open_session(http, stack.am.url, "am1", stack.am.public, "alice", alice.key,
                       "shop", stack.url("shop"), "op1",
                       Amount(3_00, "EUR"))
    C.buy(http, s, "song", 2)
    # the information message carried the certificate, signed again by the acquirer
    info = json.loads(next(e["body"] for e in seen if e["path"] == "/v1/sessions"))
    assert "session_key" not in info
    held = certs.verify(stack.parties["acq1"].public, info["cert"].encode(), s.session,
                        int(time.time()))
    assert held.key == S.public_of(s.session_key)
    row = first_row(stack.merchants["shop"].engine, D.ma_sessions, session=s.session)
    assert row is not None and row["session_key"] == held.key.hex()
    cert = json.loads(info["cert"])["cert"]
    assert set(cert) == {"v", "session", "key", "not_before", "not_after"}   # no issuer
    # the reverse direction: the merchant's key, signed by the customer's own FI
    mine = certs.verify(stack.am.public, s.opened["merchant_cert"].encode(), s.session,
                        int(time.time()))
    assert mine.key == stack.parties["shop"].public


def test_nothing_the_merchant_receives_names_the_customer(
        stack: TradeStack, http: httpx.Client, seen: Seen, tmp_path: Path) -> None:
    (tmp_path / "song.bin").write_bytes(b"a song" * 100)
    stack.merchants["shop"].config.products = {"song0": (tmp_path / "song.bin", "A song")}
    alice = stack.customer("alice", 50_00)
    s = stack.open(http, alice, 2_00)
    for i in range(3):
        C.buy(http, s, f"song{i}", 1)
    assert buyer.fetch(http, s, 1).plaintext == b"a song" * 100     # FIG. 4 too
    C.close(http, s)
    deadline = time.monotonic() + 20
    while not any(e["path"].endswith("/end") for e in seen) and \
            first_row(stack.merchants["shop"].engine, D.ma_records, session=s.session) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # the customer's id and long-term key, and its FI's id outside the session id; the
    # pseudonym and the txn are random values of this one session (the agent ack the merchant
    # checks names the txn), linkable to the customer only at the account manager
    secrets_of_identity = ["alice", S.public_of(alice.key).hex(), '"am1"', "account_manager",
                           S.public_of(stack.am.key).hex()]
    paths = {e["path"].rsplit("/", 1)[-1] for e in seen}
    assert {"sessions", "commitment", "purchases", "offer", "accept", "terminate"} <= paths
    for entry in seen:
        text = json.dumps({**entry, "body": entry["body"].decode()})
        for word in secrets_of_identity:
            assert word not in text, (entry["path"], word)


def _amended(stack: TradeStack, cert: str, session: str = "am1.77",
             key: str = "11" * 32) -> tuple[bytes, dict[str, str]]:
    return S.signed(stack.am.key, "am1", S.AMENDED, {
        "account_manager": "am1", "session": session, "txn": "ab" * 8, "merchant": "shop",
        "deposit": 1_00, "currency": "EUR", "pseudonym": "p1", "session_key": key,
        "cert": cert, "vouched": True, "expires": int(time.time() * 1000) + 60_000,
        "created": int(time.time())})


def test_the_acquirer_refuses_a_certificate_that_does_not_hold(
        stack: TradeStack, http: httpx.Client) -> None:
    url = f"{stack.url('acq1')}/v1/initiations"
    key = bytes.fromhex("11" * 32)
    now = int(time.time())
    rogue, _ = S.new_key()
    cases = {
        "another session": certs.issue(stack.am.key, "am1", "am1.78", key, now),
        "another key": certs.issue(stack.am.key, "am1", "am1.77", b"\x22" * 32, now),
        "expired": certs.issue(stack.am.key, "am1", "am1.77", key, now - 700),
        "not a known FI": certs.issue(rogue, "am1", "am1.77", key, now),
        "forged": certs.issue(stack.am.key, "am1", "am1.77", key, now).replace(
            b'"key":"1111', b'"key":"3333'),
        "zone 3 shown as zone 1": certs.resign(stack.am.key, {"am1": stack.am.public},
                                               certs.issue(stack.am.key, "am1", "am1.77",
                                                           key, now), now),
    }
    for what, cert in cases.items():
        body, headers = _amended(stack, cert.decode())
        answer = http.post(url, content=body, headers=headers)
        assert answer.status_code in (200, 400), what
        if answer.status_code == 200:
            ack = json.loads(answer.content)
            assert ack["accepted"] is False and "certificate" in ack["reason"], what
    assert first_row(stack.acquirer.engine, D.acq_sessions, session="am1.77") is None
    assert first_row(stack.merchants["shop"].engine, D.ma_sessions, session="am1.77") is None
    # the honest one opens the session at the merchant with that key
    body, headers = _amended(stack, certs.issue(stack.am.key, "am1", "am1.77", key,
                                                now).decode())
    ack = json.loads(http.post(url, content=body, headers=headers).content)
    assert ack["accepted"] is True
    row = first_row(stack.merchants["shop"].engine, D.ma_sessions, session="am1.77")
    assert row is not None and row["session_key"] == key.hex()


def test_the_merchant_refuses_a_certificate_its_fi_did_not_sign_for_it(
        stack: TradeStack, http: httpx.Client) -> None:
    url = f"{stack.url('shop')}/v1/sessions"
    acq = stack.parties["acq1"]
    key = b"\x44" * 32
    now = int(time.time())
    issued = certs.issue(stack.am.key, "am1", "am1.5", key, now)
    good = certs.resign(acq.key, {"am1": stack.am.public}, issued, now)
    rogue, _ = S.new_key()
    cases = {
        "another session": certs.resign(acq.key, {"am1": stack.am.public},
                                        certs.issue(stack.am.key, "am1", "am1.6", key, now),
                                        now),
        "expired": certs.resign(acq.key, {"am1": stack.am.public},
                                certs.issue(stack.am.key, "am1", "am1.5", key, now - 700),
                                now - 650),
        "re-signed by a wrong FI": certs.resign(rogue, {"am1": stack.am.public}, issued, now),
        "the customer's FI's own (zone 1)": issued,
        "forged": good.replace(b'"key":"4444', b'"key":"5555'),
        "an identity smuggled in": S.canonical({"cert": {**json.loads(good)["cert"],
                                                         "customer": "alice"},
                                                "sig": json.loads(good)["sig"]}),
    }

    def info(cert: bytes) -> tuple[bytes, dict[str, str]]:
        return S.signed(acq.key, "acq1", S.INFORMATION, {
            "acquirer": "acq1", "merchant": "shop", "session": "am1.5", "pseudonym": "p1",
            "deposit": 500, "currency": "JPY", "cert": cert.decode(),
            "expires": int(time.time() * 1000) + 60_000, "created": int(time.time())})

    for what, cert in cases.items():
        body, headers = info(cert)
        answer = http.post(url, content=body, headers=headers)
        assert answer.status_code in (400, 403), (what, answer.status_code)
        assert "certificate" in answer.json()["reason"], what
    assert first_row(stack.merchants["shop"].engine, D.ma_sessions, session="am1.5") is None
    body, headers = info(good)
    assert http.post(url, content=body, headers=headers).status_code == 200
    row = first_row(stack.merchants["shop"].engine, D.ma_sessions, session="am1.5")
    assert row is not None and row["session_key"] == key.hex()


def test_the_customer_refuses_a_merchant_certificate_its_fi_did_not_sign(
        stack: TradeStack, http: httpx.Client) -> None:
    alice = stack.customer("alice", 50_00)
    s = stack.open(http, alice, 1_00)
    cert = s.opened["merchant_cert"].encode()
    rogue, _ = S.new_key()
    now = int(time.time())
    with pytest.raises(certs.CertError, match="own FI"):
        certs.verify(stack.parties["acq1"].public, cert, s.session, now)   # not its FI
    with pytest.raises(certs.CertError, match="another session"):
        certs.verify(stack.am.public, cert, "am1.99", now)
    forged = certs.resign(rogue, {"acq1": stack.parties["acq1"].public},
                          certs.issue(stack.parties["acq1"].key, "acq1", s.session,
                                      S.public_of(rogue), now), now)
    with pytest.raises(certs.CertError, match="own FI"):
        certs.verify(stack.am.public, forged, s.session, now)
