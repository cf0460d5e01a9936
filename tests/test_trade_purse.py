"""Issue 15 point 7: a purse card funds a trading session. Real servers on loopback: the
trading servers, seed 002's payment server (with its PSAM pool; the account manager is one of
its merchants) and load server (with its HSM; the account manager is one of its banks), and a
real card image. One card purchase pays the deposit, many micropayments run inside the
session, and one load puts the unspent rest back on the same card. Then the attacker's cases:
a confirmation of another order (another amount, another session), a replayed confirmation,
the rest loaded twice or onto another card, and the account manager stopped between the
card's payment and the session's opening."""

from __future__ import annotations

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
from sqlalchemy import func, select

from svcard.card.storage import read_image
from svcard.host.demo.system import card_image
from svcard.host.kit.db import first_row
from svcard.host.load import client as LC
from svcard.host.load.server.app import BankAccount
from svcard.host.load.stack import DEMO_LOAD_TERMINAL, LoadStack, start_load_stack
from svcard.host.pay.server.app import MerchantAccount
from svcard.host.pay.stack import Stack, start_stack
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.online import PaymentRefused
from svcard.host.terminal.purse import CardInfo, select_purse
from svcard.host.terminal.reader_specs import open_reader
from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade import records
from svcard.host.trade import signing as S
from svcard.host.trade.config import PurseSettings
from svcard.host.trade.money import Amount, ExchangeTable
from svcard.host.trade.server import purse as PD
from svcard.host.trade.server import purse_agent as PA
from svcard.host.trade.server.account import AccountManager
from svcard.host.trade.stack import DEMO_RATES, TradeStack, start_trade
from svcard.protocols import messages as PM

AM_MERCHANT = b"AMTRADE1"
AM_BANK = b"AMBANK01"


@dataclass
class World:
    trade: TradeStack
    pay: Stack
    load: LoadStack
    folder: Path

    def settings(self) -> PurseSettings:
        purse = self.trade.account.config.purse
        assert purse is not None
        return purse


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    now = int(time.time() * 1000)
    table = ExchangeTable.from_text("bank-m", "EUR", {**DEMO_RATES, "CNY": "7.8123"},
                                    now - 60_000, now + 86_400_000)
    trade = start_trade(tmp_path / "trade", table=table)
    pay = start_stack(tmp_path / "pay", psams=1)
    load = start_load_stack(tmp_path / "load")
    pay_key, load_key = os.urandom(32), os.urandom(32)
    pay.payment_server.config.merchants[AM_MERCHANT] = MerchantAccount(
        AM_MERCHANT, pay_key, frozenset({PM.FIG6_SERVER_COMPARES}))
    load.load_server.config.banks[AM_BANK] = BankAccount(AM_BANK, load_key)
    trade.account.config.purse = PurseSettings(
        AM_MERCHANT, pay_key, pay.payment.url, pay.payment_server.pool.terminal_id, AM_BANK,
        load_key, load.load.url, DEMO_LOAD_TERMINAL, "CNY", 156, trade.am.url)
    yield World(trade, pay, load, tmp_path)
    trade.close()
    pay.close()
    load.close()


def card_info(card: Path) -> CardInfo:
    with open_reader(f"virtual:{card}") as reader:
        return select_purse(reader)


def cleared(http: httpx.Client, s: C.Session) -> int:
    """The rest, once the account manager has the clearing (delivered by the mediating
    agent right after it cleared; polled with a deadline)."""
    deadline = time.monotonic() + 20
    while (rest := PA.rest(http, s)) is None:
        assert time.monotonic() < deadline, "the account manager never got the clearing"
        time.sleep(0.05)
    return rest


def balance(card: Path) -> int:
    return int(read_image(card)["app"]["ep"]["balance"])


class Recorder:
    """The client's HTTP exchanges, to replay what it sent (the attacker holds a copy)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def __call__(self, request: httpx.Request) -> None:
        if request.method == "POST":
            self.sent.append((str(request.url), request.read()))

    def confirmation(self) -> tuple[str, bytes]:
        return next((u, b) for u, b in reversed(self.sent) if "/v1/purse/" in u and
                    u.endswith("/status"))


def open_purse(w: World, http: httpx.Client, card: Path, who: C.Session | None = None,
               customer: str = "alice", deposit: int = 5_00,
               journal: Journal | None = None) -> C.Session:
    if first_row(w.trade.account.engine, D.am_customers, id=customer) is None:
        w.trade.customer(customer, 100_00, "CNY")
    key = customer_keys[customer]
    with open_reader(f"virtual:{card}") as reader:
        return PA.open_session(http, w.trade.am.url, w.trade.am.public, customer, key, "shop",
                               w.trade.url("shop"), "op1", Amount(deposit, "CNY"), reader,
                               journal or Journal(w.folder / "journal.jsonl"), unit=1)


customer_keys: dict[str, bytes] = {}


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep each customer's private key (TradeStack.customer makes a fresh one)."""
    customer_keys.clear()
    real = TradeStack.customer

    def customer(self: TradeStack, cid: str, limit: int = 100_000,
                 currency: str = "EUR") -> Any:
        made = real(self, cid, limit, currency)
        customer_keys[cid] = made.key
        return made
    monkeypatch.setattr(TradeStack, "customer", customer)


def sessions_of(w: World, customer: str) -> int:
    with w.trade.account.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(D.am_sessions).where(
            D.am_sessions.c.customer == customer)).scalar_one())


def test_a_card_funds_a_session_and_takes_the_rest_back(world: World, tmp_path: Path) -> None:
    w = world
    card = card_image(tmp_path, ep=30_00)
    journal = Journal(tmp_path / "journal.jsonl")
    with httpx.Client(timeout=30) as http:
        s = open_purse(w, http, card, deposit=20_00, journal=journal)
        assert balance(card) == 10_00                       # one card purchase: the deposit
        assert s.deposit == 20_00 and s.currency == "CNY" and s.purse_order
        assert s.length >= 300
        for _ in range(300):                                # hundreds of micropayments,
            C.buy(http, s, "tea", 1)                        # not one of them on the card
        got = C.close(http, s)
        c = got["clearing"]
        assert c["outcome"] == "agreed" and c["paid"] == 300
        rest = c["returned"]
        assert 0 < rest < 20_00 and cleared(http, s) == rest
        with open_reader(f"virtual:{card}") as reader:
            loaded = PA.load_rest(http, s, reader, journal)
        assert loaded is not None and loaded.outcome == "loaded" and loaded.amount == rest
    assert balance(card) == 10_00 + rest                    # the rest back on the same card
    row = first_row(w.trade.account.engine, D.am_purse, order_id=s.purse_order)
    assert row is not None and (row["state"], row["load_state"]) == ("open", "loaded")
    assert row["tac"] and row["card_serial"] == card_info(card).app_serial.lower()
    bill = json.loads((w.folder / "trade" / "billing-am1" / "withdrawals" /
                       f"{s.session}.json").read_text())
    assert bill["funding"] == "purse" and bill["purse"]["amount"] == 20_00
    assert bill["purse"]["tac"] == row["tac"]
    assert bill["load"] == {"amount": rest, "state": "loaded", "txn": row["load_txn"]}
    assert bill["returned"] == rest and bill["amount"] == 20_00 - rest
    book = records.books([w.trade.acquirer.engine], [w.trade.account.engine],
                         [w.trade.merchant_account.engine])
    assert book.clean, book.problems


def test_the_rest_is_loaded_once_and_only_onto_the_card_that_paid(world: World,
                                                                  tmp_path: Path) -> None:
    w = world
    card, other = card_image(tmp_path, ep=20_00), card_image(tmp_path, "other.json", ep=0)
    journal = Journal(tmp_path / "journal.jsonl")
    with httpx.Client(timeout=30) as http:
        s = open_purse(w, http, card, journal=journal)
        C.buy(http, s, "tea", 10)
        with open_reader(f"virtual:{card}") as reader, \
                pytest.raises(C.TradeError, match="not cleared yet"):
            PA.load_rest(http, s, reader, journal)
        rest = C.close(http, s)["clearing"]["returned"]
        assert cleared(http, s) == rest
        secret = PD.load_secret(s.session_key, s.purse_order)
        bank = f"{w.trade.am.url}/v1/purse/bank"
        with open_reader(f"virtual:{other}") as reader, \
                pytest.raises(PaymentRefused, match="only the card that paid"):   # another card
            LC.load(bank, reader, account=s.purse_order, secret=secret, amount=rest,
                    journal=journal, http=http)
        with open_reader(f"virtual:{card}") as reader:
            with pytest.raises(PaymentRefused, match="wrong secret"):
                LC.load(bank, reader, account=s.purse_order, secret="ab" * 64, amount=rest,
                        journal=journal, http=http)
            with pytest.raises(PaymentRefused, match="rest due to this card"):
                LC.load(bank, reader, account=s.purse_order, secret=secret, amount=rest + 1,
                        journal=journal, http=http)
            assert PA.load_rest(http, s, reader, journal) is not None
            after = balance(card)
            with pytest.raises(C.TradeError, match="loaded already"):   # the rest twice
                PA.load_rest(http, s, reader, journal)
    assert balance(card) == after == 15_00 + rest and balance(other) == 0


def test_a_load_under_way_blocks_a_second_one(world: World, tmp_path: Path) -> None:
    w = world
    card = card_image(tmp_path, ep=20_00)
    with httpx.Client(timeout=30) as http:
        s = open_purse(w, http, card)
        rest = C.close(http, s)["clearing"]["returned"]
        assert cleared(http, s) == rest
        start = {"account": s.purse_order, "secret": PD.load_secret(s.session_key,
                                                                    s.purse_order),
                 "amount": rest, "request_id": "first-request",
                 "card": {"serial": card_info(card).app_serial,
                          "issuer_id": card_info(card).issuer_id,
                          "balance": 15_00, "currency_code": 156}}
        first = http.post(f"{w.trade.am.url}/v1/purse/bank/start", json=start)
        if first.status_code == 400 and "serial" in first.text:
            pytest.skip(f"card fields: {first.text}")
        assert first.status_code == 200, first.text
        again = http.post(f"{w.trade.am.url}/v1/purse/bank/start", json=start)
        assert again.status_code == 200 and again.json()["txn_id"] == first.json()["txn_id"]
        other = http.post(f"{w.trade.am.url}/v1/purse/bank/start",
                          json={**start, "request_id": "second-request"})
        assert other.status_code == 409 and "under way" in other.text


def test_a_confirmation_of_another_order_opens_nothing(world: World, tmp_path: Path) -> None:
    """Two orders of one customer (5.00 and 1.00); the card pays the 1.00 one. Its
    confirmation is aimed at the 5.00 order: refused (another amount, another session's
    order); sent again to its own order it opens the same session, never a second one."""
    w = world
    card = card_image(tmp_path, ep=20_00)
    w.trade.customer("alice", 100_00, "CNY")
    key = customer_keys["alice"]
    txn = secrets.token_hex(16)
    body, headers = C.initiation("alice", key, S.public_of(PA.session_key(key, txn)),
                                 "shop", "op1", Amount(5_00, "CNY"), "session", 0, txn=txn)
    big = httpx.post(f"{w.trade.am.url}/v1/purse/orders", content=body, headers=headers)
    assert big.status_code == 200, big.text
    recorder = Recorder()
    with httpx.Client(timeout=30, event_hooks={"request": [recorder]}) as http:
        s = open_purse(w, http, card, deposit=1_00)
        url, confirmation = recorder.confirmation()
        aimed = http.post(big.json()["checkout_url"].replace("/checkout", "/status"),
                          content=confirmation)
        assert aimed.status_code == 400 and "not for this order" in aimed.text
        row = first_row(w.trade.account.engine, D.am_purse, order_id=big.json()["order"])
        assert row is not None and row["state"] == "ordered" and row["session"] is None
        replay = http.post(url, content=confirmation)           # the same evidence again
        assert replay.status_code == 200
        assert replay.json()["receipt"]["session"] == s.session
    assert sessions_of(w, "alice") == 1
    who = first_row(w.trade.account.engine, D.am_customers, id="alice")
    assert who is not None and who["reserved"] == 1_00          # reserved once
    assert balance(card) == 19_00                               # debited once


def test_a_forged_or_truncated_confirmation_is_refused(world: World, tmp_path: Path) -> None:
    w = world
    card = card_image(tmp_path, ep=20_00)
    recorder = Recorder()
    with httpx.Client(timeout=30, event_hooks={"request": [recorder]}) as http:
        open_purse(w, http, card, deposit=1_00)
        url, confirmation = recorder.confirmation()
        for bad in (confirmation[:-3], confirmation[:20] + bytes([confirmation[20] ^ 1]) +
                    confirmation[21:], b"x" * 5000):
            answer = http.post(url, content=bad)
            assert answer.status_code in (400, 409, 413), answer.text
        assert http.post(url.replace(url.split("/")[-2], "0" * 32),
                         content=confirmation).status_code == 404


def test_the_account_manager_stopped_between_payment_and_opening(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The card paid and the desk recorded the payment; the account manager stops before
    the session opens. After its restart the customer agent resumes from its journal: the
    same payment opens its session, once, and the card was debited once."""
    w = world
    card = card_image(tmp_path, ep=20_00)
    journal = Journal(tmp_path / "journal.jsonl")

    async def dies(self: AccountManager, data: dict[str, Any], digest: str) -> Any:
        raise RuntimeError("the account manager stops here")
    real = AccountManager.open_initiation
    monkeypatch.setattr(AccountManager, "open_initiation", dies)
    with httpx.Client(timeout=30) as http:
        with pytest.raises(C.TradeError, match="resume"):
            open_purse(w, http, card, journal=journal)
        assert balance(card) == 15_00
        assert sessions_of(w, "alice") == 0
        monkeypatch.setattr(AccountManager, "open_initiation", real)
        w.trade.restart("am1")
        with open_reader(f"virtual:{card}") as reader:
            s = PA.resume(http, w.trade.am.url, w.trade.am.public, customer_keys["alice"],
                          "shop", w.trade.url("shop"), Amount(5_00, "CNY"), reader, journal,
                          unit=1)
        C.buy(http, s, "tea", 2)
        assert C.close(http, s)["clearing"]["paid"] == 2
    assert balance(card) == 15_00 and sessions_of(w, "alice") == 1


def test_a_session_that_cannot_open_owes_the_whole_deposit_back(world: World,
                                                               tmp_path: Path) -> None:
    w = world
    card = card_image(tmp_path, ep=20_00)
    w.trade.acquirer.config.merchants.pop("shop")      # the mediating agent will refuse
    with httpx.Client(timeout=30) as http, pytest.raises(C.TradeError, match="due back"):
        open_purse(w, http, card)
    (row,) = [r for r in [first_row(w.trade.account.engine, D.am_purse, customer="alice")]
              if r is not None]
    assert (row["state"], row["rest"], row["load_state"]) == ("refused", 5_00, "due")
    key = PA.session_key(customer_keys["alice"], row["txn"])
    with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
        out = LC.load(f"{w.trade.am.url}/v1/purse/bank", reader, account=row["order_id"],
                      secret=PD.load_secret(key, row["order_id"]), amount=5_00,
                      journal=Journal(tmp_path / "j2.jsonl"), http=http)
    assert out.outcome == "loaded" and balance(card) == 20_00


def test_an_order_in_another_currency_or_over_the_limit_is_refused_before_paying(
        world: World) -> None:
    w = world
    w.trade.customer("bob", 1_00, "CNY")
    key = customer_keys["bob"]
    for deposit, why in ((Amount(5_00, "CNY"), 402), (Amount(50, "EUR"), 400)):
        body, headers = C.initiation("bob", key, os.urandom(32), "shop", "op1", deposit,
                                     "session", 0)
        answer = httpx.post(f"{w.trade.am.url}/v1/purse/orders", content=body,
                            headers=headers)
        assert answer.status_code == why, answer.text


def test_the_command_line_open_purse_close_and_load_rest(world: World, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from svcard.host.cli.main import main
    from svcard.host.trade.signing import write_private_key

    def run(*args: str) -> Any:
        return CliRunner().invoke(main, list(args), prog_name="svcard")

    w = world
    card = card_image(tmp_path, ep=20_00)
    w.trade.customer("alice", 100_00, "CNY")
    key, state, journal = tmp_path / "alice.key", tmp_path / "s.json", tmp_path / "j.jsonl"
    write_private_key(key, customer_keys["alice"])
    spec = f"virtual:{card}"
    r = run("session", "open", w.trade.am.url, "--account-id", "am1", "--account-key",
            w.trade.am.public.hex(), "--customer", "alice", "--key", str(key), "--merchant",
            "shop", "--merchant-url", w.trade.url("shop"), "--operator", "op1", "--deposit",
            "5.00", "--currency", "CNY", "--unit", "1", "--state", str(state), "--purse",
            spec, "--journal", str(journal))
    assert r.exit_code == 0, r.output
    assert "deposit 5.00 CNY" in r.output and balance(card) == 15_00
    r = run("session", "load-rest", "--state", str(state), "--purse", spec, "--journal",
            str(journal))
    assert r.exit_code == 1 and "not cleared yet" in r.output
    r = run("session", "buy", "tea", "--units", "7", "--state", str(state))
    assert r.exit_code == 0, r.output
    r = run("session", "close", "--state", str(state), "--json")
    assert r.exit_code == 0, r.output
    rest = cleared(httpx.Client(timeout=30), C.load(state))
    r = run("session", "load-rest", "--state", str(state), "--purse", spec, "--journal",
            str(journal))
    assert r.exit_code == 0 and "loaded" in r.output, r.output
    assert balance(card) == 15_00 + rest
    r = run("session", "load-rest", "--state", str(state), "--purse", spec, "--journal",
            str(journal))
    assert r.exit_code == 1 and "loaded already" in r.output
    assert balance(card) == 15_00 + rest


def test_the_purse_desk_from_the_account_managers_file(tmp_path: Path) -> None:
    from svcard.host.kit.config import ConfigError
    from svcard.host.trade.config import server_config

    base = f"""id = "am1"
key = "{"11" * 32}"
[[operator]]
id = "op1"
acquirer = "acq1"
url = "http://127.0.0.1:9"
public_key = "{"22" * 32}"
[purse]
merchant_id = "414D545241444531"
payment_key = "{"33" * 32}"
payment_url = "http://127.0.0.1:8081/"
payment_terminal = "000000000001"
bank_id = "414D42414E4B3031"
load_key = "{"44" * 32}"
load_url = "http://127.0.0.1:8082"
load_terminal = "000000000009"
currency = "CNY"
currency_code = 156
public_url = "http://127.0.0.1:8100"
"""
    path = tmp_path / "am.toml"
    path.write_text(base)
    config = server_config("account-manager", path)
    purse = getattr(config, "purse", None)
    assert isinstance(purse, PurseSettings)
    assert (purse.merchant_id, purse.payment_url, purse.currency_code) == (
        AM_MERCHANT, "http://127.0.0.1:8081", 156)
    assert "33" * 32 not in repr(config) and "44" * 32 not in repr(config)
    path.write_text(base.replace('payment_terminal = "000000000001"',
                                 'payment_terminal = "0001"'))
    with pytest.raises(ConfigError, match=r"am\.toml.*purse\.payment_terminal"):
        server_config("account-manager", path)


@pytest.mark.parametrize("lost", ["/v1/purse/bank/start", "/v1/purse/bank/status/"])
def test_a_lost_answer_of_the_rests_load_is_resumed_never_doubled(world: World,
                                                                  tmp_path: Path,
                                                                  lost: str) -> None:
    """The desk's answer to the load's start (or to its confirmation) is lost: the card
    agent's journal resumes the same load (the same request id: the same load transaction),
    and the rest lands on the card once."""
    w = world
    card = card_image(tmp_path, ep=20_00)
    journal = Journal(tmp_path / "journal.jsonl")
    dropped = []

    def drop(response: httpx.Response) -> None:
        if lost in str(response.request.url) and not dropped:
            dropped.append(response.request.url)
            raise httpx.ReadError("the answer was lost", request=response.request)
    with httpx.Client(timeout=30) as http:
        s = open_purse(w, http, card, journal=journal)
        C.buy(http, s, "tea", 4)
        rest = C.close(http, s)["clearing"]["returned"]
        assert cleared(http, s) == rest
    with httpx.Client(timeout=30, event_hooks={"response": [drop]}) as http, \
            open_reader(f"virtual:{card}") as reader, pytest.raises(httpx.ReadError):
        PA.load_rest(http, s, reader, journal)
    assert dropped
    with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
        report = LC.resume_loads(reader, journal=journal, http=http)
        assert report, "nothing to resume"
        if lost.endswith("start"):      # the card never saw that load: "not loaded", due
            assert report[-1]["outcome"] == "not loaded", report     # again: load it now
            out = PA.load_rest(http, s, reader, journal)
            assert out is not None and out.outcome == "loaded"
        with pytest.raises(C.TradeError, match="loaded already"):
            PA.load_rest(http, s, reader, journal)
    row = first_row(w.trade.account.engine, D.am_purse, order_id=s.purse_order)
    assert row is not None and row["load_state"] == "loaded"
    assert balance(card) == 15_00 + rest


def test_raced_confirmations_open_one_session(world: World, tmp_path: Path) -> None:
    """The card's confirmation is held back (its first post never arrives) and then sent 8
    times at once: one session opens, reserved once; those that came while it was opening
    answer 503 (ask again), and asking again answers that same session."""
    from concurrent.futures import ThreadPoolExecutor

    w = world
    card = card_image(tmp_path, ep=20_00)
    recorder = Recorder()

    def hold_back(request: httpx.Request) -> None:
        recorder(request)
        if "/v1/purse/" in str(request.url) and str(request.url).endswith("/status"):
            raise httpx.ConnectError("held back", request=request)
    with httpx.Client(timeout=30, event_hooks={"request": [hold_back]}) as http, \
            pytest.raises(C.TradeError, match="resume"):
        open_purse(w, http, card, deposit=2_00)
    url, confirmation = recorder.confirmation()
    assert balance(card) == 18_00 and sessions_of(w, "alice") == 0

    def post(_: int) -> httpx.Response:
        return httpx.post(url, content=confirmation, timeout=30)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(8)))
    assert {a.status_code for a in answers} <= {200, 503}, [a.text for a in answers]
    opened = {a.json()["receipt"]["session"] for a in answers if a.status_code == 200}
    final = httpx.post(url, content=confirmation, timeout=30)
    assert final.status_code == 200
    assert opened <= {final.json()["receipt"]["session"]}
    assert sessions_of(w, "alice") == 1
    who = first_row(w.trade.account.engine, D.am_customers, id="alice")
    assert who is not None and who["reserved"] == 2_00
