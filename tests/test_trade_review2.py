"""Reviewer R-trade2 (issue 15): attacks on certificates, FIG. 4 delivery and purse-funded
deposits through the real servers. Each test failed on the code before its fix."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from svcard.card.storage import read_image
from svcard.host.cli.main import main as svcard_main
from svcard.host.demo.system import card_image
from svcard.host.kit.db import first_row
from svcard.host.load.server.app import BankAccount
from svcard.host.load.stack import DEMO_LOAD_TERMINAL, LoadStack, start_load_stack
from svcard.host.pay import client as pay_client
from svcard.host.pay.server.app import MerchantAccount
from svcard.host.pay.stack import Stack, start_stack
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader
from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade import messages as M
from svcard.host.trade import records
from svcard.host.trade import signing as S
from svcard.host.trade.config import PurseSettings
from svcard.host.trade.money import Amount, ExchangeTable
from svcard.host.trade.server import purse as PD
from svcard.host.trade.server import purse_agent as PA
from svcard.host.trade.stack import DEMO_RATES, TradeStack, start_trade
from svcard.host.trade.trust import buyer, certs
from svcard.host.trade.trust import delivery as V
from svcard.protocols import messages as PM

AM_MERCHANT = b"AMTRADE1"
AM_BANK = b"AMBANK01"


@dataclass
class PurseWorld:
    trade: TradeStack
    pay: Stack
    load: LoadStack
    folder: Path


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


CLOCK = Clock()


@pytest.fixture
def purse_world(tmp_path: Path) -> Iterator[PurseWorld]:
    CLOCK.offset = 0.0
    now = int(time.time() * 1000)
    table = ExchangeTable.from_text("bank-m", "EUR", {**DEMO_RATES, "CNY": "7.8123"},
                                    now - 60_000, now + 86_400_000)
    trade = start_trade(tmp_path / "trade", table=table, clock=CLOCK, close_seconds=3600)
    pay = start_stack(tmp_path / "pay", psams=1)
    load = start_load_stack(tmp_path / "load")
    pay_key, load_key = os.urandom(32), os.urandom(32)
    pay.payment_server.config.merchants[AM_MERCHANT] = MerchantAccount(
        AM_MERCHANT, pay_key, frozenset({PM.FIG6_SERVER_COMPARES}))
    load.load_server.config.banks[AM_BANK] = BankAccount(AM_BANK, load_key)
    trade.account.config.purse = PurseSettings(
        AM_MERCHANT, pay_key, pay.payment.url, pay.payment_server.pool.terminal_id, AM_BANK,
        load_key, load.load.url, DEMO_LOAD_TERMINAL, "CNY", 156, trade.am.url)
    yield PurseWorld(trade, pay, load, tmp_path)
    trade.close()
    pay.close()
    load.close()


def test_a_card_paying_one_cent_never_funds_a_credit_session_of_the_same_txn(
        purse_world: PurseWorld, tmp_path: Path) -> None:
    """The attack: a session opened on credit (deposit 50.00) with txn X, then a purse order
    of 0.01 with the same txn X. The card pays 0.01; the desk found 'the session of this
    txn' and tied the credit session to the card: at clearing the rest of the 50.00 became
    due to the card (loaded as purse money) and the withdrawal record said 'funding: purse'
    (the account not charged). Now: the session opens only from the very initiation the card
    paid for; this order is refused and its 0.01 is due back, nothing else."""
    w = purse_world
    made = w.trade.customer("mallory", 100_00, "CNY")
    txn = secrets.token_hex(16)
    key = PA.session_key(made.key, txn)
    card = card_image(tmp_path, ep=20_00)
    with httpx.Client(timeout=30) as http:
        body, headers = C.initiation("mallory", made.key, S.public_of(key), "shop", "op1",
                                     Amount(50_00, "CNY"), "session", 0, txn=txn)
        credit = http.post(f"{w.trade.am.url}/v1/sessions", content=body, headers=headers)
        assert credit.status_code == 200, credit.text
        s = C.opened_session(http, w.trade.am.url, w.trade.am.public, credit.content,
                             credit.headers.get(S.SIGNATURE), "shop", w.trade.url("shop"),
                             Amount(50_00, "CNY"), key, 1)
        body, headers = C.initiation("mallory", made.key, S.public_of(key), "shop", "op1",
                                     Amount(1, "CNY"), "session", 0, txn=txn)
        answer = http.post(f"{w.trade.am.url}/v1/purse/orders", content=body,
                           headers=headers)
        assert answer.status_code == 200, answer.text
        order = answer.json()
        with open_reader(f"virtual:{card}") as reader:
            paid = pay_client.pay(str(order["checkout_url"]), reader,
                                  journal=Journal(tmp_path / "journal.jsonl"), http=http)
        assert int(read_image(card)["app"]["ep"]["balance"]) == 20_00 - 1
        receipt = paid.receipt
        assert "opened" not in receipt, "a 0.01 card payment opened the 50.00 credit session"
        assert receipt["load_due"] == 1
        row = first_row(w.trade.account.engine, D.am_purse, order_id=order["order"])
        assert row is not None and row["state"] == "refused" and row["session"] is None
        assert row["rest"] == 1 and row["load_state"] == "due"
        s.purse_order = order["order"]
        C.close(http, s)                            # nothing bought: 50.00 returned
        deadline = time.monotonic() + 20
        while PA.rest(http, s) is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    row = first_row(w.trade.account.engine, D.am_purse, order_id=order["order"])
    assert row is not None and row["rest"] == 1           # not the credit session's 50.00
    path = w.folder / "trade" / "billing-am1" / "withdrawals" / f"{s.session}.json"
    while not path.exists():                    # written just after the row
        assert time.monotonic() < deadline
        time.sleep(0.05)
    bill = json.loads(path.read_text())
    assert "funding" not in bill and "purse" not in bill   # a credit session, billed as one


def test_the_books_find_a_tampered_purse_row(purse_world: PurseWorld, tmp_path: Path) -> None:
    """The rest a card takes back is the purse row's ``rest``: the audit checked every
    trading book but never that row, so raising it (more loaded onto the card than the
    clearing returned), or pointing a card's payment at another customer's session, left
    the books clean; nor was a withdrawal row's ``returned`` compared with the clearing. Now
    each purse row must match its session and its clearing, and each withdrawal row the
    signed clearing it was made from."""
    w = purse_world
    made = w.trade.customer("alice", 100_00, "CNY")
    card = card_image(tmp_path, ep=20_00)
    journal = Journal(tmp_path / "journal.jsonl")
    with httpx.Client(timeout=30) as http:
        with open_reader(f"virtual:{card}") as reader:
            s = PA.open_session(http, w.trade.am.url, w.trade.am.public, "alice", made.key,
                                "shop", w.trade.url("shop"), "op1", Amount(5_00, "CNY"),
                                reader, journal, unit=1)
        C.buy(http, s, "tea", 3)
        returned = C.close(http, s)["clearing"]["returned"]
        deadline = time.monotonic() + 20
        while PA.rest(http, s) is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        other = w.trade.open(http, w.trade.customer("bob", 100_00, "CNY"), 7_00)
    engines = ([w.trade.acquirer.engine], [w.trade.account.engine],
               [w.trade.merchant_account.engine])
    assert records.books(*engines).clean, records.books(*engines).problems
    p = D.am_purse.c
    for values, what in (({"rest": returned + 10_00}, "due back"),
                         ({"session": other.session}, "not the session")):
        with w.trade.account.engine.begin() as conn:
            old = dict(conn.execute(select(D.am_purse).where(
                p.order_id == s.purse_order)).one()._mapping)
            conn.execute(update(D.am_purse).where(p.order_id == s.purse_order).values(**values))
        problems = records.books(*engines).problems
        assert any(s.purse_order in x and what in x for x in problems), problems
        with w.trade.account.engine.begin() as conn:
            conn.execute(update(D.am_purse).where(p.order_id == s.purse_order).values(
                **{k: old[k] for k in values}))
    assert records.books(*engines).clean
    # the withdrawal row's returned raised with the purse row's rest: both still agree with
    # each other, but not with the signed clearing
    w_ = D.am_withdrawals.c
    with w.trade.account.engine.begin() as conn:
        conn.execute(update(D.am_withdrawals).where(w_.session == s.session).values(
            returned=returned + 10_00))
        conn.execute(update(D.am_purse).where(p.order_id == s.purse_order).values(
            rest=returned + 10_00))
    problems = records.books(*engines).problems
    assert any(s.session in x and "withdrawal record" in x for x in problems), problems


def test_a_lost_fig4_answer_is_asked_again_by_the_next_run(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """The customer paid for a product; the trusted party released K2 to its acceptance, but
    the answer was lost on the way back. ``svcard session product`` then made a NEW
    acceptance (and K1) on the next run, which the trusted party refuses (one acceptance per
    order): the product bought was out of reach for good. Now the acceptance and its K1 are
    kept beside the session file before they are sent, and the next run sends them again."""
    stack = start_trade(tmp_path / "trade", merchants={"shop": "JPY"})
    try:
        film = b"a short film " * 500
        (tmp_path / "film.bin").write_bytes(film)
        stack.merchants["shop"].config.products = {"film": (tmp_path / "film.bin", "A film")}
        with httpx.Client(timeout=30) as http:
            s = stack.open(http, stack.customer("alice", 50_00), 2_00, unit=10)
            C.buy(http, s, "film", 1)
        state = tmp_path / "session.json"
        C.save(state, s)
        real_post = httpx.Client.post

        def lossy(self: httpx.Client, url: Any, *args: Any, **kwargs: Any) -> httpx.Response:
            answer = real_post(self, url, *args, **kwargs)
            if str(url).endswith(("/accept", "/release")):   # done there, lost on the way
                raise httpx.ReadError("the answer was lost")
            return answer
        monkeypatch.setattr(httpx.Client, "post", lossy)
        out = tmp_path / "film.out"
        r = CliRunner().invoke(svcard_main, ["session", "product", "--state", str(state),
                                             "--out", str(out)])
        assert r.exit_code == 11, r.output
        row = first_row(stack.acquirer.engine, D.acq_deliveries, session=s.session)
        assert row is not None and row["accepted"]             # K2 was released
        monkeypatch.setattr(httpx.Client, "post", real_post)
        r = CliRunner().invoke(svcard_main, ["session", "product", "--state", str(state),
                                             "--out", str(out), "--json"])
        assert r.exit_code == 0, r.output
        assert out.read_bytes() == film
        again = first_row(stack.acquirer.engine, D.acq_deliveries, session=s.session)
        assert again is not None and again["accepted"] == row["accepted"]   # released once
        kept = list(tmp_path.glob("session.json.fig4-*"))
        assert len(kept) == 1 and (kept[0].stat().st_mode & 0o777) == 0o600
    finally:
        stack.close()


def test_a_kept_acceptance_that_never_arrived_is_made_anew_once_too_old(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kept acceptance that never reached the trusted party (the link was down) and is now
    past its 300 s is refused as too old; K2 was not released to it, so the next run signs a
    new one (and keeps it) instead of being stuck."""
    stack = start_trade(tmp_path / "trade", merchants={"shop": "JPY"})
    try:
        (tmp_path / "film.bin").write_bytes(b"film" * 100)
        stack.merchants["shop"].config.products = {"film": (tmp_path / "film.bin", "A film")}
        state = tmp_path / "session.json"
        with httpx.Client(timeout=30) as http:
            s = stack.open(http, stack.customer("alice", 50_00), 2_00, unit=10)
            C.buy(http, s, "film", 1)
            C.save(state, s)
            real_post = httpx.Client.post

            def down(self: httpx.Client, url: Any, *args: Any, **kwargs: Any
                     ) -> httpx.Response:
                if str(url).endswith("/accept"):
                    raise httpx.ConnectError("the link is down")
                return real_post(self, url, *args, **kwargs)
            monkeypatch.setattr(httpx.Client, "post", down)
            with pytest.raises(httpx.ConnectError):
                buyer.fetch(http, s, keep=state, now=int(time.time()) - 400)
            monkeypatch.setattr(httpx.Client, "post", real_post)
        kept = tmp_path / "session.json.fig4-1"
        first = json.loads(kept.read_text())["acceptance"]
        r = CliRunner().invoke(svcard_main, ["session", "product", "--state", str(state),
                                             "--out", str(tmp_path / "film.out")])
        assert r.exit_code == 0, r.output
        assert json.loads(kept.read_text())["acceptance"] != first
    finally:
        stack.close()


def test_a_paid_session_cleared_before_its_order_settled_still_owes_the_card_its_rest(
        purse_world: PurseWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The account manager stops after the card paid and the session opened, before the
    order is marked open; the customer resumes only after the session timed out and was
    cleared (nothing bought: the whole deposit returned). The clearing's rest was made due
    only to an order already naming the session, so the card's 5.00 was kept for good and
    the withdrawal billed as a credit session. Now the clearing finds the paid order by its
    initiation (customer, txn, digest)."""
    w = purse_world
    made = w.trade.customer("alice", 100_00, "CNY")
    card = card_image(tmp_path, ep=20_00)
    journal = Journal(tmp_path / "journal.jsonl")
    real = PD.settle_order

    def crash(engine: Any, order_id: str, state: str, *args: Any) -> None:
        if state == PD.OPENED:
            raise RuntimeError("the account manager stopped here")
        real(engine, order_id, state, *args)
    monkeypatch.setattr(PD, "settle_order", crash)
    with httpx.Client(timeout=30) as http:
        with open_reader(f"virtual:{card}") as reader, pytest.raises(C.TradeError):
            PA.open_session(http, w.trade.am.url, w.trade.am.public, "alice", made.key,
                            "shop", w.trade.url("shop"), "op1", Amount(5_00, "CNY"),
                            reader, journal, unit=1)
        assert int(read_image(card)["app"]["ep"]["balance"]) == 15_00
        monkeypatch.setattr(PD, "settle_order", real)
        row = first_row(w.trade.account.engine, D.am_purse, customer="alice")
        assert row is not None and row["state"] == PD.PAID
        CLOCK.offset = 2 * 3600                         # the session times out, is cleared
        assert asyncio.run(w.trade.acquirer.closer.tick())["cleared"] == 1
        held = first_row(w.trade.account.engine, D.am_sessions, customer="alice")
        assert held is not None and held["state"] == D.CLEARED
        assert records.books([w.trade.acquirer.engine], [w.trade.account.engine],
                             [w.trade.merchant_account.engine]).clean   # not resumed yet
        with open_reader(f"virtual:{card}") as reader:      # the customer resumes at last
            pay_client.resume(reader, journal=journal, http=http)
    w_ = first_row(w.trade.account.engine, D.am_withdrawals, session=held["session"])
    assert w_ is not None and w_["returned"] > 0
    row = first_row(w.trade.account.engine, D.am_purse, customer="alice")
    assert row is not None and row["session"] == held["session"]
    assert (row["rest"], row["load_state"]) == (w_["returned"], PD.DUE)
    assert records.books([w.trade.acquirer.engine], [w.trade.account.engine],
                         [w.trade.merchant_account.engine]).clean


def test_an_acceptance_naming_an_unusable_k1_is_a_clear_400(tmp_path: Path) -> None:
    """A signed acceptance whose K1 is a low-order X25519 point (all zeros) made the trusted
    party fail with a 500 (the merchant said 503, 'ask again'). Now: 400 naming k1, nothing
    released, and a good acceptance still gets the key."""
    stack = start_trade(tmp_path / "trade", merchants={"shop": "JPY"})
    try:
        (tmp_path / "film.bin").write_bytes(b"film" * 100)
        stack.merchants["shop"].config.products = {"film": (tmp_path / "film.bin", "A film")}
        with httpx.Client(timeout=30) as http:
            s = stack.open(http, stack.customer("alice", 50_00), 2_00, unit=10)
            C.buy(http, s, "film", 1)
            base = f"{s.merchant_url}/v1/sessions/{s.session}/purchases/1"
            data = http.get(f"{base}/offer", params={"pseudonym": s.pseudonym}).json()
            offer = V.Offer(data["description"].encode(), data["signature"],
                            base64.b64decode(data["ciphertext"]))
            bad = V.accept(s.session_key, offer, b"\x00" * 32, int(time.time()))
            got = http.post(f"{base}/accept", content=bad)
            assert got.status_code == 400 and "k1" in got.text, got.text
            row = first_row(stack.acquirer.engine, D.acq_deliveries, session=s.session)
            assert row is not None and row["accepted"] is None
            assert buyer.fetch(http, s).plaintext == b"film" * 100
    finally:
        stack.close()


def test_a_dispute_judged_with_the_merchants_fi_certificate(tmp_path: Path) -> None:
    """The dispute package was judged with whatever merchant key the customer printed: a
    customer could sign a false description with a key of its own, re-sign its acceptance,
    and get 'mismatch' against the merchant. Now the command writes the merchant's FI's
    certificate of the merchant's key for the session beside the package, and the judge
    takes the key from it with that FI's public key: a made-up key is 'invalid'."""
    stack = start_trade(tmp_path / "trade", merchants={"shop": "JPY"})
    try:
        film = b"film" * 100
        (tmp_path / "film.bin").write_bytes(film)
        stack.merchants["shop"].config.products = {"film": (tmp_path / "film.bin", "A film")}
        with httpx.Client(timeout=30) as http:
            s = stack.open(http, stack.customer("alice", 50_00), 2_00, unit=10)
            C.buy(http, s, "film", 1)
        state = tmp_path / "session.json"
        C.save(state, s)
        out = tmp_path / "film.out"
        r = CliRunner().invoke(svcard_main, ["session", "product", "--state", str(state),
                                             "--out", str(out), "--json"])
        assert r.exit_code == 0, r.output
        shown = json.loads(r.output)
        assert shown["merchant_fi"] == "acq1" and Path(shown["merchant_cert"]).exists()
        fi = ["--fi-key", stack.parties["acq1"].public.hex()]
        judge = ["session", "dispute-verify", "--session-key", shown["session_key"], "--json"]
        r = CliRunner().invoke(svcard_main, [*judge, shown["dispute"], "--merchant-cert",
                                             shown["merchant_cert"], *fi])
        assert r.exit_code == 0 and json.loads(r.output)["outcome"] == "matches", r.output
        # the customer's forgery: its own "merchant" key signs a description whose product
        # hash is false; its acceptance is signed again by the session key
        package = json.loads(Path(shown["dispute"]).read_bytes())
        fake, fake_public = S.new_key()
        package["description"]["plaintext"] = "00" * 32
        raw = S.canonical(package["description"])
        package["description_sig"] = S.sign(fake, V.DESCRIPTION, raw)
        body = {**package["acceptance"]["acceptance"], "description": M.digest(raw)}
        package["acceptance"] = {"acceptance": body, "sig": S.sign(
            s.session_key, V.ACCEPTANCE, S.canonical(body))}
        forged = tmp_path / "forged.dispute"
        forged.write_bytes(S.canonical(package))
        r = CliRunner().invoke(svcard_main, [*judge, str(forged), "--merchant-key",
                                             fake_public.hex()])
        assert json.loads(r.output)["outcome"] == "mismatch"       # the judge fooled
        r = CliRunner().invoke(svcard_main, [*judge, str(forged), "--merchant-cert",
                                             shown["merchant_cert"], *fi])
        assert r.exit_code == 3 and json.loads(r.output)["outcome"] == "invalid", r.output
        # a certificate of another FI, or for another session, proves no merchant's key
        rogue, _ = S.new_key()
        other = tmp_path / "other.cert"
        other.write_bytes(certs.issue(rogue, "acq1", s.session, fake_public, int(time.time())))
        r = CliRunner().invoke(svcard_main, [*judge, str(forged), "--merchant-cert",
                                             str(other), *fi])
        assert r.exit_code == 3 and "not signed by this FI" in r.output, r.output
    finally:
        stack.close()


def test_a_purse_session_resumed_after_its_certificates_short_life_still_opens(
        purse_world: PurseWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The card paid and the session opened, but the receipt was lost; the customer resumes
    eleven minutes later. The signed 'opened' answer is the one made at opening, and its
    merchant certificate (600 s) was checked against the clock of the resume: 'expired', so
    the session the card paid for could not be used (and no session file was written to
    load its rest back with). Now the customer checks the certificate its own account
    manager signed in that answer for its signature and session, not its age."""
    w = purse_world
    made = w.trade.customer("alice", 100_00, "CNY")
    card = card_image(tmp_path, ep=20_00)
    journal = Journal(tmp_path / "journal.jsonl")
    txn = secrets.token_hex(16)
    key = PA.session_key(made.key, txn)
    with httpx.Client(timeout=30) as http:
        body, headers = C.initiation("alice", made.key, S.public_of(key), "shop", "op1",
                                     Amount(5_00, "CNY"), "session", 0, txn=txn)
        order = http.post(f"{w.trade.am.url}/v1/purse/orders", content=body,
                          headers=headers).json()
        with open_reader(f"virtual:{card}") as reader:
            paid = pay_client.pay(str(order["checkout_url"]), reader, journal=journal,
                                  http=http)
        later = time.time() + 660
        monkeypatch.setattr(C.time, "time", lambda: later)     # the customer's clock only
        s = PA._opened(http, w.trade.am.url, w.trade.am.public, made.key, "shop",
                       w.trade.url("shop"), Amount(5_00, "CNY"), paid.receipt, 1)
        monkeypatch.undo()
        assert s.purse_order == order["order"]
        C.buy(http, s, "tea", 2)


def test_a_session_recovered_after_the_certificates_life_keeps_its_merchant_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mediating agent's acknowledgement was lost on its way to the account manager,
    which settled the session by its signed lookup eleven minutes later: the merchant's
    certificate inside that (authentic, signed) acknowledgement was checked against the
    clock of the recovery, 'expired', and the session opened with no merchant key: none of
    its digital products could ever be fetched. Now its age is not held against it."""
    clock = Clock()
    stack = start_trade(tmp_path / "trade", clock=clock, close_seconds=3600)
    try:
        am = stack.account
        real = type(am)._post

        async def lost(http: Any, url: str, body: bytes, headers: dict[str, str]) -> Any:
            answer = await real(http, url, body, headers)
            return "the answer was lost" if url.endswith("/v1/initiations") else answer
        monkeypatch.setattr(type(am), "_post", staticmethod(lost))
        who = stack.customer("alice", 50_00)
        with httpx.Client(timeout=30) as http, pytest.raises(C.TradeError):
            stack.open(http, who, 2_00, unit=10)
        row = first_row(am.engine, D.am_sessions, customer="alice")
        assert row is not None and row["state"] == D.IN_DOUBT
        clock.offset = 660
        assert asyncio.run(am.recover(older_than_ms=0))["open"] == 1
        row = first_row(am.engine, D.am_sessions, customer="alice")
        assert row is not None and row["state"] == D.OPEN
        assert json.loads(row["opened"])["merchant_cert"], "opened with no merchant key"
    finally:
        stack.close()
