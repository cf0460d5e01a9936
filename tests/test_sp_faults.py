"""The SP server as a real process (``svcard serve sp``), SIGKILLed in the middle of an order
and started again on the same database, purses and journals: the order ends paid once and
billed once, whatever step the kill hit.

The merchant is reached through a proxy in this process, which kills the SP process at a
chosen point of the wholesale order: when the checkout arrives (nothing ordered yet), after
the merchant made the order (nothing paid), when the card's confirmation arrives (the purse
was debited, the merchant not yet told), or after the merchant released the goods (the SP
never heard). Each case then checks the books three ways: one payment at the merchant, the
purse debited by the wholesale amount once, one bill line, the customer's reservation 0; and
the customer's lookup relays the goods, the item and the merchant's receipt in all four."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from svcard.host.demo.system import System
from svcard.host.kit.serving import ServerThread, free_port, wait_http
from svcard.host.pay.merchant import db as MD
from svcard.host.sp import records
from svcard.host.sp.client import lookup
from svcard.host.sp.signing import read_private_key, signed_order
from svcard.host.sp.stack import purse_images

SVCARD = str(Path(sys.executable).parent / "svcard")


class KillingProxy:
    """Forwards to the merchant; SIGKILLs ``pid`` once at ``point``."""

    def __init__(self, merchant_url: str) -> None:
        self.merchant_url = merchant_url
        self.point = ""
        self.pid = 0
        self.http = httpx.AsyncClient(timeout=30)

    def kill(self, point: str) -> bool:
        if self.point == point and self.pid:
            os.kill(self.pid, signal.SIGKILL)
            self.point = ""
            return True
        return False

    async def forward(self, request: Request) -> Response:
        step = "checkout" if "/checkout/" in request.url.path else "status"
        if self.kill(f"{step}-before"):   # the request never reaches the merchant
            return Response(b"", 502)
        answer = await self.http.request(
            request.method, self.merchant_url + request.url.path + (
                f"?{request.url.query}" if request.url.query else ""),
            content=await request.body(),
            headers={k: v for k, v in request.headers.items() if k.lower() != "host"})
        self.kill(f"{step}-after")
        return Response(answer.content, answer.status_code, media_type=answer.headers.get(
            "content-type"))

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.forward, methods=["GET", "POST"])])


class SpProcess:
    def __init__(self, system: System, folder: Path, proxy_url: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        system.load.account("sp-bank", 1_000_000, "sp-pw")
        self.purses = purse_images(folder / "purses", 2, ep=50_000, first_serial=8_100_001)
        self.port = free_port()
        self.db = f"sqlite:///{folder / 'sp.db'}"
        readers = ", ".join(f'"virtual:{p}"' for p in self.purses)
        self.config = folder / "sp.toml"
        self.config.write_text(f"""
db = "{self.db}"
journal_dir = "journals"
[billing]
check_seconds = 3600
[[merchant]]
name = "MERCH001"
checkout_url = "{proxy_url}/v1/checkout"
fee = 5
pass_on_percent = 50
[[merchant.item]]
sku = "song"
retail = 120
[purses]
readers = [{readers}]
bank_url = "{system.load.bank_url}"
account = "sp-bank"
secret = "sp-pw"
currency_code = 156
""")
        key = folder / "alice.key"
        added = subprocess.run([SVCARD, "sp", "customer", "add", "alice", "--db", self.db,
                                "--key-out", str(key)], capture_output=True, text=True,
                               timeout=60)
        assert added.returncode == 0, added.stderr
        self.key = read_private_key(key)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> int:
        self.proc = subprocess.Popen(
            [SVCARD, "serve", "sp", "--config", str(self.config), "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"{self.url}/v1/health", timeout=60)
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def purse_total(self) -> int:
        return sum(int(json.loads(p.read_text())["app"]["ep"]["balance"]) for p in self.purses)


@pytest.fixture
def rig(system: System, tmp_path: Path) -> Iterator[tuple[SpProcess, KillingProxy]]:
    proxy = KillingProxy(system.pay.merchant.url)
    thread = ServerThread(proxy.app()).start()
    # the merchant's status URL (for the card's confirmation) goes through the proxy too
    system.pay.merchant_server.config.public_url = thread.url
    sp = SpProcess(system, tmp_path / "sp", thread.url)
    yield sp, proxy
    sp.stop()
    thread.stop()


@pytest.mark.parametrize("point", ["checkout-before", "checkout-after", "status-before",
                                   "status-after"])
def test_sp_killed_mid_order_pays_once_and_bills_once(
        rig: tuple[SpProcess, KillingProxy], system: System, point: str) -> None:
    sp, proxy = rig
    proxy.pid, proxy.point = sp.start(), point
    before = sp.purse_total()
    body, headers = signed_order(sp.key, "alice", "MERCH001", "song", order_key="cd" * 16)
    with httpx.Client(timeout=60) as http:
        with pytest.raises(httpx.HTTPError):
            http.post(f"{sp.url}/v1/orders", content=body, headers=headers)
        assert sp.proc is not None and sp.proc.wait(timeout=30) == -signal.SIGKILL
        sp.start()   # recovery runs before the server answers
        found = lookup(http, sp.url, customer="alice", key=sp.key, order_key="cd" * 16)
    # never paid twice, whatever the step: one payment at the merchant, one purse debit
    assert system.pay.merchant_server.db.counts().get(MD.PAID, 0) == 1
    assert before - sp.purse_total() == 99
    assert found["state"] == "billed", found
    # the goods are relayed, also those a resumed confirmation got (status-before), and those
    # the merchant released to a confirmation whose answer was lost (status-after): the
    # resumed payment sends the very same confirmation, and the merchant answers that exact
    # repeat with the same goods and receipt
    assert found["goods"].startswith("https://"), found
    assert found["item"] and found["receipt"]["txn_id"] and found["receipt"]["amount"] == 99
    assert found["line"]["wholesale"] == 99 and found["line"]["billed"] == 115
    assert len(records.bill_lines(sp.db)) == 1
    [customer] = records.customers(sp.db)
    assert (customer["reserved"], customer["open_total"]) == (0, 115)
    events: list[Any] = [e["event"] for e in records.order_log(sp.db)]
    assert events[0] == "ordered" and events.count("paid") == events.count("billed") == 1
