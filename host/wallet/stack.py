"""The wallet's servers on loopback (financial system, payment gateway, web server, and a demo
mall), for the tests, the demo and the benchmarks. Each link gets a fresh random key."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ..kit.serving import ServerThread, free_port
from .config import FinConfig, GatewayConfig, PurseSettings, VanConfig, WebConfig
from .fin.app import FinServer, add_source
from .gateway.app import GatewayServer
from .links import LinkClient
from .mall import MallConfig, MallServer
from .van import VanServer
from .web.app import HEADER, WebServer

MALL = "MALL001"


@dataclass
class WalletStack:
    folder: Path
    fin: FinServer
    gateway: GatewayServer
    web: WebServer
    mall: MallServer
    van: VanServer
    threads: dict[str, ServerThread]
    mall_key: bytes = field(repr=False)
    agent_key: bytes = field(repr=False)
    van_mall_key: bytes = field(repr=False)

    def url(self, name: str) -> str:
        return self.mall.url if name == "mall" else self.threads[name].url

    def agent(self, http: httpx.Client, agent: str = "AGENT1") -> LinkClient:
        """A cash agent's link to the financial system."""
        return LinkClient(http, self.url("fin"), agent, self.agent_key)

    def mall_link(self, http: httpx.Client) -> LinkClient:
        return LinkClient(http, self.url("gateway"), MALL, self.mall_key)

    def van_link(self, http: httpx.Client) -> LinkClient:
        """The mall's link to the VAN server (embodiment 3)."""
        return LinkClient(http, self.url("van"), MALL, self.van_mall_key)

    def open_account(self, number: str, secret: str, balance: int) -> None:
        add_source(self.fin, "account", number, secret, balance)

    def open_credit(self, number: str, secret: str, limit: int) -> None:
        add_source(self.fin, "credit", number, secret, limit)

    def restart(self, name: str) -> None:
        """Stop one server and start a new one on the same port and database."""
        old = self.threads[name]
        old.stop()
        server: Any = getattr(self, name)
        server.close()
        new = type(server)(server.config, clock=server.clock)
        setattr(self, name, new)
        self.threads[name] = ServerThread(new.app(), port=old.port).start()

    def close(self) -> None:
        for name in ("web", "mall", "van", "gateway", "fin"):
            self.threads[name].stop()
            getattr(self, name).close()


def start_wallet(folder: Path, *, clock: Callable[[], float] = time.time,
                 db_urls: dict[str, str] | None = None, login_failures: int = 5,
                 mall_host: str = "127.0.0.1",
                 purse: dict[str, Any] | None = None) -> WalletStack:
    """Every server of the wallet system on loopback, their databases in ``folder``.
    ``purse``: real cards taken, with these :class:`PurseSettings` (the payment server's and
    the load server's addresses and keys; the gateway's own address is filled in).
    ``mall_host``: the name the mall is reached by (``localhost`` in a browser, so the mall
    is another site than the wallet's 127.0.0.1 and never gets its cookie: cookies are
    kept per host, not per port)."""
    folder.mkdir(parents=True, exist_ok=True)
    urls = {n: f"sqlite:///{folder / f'wallet-{n}.db'}" for n in ("fin", "gateway", "web")}
    urls.update(db_urls or {})
    fin_key, web_key, mall_key, agent_key, van_key, van_mall_key = (
        secrets.token_bytes(32) for _ in range(6))
    urls.setdefault("van", f"sqlite:///{folder / 'wallet-van.db'}")
    ports = {n: free_port() for n in ("fin", "gateway", "web", "mall", "van")}
    local = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
    local["mall"] = f"http://{mall_host}:{ports['mall']}"
    fin = FinServer(FinConfig(secrets.token_bytes(32), {"gateway": fin_key},
                              {"AGENT1": agent_key}, db_url=urls["fin"],
                              mail_dir=folder / "mail", van_keys={"van": van_key},
                              gateway_url=local["gateway"], report_seconds=0.5), clock=clock)
    gateway = GatewayServer(GatewayConfig(
        secrets.token_bytes(32), {"web": web_key}, {MALL: mall_key}, {MALL: local["mall"]},
        local["fin"], fin_key, db_url=urls["gateway"],
        purse=None if purse is None else PurseSettings(local["gateway"], **purse)), clock=clock)
    web = WebServer(WebConfig(local["gateway"], web_key, db_url=urls["web"],
                              login_failures=login_failures), clock=clock)
    van = VanServer(VanConfig({MALL: van_mall_key}, local["fin"], van_key, db_url=urls["van"]),
                    clock=clock)
    mall = MallServer(MallConfig(MALL, mall_key, local["gateway"], local["web"] + "/wallet",
                                 van_url=local["van"], van_key=van_mall_key))
    mall.url = local["mall"]
    threads: dict[str, ServerThread] = {}
    try:
        for name, server in (("fin", fin), ("gateway", gateway), ("van", van), ("web", web),
                             ("mall", mall)):
            threads[name] = ServerThread(server.app(), port=ports[name]).start()
    except BaseException:
        for thread in threads.values():
            thread.stop()
        for server in (web, mall, van, gateway, fin):
            server.close()
        raise
    return WalletStack(folder, fin, gateway, web, mall, van, threads, mall_key, agent_key,
                       van_mall_key)


class Browserless:
    """The wallet page's API calls as a test makes them: one member's cookie jar."""

    def __init__(self, stack: WalletStack) -> None:
        self.http = httpx.Client(base_url=stack.url("web"), timeout=30,
                                 headers={HEADER: "1"})

    def post(self, path: str, data: Any) -> httpx.Response:
        return self.http.post(path, json=data)

    def wallet(self) -> dict[str, Any]:
        r = self.http.get("/api/wallet")
        assert r.status_code == 200, r.text
        answer: dict[str, Any] = r.json()
        return answer

    def close(self) -> None:
        self.http.close()
