"""The payment gateway SIGKILLed between a real card's purse debit and the approval, as a real
process (``svcard serve wallet-gateway`` with a ``[purse]`` section), and started again: the
card is debited once, and the purchase is approved only with that debit.

Crash points (``SVCARD_WALLET_CRASH``): ``gateway-after-purse`` (the payment server verified
the card's debit and the helper brought the confirmation; the gateway dies before recording
it) and ``gateway-after-purse-paid`` (recorded; the answer never sent). Either way the card
helper's journal keeps the payment past the debit; its resume brings the same confirmation
again, the gateway records it once, and only then does the mall's request approve. The card
is charged first with cash from an agent: the financial system's report of it makes the load
order, which the load flow pays out to the purse."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_wallet_attack import new_purchase, signed
from test_wallet_faults import wait_for

from svcard.host.kit.serving import ServerThread, free_port, wait_http
from svcard.host.load import client as LC
from svcard.host.load.stack import DEMO_BANK_ID, DEMO_LOAD_TERMINAL, start_load_stack
from svcard.host.pay import client as PC
from svcard.host.pay.server.app import MerchantAccount
from svcard.host.pay.stack import start_stack
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader
from svcard.host.wallet.base import CRASH_ENV
from svcard.host.wallet.config import WebConfig
from svcard.host.wallet.links import LinkClient
from svcard.host.wallet.web.app import WebServer
from svcard.protocols import messages as M

SVCARD = str(Path(sys.executable).parent / "svcard")
MALL = "MALL001"
MERCHANT = b"MALLPAY2"


class World:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pay = start_stack(folder / "pay", psams=1)
        merchant_key = os.urandom(32)
        self.pay.payment_server.config.merchants[MERCHANT] = MerchantAccount(
            MERCHANT, merchant_key, frozenset({M.FIG6_SERVER_COMPARES}))
        self.load = start_load_stack(folder / "load")
        self.ports = {n: free_port() for n in ("fin", "gateway")}
        self.url = {n: f"http://127.0.0.1:{p}" for n, p in self.ports.items()}
        self.keys = {n: secrets.token_bytes(32) for n in ("fin", "web", "mall", "agent")}
        k = {n: v.hex() for n, v in self.keys.items()}
        (folder / "fin.toml").write_text(
            f'secret_key = "{secrets.token_hex(32)}"\nmail_dir = "mail"\n'
            f'gateway_url = "{self.url["gateway"]}"\n'
            f'[[gateway]]\nid = "gateway"\nkey = "{k["fin"]}"\n'
            f'[[agent]]\nid = "AGENT1"\nkey = "{k["agent"]}"\n')
        (folder / "gateway.toml").write_text(
            f'secret_key = "{secrets.token_hex(32)}"\n'
            f'fin_url = "{self.url["fin"]}"\nfin_key = "{k["fin"]}"\n'
            f'[[web]]\nid = "web"\nkey = "{k["web"]}"\n'
            f'[[mall]]\nid = "{MALL}"\nkey = "{k["mall"]}"\norigin = "http://localhost:9999"\n'
            f'[purse]\npublic_url = "{self.url["gateway"]}"\n'
            f'payment_url = "{self.pay.payment.url}"\n'
            f'payment_terminal_id = "{self.pay.payment_server.pool.terminal_id.hex()}"\n'
            f'load_url = "{self.load.load.url}"\n'
            f'load_terminal_id = "{DEMO_LOAD_TERMINAL.hex()}"\n'
            f'bank_id = "{DEMO_BANK_ID.hex()}"\nbank_key = "{self.load.shared_key.hex()}"\n'
            f'[[purse.merchant]]\nmall = "{MALL}"\nmerchant_id = "{MERCHANT.hex()}"\n'
            f'key = "{merchant_key.hex()}"\n')
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.http = httpx.Client(timeout=30)
        self.web = WebServer(WebConfig(self.url["gateway"], self.keys["web"],
                                       db_url=f"sqlite:///{folder / 'web.db'}"))
        self.web_thread = ServerThread(self.web.app()).start()

    def start(self, name: str, crash: str | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
        if crash:
            env[CRASH_ENV] = crash
        self.procs[name] = subprocess.Popen(
            [SVCARD, "serve", f"wallet-{name}", "--config", str(self.folder / f"{name}.toml"),
             "--db", f"sqlite:///{self.folder / f'{name}.db'}", "--port",
             str(self.ports[name]), "--log-level", "warning"], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"{self.url[name]}/v1/health", timeout=60)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
        self.web_thread.stop()
        self.web.close()
        self.http.close()
        self.load.close()
        self.pay.close()

    def link(self, name: str, party: str, key: str) -> LinkClient:
        return LinkClient(self.http, self.url[name], party, self.keys[key])

    def real_card(self, member: str, cash: int) -> dict[str, Any]:
        """A real card issued to ``member``, charged with cash and loaded (the load order
        made from the financial system's report)."""
        web = self.link("gateway", "web", "web")
        status, card = web.post("/v1/wallet/issue", {"member": member, "kind": "real",
                                                     "ref": secrets.token_hex(8)})
        assert status == 200, card
        number = card["number"]
        secret = (self.folder / "mail" / f"{number}.letter.txt").read_text() \
            .split("secret: ")[1].strip()
        status, moved = self.link("fin", "AGENT1", "agent").post("/v1/topups", {
            "ref": "cash-" + secrets.token_hex(8), "card": number, "amount": cash,
            "currency": 156})
        assert status == 200 and moved["result"] == "done", moved
        loads = wait_for("the cash top-up's load order", lambda: web.post(
            "/v1/wallet/list", {"member": member})[1]["loads"])
        image = self.folder / "mail" / f"{number}.json"
        journal = Journal(self.folder / f"{member}.journal")
        with open_reader(f"virtual:{image}") as reader:
            outcome = LC.load(f"{self.web_thread.url}/purse/bank", reader,
                              account=loads[0]["account"], secret=loads[0]["secret"],
                              amount=cash, journal=journal, http=self.http)
        assert outcome.outcome == "loaded", outcome
        return {"member": member, "number": number, "secret": secret, "image": image,
                "journal": journal}

    def purse(self, card: dict[str, Any]) -> int:
        return int(json.loads(card["image"].read_text())["app"]["ep"]["balance"])

    def approve(self, p: dict[str, Any]) -> tuple[int, Any]:
        return self.link("gateway", MALL, "mall").post("/v1/approvals", p)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("wallet-realcard-faults"))
    try:
        w.start("fin")
        w.start("gateway")
        yield w
    finally:
        w.close()


@pytest.mark.parametrize("point", ["gateway-after-purse", "gateway-after-purse-paid"])
def test_the_gateway_killed_between_the_purse_debit_and_the_approval(
        world: World, point: str) -> None:
    card = world.real_card("killed-" + point[-4:], 4_000)
    assert world.purse(card) == 4_000
    p = new_purchase()
    status, chosen = world.link("gateway", "web", "web").post("/v1/wallet/choose", {
        "member": card["member"], "card": card["number"], "secret": card["secret"],
        "purchase": signed(world.keys["mall"], p),
        "return_url": f"http://localhost:9999/shop/?order={p['order']}"})
    assert status == 200, chosen
    # the gateway dies on the confirmation of the card's debit
    world.procs["gateway"].terminate()
    world.procs["gateway"].wait(timeout=30)
    world.start("gateway", crash=point)
    checkout = f"{world.web_thread.url}/purse/checkout/{chosen['checkout']}"
    with open_reader(f"virtual:{card['image']}") as reader, pytest.raises(
            (httpx.HTTPError, PC.PaymentRefused)):
        PC.pay(checkout, reader, journal=card["journal"], http=world.http)
    assert world.procs["gateway"].wait(timeout=30) == -signal.SIGKILL
    assert world.purse(card) == 4_000 - p["amount"]      # the card paid
    world.start("gateway")
    # no approval without the evidence the gateway never recorded (or whose answer was lost)
    status, answer = world.approve(p)
    if point == "gateway-after-purse":
        assert status == 409 and "purse has not paid" in answer["reason"], answer
        # the helper's next contact: its journal brings the same confirmation again
    with open_reader(f"virtual:{card['image']}") as reader:
        report = PC.resume(reader, journal=card["journal"], http=world.http)
    assert [r["outcome"] for r in report] == ["completed"], report
    if point == "gateway-after-purse":
        status, answer = world.approve(p)
    assert status == 200 and answer["approved"], answer
    status, answer = world.approve(p)
    assert status == 409 and answer["state"] == "approved"
    # one purse debit, one debit at the financial system
    assert world.purse(card) == 4_000 - p["amount"]
    status, listed = world.link("gateway", "web", "web").post("/v1/wallet/list", {
        "member": card["member"]})
    assert [c["balance"] for c in listed["cards"]] == [4_000 - p["amount"]]


def test_the_gateway_killed_on_a_loads_confirmation(world: World) -> None:
    """SIGKILL after the load server decided and the card loaded, before the gateway (the
    bank) registered it: the helper's journal keeps the load open; its resume at the next
    contact carries the same confirmation, the gateway registers it once, and the charge is
    never loaded again."""
    member = "loadkill"
    web = world.link("gateway", "web", "web")
    status, card = web.post("/v1/wallet/issue", {"member": member, "kind": "real",
                                                 "ref": secrets.token_hex(8)})
    assert status == 200, card
    number = card["number"]
    status, moved = world.link("fin", "AGENT1", "agent").post("/v1/topups", {
        "ref": "cash-" + secrets.token_hex(8), "card": number, "amount": 900,
        "currency": 156})
    assert status == 200 and moved["result"] == "done", moved
    loads = wait_for("the load order", lambda: web.post(
        "/v1/wallet/list", {"member": member})[1]["loads"])
    image = world.folder / "mail" / f"{number}.json"
    journal = Journal(world.folder / f"{member}.journal")
    world.procs["gateway"].terminate()
    world.procs["gateway"].wait(timeout=30)
    world.start("gateway", crash="gateway-after-load")
    bank = f"{world.web_thread.url}/purse/bank"
    with open_reader(f"virtual:{image}") as reader, pytest.raises(
            (httpx.HTTPError, LC.PaymentRefused)):
        LC.load(bank, reader, account=loads[0]["account"], secret=loads[0]["secret"],
                amount=900, journal=journal, http=world.http)
    assert world.procs["gateway"].wait(timeout=30) == -signal.SIGKILL
    assert json.loads(image.read_text())["app"]["ep"]["balance"] == 900   # the card loaded
    world.start("gateway")
    # still owed in the gateway's view until the confirmation arrives; a new load of the same
    # order is refused (its load is under way), so it can never be loaded twice
    assert [x["state"] for x in web.post("/v1/wallet/list", {"member": member})[1]
            ["loads"]] == ["debited"]
    with open_reader(f"virtual:{image}") as reader:
        with pytest.raises(LC.PaymentRefused, match="debited already"):
            LC.load(bank, reader, account=loads[0]["account"], secret=loads[0]["secret"],
                    amount=900, journal=Journal(world.folder / "other.journal"),
                    http=world.http)
        report = LC.resume_loads(reader, journal=journal, http=world.http)
    assert [r["outcome"] for r in report] == ["loaded"], report
    assert web.post("/v1/wallet/list", {"member": member})[1]["loads"] == []
    assert json.loads(image.read_text())["app"]["ep"]["balance"] == 900
