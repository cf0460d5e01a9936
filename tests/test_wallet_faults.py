"""The payment gateway or the financial system SIGKILLed between the match and the debit and
started again, as real processes (``svcard serve wallet-fin | wallet-gateway | wallet-van``):
the card is debited exactly once, and a purchase is approved only with its debit. The crash
points are the servers' own (``SVCARD_WALLET_CRASH``): ``gateway-after-match`` (the purchase
is ``approving``, the financial system not asked) and ``fin-after-debit`` (the debit
committed, its answer never sent). The financial system's reports to the gateway survive both
(an outbox written with the movement): each movement is in the gateway's journal once."""

from __future__ import annotations

import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_wallet_attack import new_purchase, signed

from svcard.host.kit.serving import free_port, wait_http
from svcard.host.wallet.base import CRASH_ENV
from svcard.host.wallet.links import LinkClient

SVCARD = str(Path(sys.executable).parent / "svcard")
MALL = "MALL001"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 40.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Servers:
    """The financial system, the gateway and the VAN as processes on fixed ports and files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ports = {n: free_port() for n in ("fin", "gateway", "van")}
        self.keys = {n: secrets.token_bytes(32) for n in
                     ("fin", "web", "mall", "agent", "van", "vanmall")}
        k = {n: v.hex() for n, v in self.keys.items()}
        url = {n: f"http://127.0.0.1:{p}" for n, p in self.ports.items()}
        self.url = url
        texts = {
            "fin": f'secret_key = "{secrets.token_hex(32)}"\nmail_dir = "mail"\n'
                   f'gateway_url = "{url["gateway"]}"\n'
                   f'[[gateway]]\nid = "gateway"\nkey = "{k["fin"]}"\n'
                   f'[[agent]]\nid = "AGENT1"\nkey = "{k["agent"]}"\n'
                   f'[[van]]\nid = "van"\nkey = "{k["van"]}"\n',
            "gateway": f'secret_key = "{secrets.token_hex(32)}"\n'
                       f'fin_url = "{url["fin"]}"\nfin_key = "{k["fin"]}"\n'
                       f'[[web]]\nid = "web"\nkey = "{k["web"]}"\n'
                       f'[[mall]]\nid = "{MALL}"\nkey = "{k["mall"]}"\n'
                       f'origin = "http://localhost:9999"\n',
            "van": f'fin_url = "{url["fin"]}"\nfin_key = "{k["van"]}"\n'
                   f'[[mall]]\nid = "{MALL}"\nkey = "{k["vanmall"]}"\n',
        }
        self.configs = {}
        for name, body in texts.items():
            self.configs[name] = folder / f"{name}.toml"
            self.configs[name].write_text(body)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.http = httpx.Client(timeout=30)

    def db(self, name: str) -> Path:
        return self.folder / f"{name}.db"

    def start(self, name: str, crash: str | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
        if crash:
            env[CRASH_ENV] = crash
        self.procs[name] = subprocess.Popen(
            [SVCARD, "serve", f"wallet-{name}", "--config", str(self.configs[name]),
             "--db", f"sqlite:///{self.db(name)}", "--port", str(self.ports[name]),
             "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        wait_http(f"{self.url[name]}/v1/health", timeout=60)

    def killed_itself(self, name: str) -> bool:
        """The process died of SIGKILL (its own crash point)."""
        return self.procs[name].wait(timeout=30) == -signal.SIGKILL

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(timeout=30)

    def stop(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        self.http.close()

    def link(self, name: str, party: str, key: str) -> LinkClient:
        return LinkClient(self.http, self.url[name], party, self.keys[key])

    # --- what the web server, a cash agent and the mall send ------------------------------
    def card(self, member: str, amount: int) -> dict[str, Any]:
        web = self.link("gateway", "web", "web")
        status, answer = web.post("/v1/wallet/issue", {"member": member, "kind": "virtual",
                                                       "ref": secrets.token_hex(8)})
        assert status == 200, answer
        status, moved = self.link("fin", "AGENT1", "agent").post("/v1/topups", {
            "ref": "cash-" + secrets.token_hex(8), "card": answer["number"],
            "amount": amount, "currency": 156})
        assert status == 200 and moved["result"] == "done", moved
        return {"member": member, **answer}

    def wallet_sends(self, path: str, card: dict[str, Any], p: dict[str, Any],
                     **extra: Any) -> dict[str, Any]:
        status, answer = self.link("gateway", "web", "web").post(path, {
            "member": card["member"], "card": card["number"],
            "purchase": signed(self.keys["mall"], p),
            "return_url": f"http://localhost:9999/shop/?order={p['order']}", **extra})
        assert status == 200, answer
        result: dict[str, Any] = answer
        return result

    def mall_asks(self, way: str, p: dict[str, Any], form: dict[str, Any]
                  ) -> tuple[int, Any]:
        try:
            if way == "approvals":
                return self.link("gateway", MALL, "mall").post("/v1/approvals", p)
            if way == "card-payments":
                return self.link("gateway", MALL, "mall").post("/v1/card-payments",
                                                               {"purchase": p, **form})
            return self.link("van", MALL, "vanmall").post("/v1/approvals",
                                                          {"purchase": p, **form})
        except httpx.TransportError:
            return 0, {"reason": "the connection was lost"}

    # --- what the databases say -----------------------------------------------------------
    def query(self, name: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(self.db(name))
        try:
            return list(db.execute(sql, args))
        finally:
            db.close()

    def debits(self, card: str) -> list[tuple[Any, ...]]:
        return self.query("fin", "SELECT ref, amount FROM wf_movements WHERE card=? AND "
                          "kind='debit' AND result='done'", card)

    def balance(self, card: str) -> int:
        return int(self.query("fin", "SELECT balance FROM wf_cards WHERE number=?", card)[0][0])

    def state(self, order: str) -> str:
        rows = self.query("gateway", "SELECT state FROM wg_purchases WHERE mall_order=?", order)
        return str(rows[0][0]) if rows else ""

    def journal(self, card: str) -> list[tuple[Any, ...]]:
        return self.query("gateway", "SELECT ref, amount FROM wg_journal WHERE card=? "
                          "ORDER BY ref", card)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    s = Servers(tmp_path_factory.mktemp("wallet-faults"))
    try:
        for name in ("fin", "gateway", "van"):
            s.start(name)
        yield s
    finally:
        s.close()


def prepared(servers: Servers, way: str, member: str) -> tuple[dict[str, Any], dict[str, Any],
                                                               dict[str, Any]]:
    card = servers.card(member, 10_000)
    p = new_purchase()
    if way == "approvals":
        servers.wallet_sends("/v1/wallet/choose", card, p, secret=card["secret"])
        form: dict[str, Any] = {}
    else:
        answer = servers.wallet_sends("/v1/wallet/fill", card, p)
        form = {"card": card["number"], "secret": card["secret"], "profile": answer["profile"]}
    return card, p, form


def settled_once(servers: Servers, card: dict[str, Any], p: dict[str, Any]) -> None:
    """One debit of the purchase's amount, the balance less it once, the report once."""
    assert [amount for _, amount in servers.debits(card["number"])] == [p["amount"]]
    assert servers.balance(card["number"]) == 10_000 - p["amount"]
    rows = wait_for("the debit's report", lambda: [
        r for r in servers.journal(card["number"]) if r[0].startswith("pay:")])
    assert len(rows) == 1 and rows[0][1] == -p["amount"]


@pytest.mark.parametrize("way", ["approvals", "card-payments"])
def test_gateway_killed_between_match_and_debit(servers: Servers, way: str) -> None:
    servers.stop("gateway")
    servers.start("gateway", crash="gateway-after-match")
    card, p, form = prepared(servers, way, f"gk-{way}")
    status, _ = servers.mall_asks(way, p, form)
    assert status == 0 and servers.killed_itself("gateway")
    # matched, not debited, not approved
    assert servers.state(p["order"]) == "approving" and servers.debits(card["number"]) == []
    servers.start("gateway")              # its start asks the financial system again
    wait_for("the purchase settled", lambda: servers.state(p["order"]) == "approved")
    status, answer = servers.mall_asks(way, p, form)      # the mall's retry: not twice
    assert status == 409, answer
    settled_once(servers, card, p)


@pytest.mark.parametrize("way", ["approvals", "card-payments", "van"])
def test_financial_system_killed_after_the_debit(servers: Servers, way: str) -> None:
    servers.stop("fin")
    servers.start("fin", crash="fin-after-debit")
    card, p, form = prepared(servers, way, f"fk-{way}")
    status, answer = servers.mall_asks(way, p, form)
    assert status == 502 and not answer.get("approved"), answer     # no approval
    assert servers.killed_itself("fin")
    # the debit was committed; the gateway never heard of it: not approved
    assert len(servers.debits(card["number"])) == 1
    assert servers.state(p["order"]) in ("approving", "filled")
    servers.start("fin")
    # the mall asks again until it is answered: approved, under the same ref, once
    found = wait_for("the approval", lambda: (lambda r: r if r[0] != 409 else None)(
        servers.mall_asks(way, p, form)))
    status, answer = found
    assert status == 200 and answer["approved"], answer
    if way != "van":
        assert servers.state(p["order"]) == "approved"
    settled_once(servers, card, p)


def test_gateway_down_while_the_van_pays(servers: Servers) -> None:
    """Embodiment 3 needs no gateway to pay; its report waits in the outbox and reaches the
    gateway once after the gateway is back (killed with SIGKILL, restarted)."""
    card, p, form = prepared(servers, "van", "gdown")
    servers.kill("gateway")
    status, answer = servers.mall_asks("van", p, form)
    assert status == 200 and answer["approved"], answer
    pending = servers.query("fin", "SELECT count(*) FROM wf_outbox WHERE sent=0")[0][0]
    assert pending >= 1
    servers.start("gateway")
    settled_once(servers, card, p)
    wait_for("the outbox emptied", lambda: servers.query(
        "fin", "SELECT count(*) FROM wf_outbox WHERE sent=0")[0][0] == 0)
