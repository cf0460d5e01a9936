"""Issue 15 point 7, the account manager SIGKILLed between the card's purchase and the
session's opening: the account manager runs as a real process (``svcard serve
trade-account-manager`` from its TOML file, with its ``[purse]`` desk); the card has paid the
deposit at the payment server, and the process is killed just before the payment's
confirmation reaches it. After a restart, the customer agent resumes from its journal: the
same payment opens its session once, the card was debited once, and at the end the rest is
loaded back onto it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from test_trade_purse import (  # noqa: F401  (the fixtures and helpers, not its tests)
    World,
    _keys,
    balance,
    cleared,
    customer_keys,
    sessions_of,
    world,
)

from svcard.host.demo.system import card_image
from svcard.host.kit.db import first_row
from svcard.host.kit.serving import wait_http
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader
from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade.money import Amount
from svcard.host.trade.server import purse_agent as PA

SVCARD = str(Path(sys.executable).parent / "svcard")


class AmProcess:
    def __init__(self, w: World) -> None:
        t = w.trade
        self.port = int(t.am.url.rsplit(":", 1)[1])
        self.url = t.am.url
        p = w.settings()
        folder = w.folder / "trade"
        self.config = w.folder / "am1.toml"
        self.config.write_text(
            f'id = "am1"\nkey = "{t.parties["am1"].key.hex()}"\n'
            f'db = "sqlite:///{folder / "am1.db"}"\nbilling = "{folder / "billing-am1"}"\n'
            f'[[operator]]\nid = "op1"\nacquirer = "acq1"\nurl = "{t.url("acq1")}"\n'
            f'public_key = "{t.parties["acq1"].public.hex()}"\n'
            f'[purse]\nmerchant_id = "{p.merchant_id.hex()}"\n'
            f'payment_key = "{p.payment_key.hex()}"\npayment_url = "{p.payment_url}"\n'
            f'payment_terminal = "{p.payment_terminal.hex()}"\nbank_id = "{p.bank_id.hex()}"\n'
            f'load_key = "{p.load_key.hex()}"\nload_url = "{p.load_url}"\n'
            f'load_terminal = "{p.load_terminal.hex()}"\ncurrency = "CNY"\n'
            f'currency_code = 156\npublic_url = "{self.url}"\n')
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [SVCARD, "serve", "trade-account-manager", "--config", str(self.config), "--port",
             str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(self.url + "/v1/health", timeout=60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def test_the_account_manager_sigkilled_between_the_purchase_and_the_opening(
        world: World, tmp_path: Path) -> None:  # noqa: F811  (the fixture)
    w = world
    w.trade.customer("alice", 100_00, "CNY")
    w.trade.parties["am1"].thread.stop()           # the account manager becomes a process
    w.trade.account.close()
    am = AmProcess(w)
    am.start()
    card = card_image(tmp_path, ep=20_00)
    journal = Journal(tmp_path / "journal.jsonl")
    killed = []

    def kill_before_the_confirmation(request: httpx.Request) -> None:
        if "/v1/purse/" in str(request.url) and str(request.url).endswith("/status") \
                and not killed:
            am.kill()                              # the card has paid; SIGKILL now
            killed.append(str(request.url))
    try:
        with httpx.Client(timeout=30,
                          event_hooks={"request": [kill_before_the_confirmation]}) as http, \
                open_reader(f"virtual:{card}") as reader, \
                pytest.raises(C.TradeError, match="resume"):
            PA.open_session(http, am.url, w.trade.am.public, "alice", customer_keys["alice"],
                            "shop", w.trade.url("shop"), "op1", Amount(5_00, "CNY"), reader,
                            journal, unit=1)
        assert killed and balance(card) == 15_00 and sessions_of(w, "alice") == 0
        row = first_row(w.trade.account.engine, D.am_purse, customer="alice")
        assert row is not None and row["state"] == "ordered"     # it never saw the payment
        am.start()
        with httpx.Client(timeout=30) as http:
            with open_reader(f"virtual:{card}") as reader:
                s = PA.resume(http, am.url, w.trade.am.public, customer_keys["alice"], "shop",
                              w.trade.url("shop"), Amount(5_00, "CNY"), reader, journal,
                              unit=1)
            C.buy(http, s, "tea", 5)
            rest = C.close(http, s)["clearing"]["returned"]
            assert cleared(http, s) == rest
            with open_reader(f"virtual:{card}") as reader:
                out = PA.load_rest(http, s, reader, journal)
        assert out is not None and out.outcome == "loaded"
        assert balance(card) == 15_00 + rest and sessions_of(w, "alice") == 1
    finally:
        am.kill()
