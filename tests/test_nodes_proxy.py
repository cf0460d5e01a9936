"""The client's address behind nginx (issue 16). Since af1f6b9 a node ignores X-Forwarded-For,
so behind nginx every client had nginx's address: one client's wrong secrets locked every
client out at the bank. Now nginx overwrites the header with the address its client connected
from, and a node believes the header only on a connection from a proxy it was told to trust
(``--trusted-proxy``, default none).

Clients here connect from other loopback addresses (127.0.0.5, 127.0.0.6) than nginx's
127.0.0.1, so the node can tell them apart. Ports are free ones."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from svcard.host.kit import serving
from svcard.host.kit.nginx import Nginx, find_nginx
from svcard.host.kit.serving import ServerThread, free_port

needs_nginx = pytest.mark.skipif(find_nginx() is None, reason="nginx is not installed")
FORGED = {"X-Forwarded-For": "203.0.113.9"}


def _echo_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def who(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.client.host if request.client else "?")

    return Starlette(routes=[Route("/who", who)])


def client_from(address: str) -> httpx.Client:
    return httpx.Client(timeout=10, transport=httpx.HTTPTransport(local_address=address))


@pytest.fixture
def behind_nginx(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """(nginx's URL, the trusting node's URL, an untrusting node's URL behind a second nginx)."""
    trusting = ServerThread(_echo_app(), proxies=["127.0.0.1"]).start()
    plain = ServerThread(_echo_app()).start()
    first = Nginx(tmp_path / "n1", [f"127.0.0.1:{trusting.port}"], name="nodes").start()
    second = Nginx(tmp_path / "n2", [f"127.0.0.1:{plain.port}"], name="nodes").start()
    try:
        yield first.url, trusting.url, second.url
    finally:
        first.stop()
        second.stop()
        trusting.stop()
        plain.stop()


@needs_nginx
def test_through_nginx_the_node_sees_the_clients_real_address_whatever_it_forges(
        behind_nginx: tuple[str, str, str]) -> None:
    nginx, node, untrusting = behind_nginx
    with client_from("127.0.0.5") as http:
        assert http.get(nginx + "/who").text == "127.0.0.5"
        # a forged header does not choose the address: nginx replaces it
        assert http.get(nginx + "/who", headers=FORGED).text == "127.0.0.5"
        # straight to the node, the header is not believed (127.0.0.5 is no trusted proxy)
        assert http.get(node + "/who", headers=FORGED).text == "127.0.0.5"
        # a node trusting no proxy counts every client behind nginx as nginx
        assert http.get(untrusting + "/who", headers=FORGED).text == "127.0.0.1"
    with client_from("127.0.0.6") as http:
        assert http.get(nginx + "/who", headers=FORGED).text == "127.0.0.6"


@needs_nginx
def test_the_banks_per_address_lockout_counts_the_real_client_behind_nginx(
        tmp_path: Path) -> None:
    """Three wrong secrets from 127.0.0.5 lock out that address, not 127.0.0.6 behind the
    same nginx (before: both counted as 127.0.0.1, and the innocent client got 429)."""
    from svcard.host.load.bank.server import BankConfig, BankServer

    server = BankServer(BankConfig(bytes(8), os.urandom(32), "http://127.0.0.1:9/v1/load",
                                   bytes(6), db_url=f"sqlite:///{tmp_path / 'bank.db'}",
                                   address_max_failures=3, secret_max_failures=100))
    server.db.create_account("alice", "Alice", 156, 10_000, "right secret")
    thread = ServerThread(server.app(), proxies=["127.0.0.1"]).start()
    nginx = Nginx(tmp_path / "nginx", [f"127.0.0.1:{thread.port}"], name="bank").start()

    def start(http: httpx.Client, secret: str) -> int:
        return http.post(nginx.url + "/v1/load/start", headers=FORGED, json={
            "account": "alice", "secret": secret, "amount": 1,
            "card": {"serial": "00" * 9 + "01", "balance": 0, "limit": 100_000,
                     "currency_code": 156}}).status_code

    try:
        with client_from("127.0.0.5") as attacker, client_from("127.0.0.6") as other:
            assert [start(attacker, f"guess {n}") for n in range(3)] == [403] * 3
            assert start(attacker, "guess 4") == 429
            assert start(other, "another guess") == 403    # its own count
            assert start(other, "right secret") == 200
    finally:
        nginx.stop()
        thread.stop()
        server.db.engine.dispose()


def test_serve_believes_the_header_only_from_the_trusted_proxies(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    seen: list[uvicorn.Config] = []
    monkeypatch.setattr(serving._DrainingServer, "run", lambda self: seen.append(self.config))
    serving.serve(_echo_app(), host="127.0.0.1", port=free_port(), log_level="warning")
    serving.serve(_echo_app(), host="127.0.0.1", port=free_port(), log_level="warning",
                  proxies=["10.1.2.3", "192.168.0.0/16"])
    assert seen[0].proxy_headers is False
    assert seen[1].proxy_headers is True
    assert seen[1].forwarded_allow_ips == ["10.1.2.3/32", "192.168.0.0/16"]


@pytest.mark.parametrize("value", ["nginx.local", "10.0.0.300", "*", ""])
def test_a_bad_trusted_proxy_is_one_line_naming_the_option(tmp_path: Path, value: str) -> None:
    from svcard.host.cli.main import main

    config = tmp_path / "bank.toml"
    config.write_text("")
    result = CliRunner().invoke(main, ["serve", "bank", "--config", str(config), "--port",
                                       str(free_port()), "--trusted-proxy", value])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "--trusted-proxy" in lines[0], result.output


def test_a_good_trusted_proxy_reaches_serve(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    """``svcard serve bank --trusted-proxy 127.0.0.1`` runs uvicorn believing the header from
    127.0.0.1 only; the setting does not outlive the command."""
    import uvicorn

    from svcard.host.cli.main import main

    seen: list[uvicorn.Config] = []
    monkeypatch.setattr(serving._DrainingServer, "run", lambda self: seen.append(self.config))
    bank_toml = (Path(__file__).resolve().parent.parent / "fixtures" / "bank-demo.toml")
    result = CliRunner().invoke(main, [
        "serve", "bank", "--config", str(bank_toml), "--db",
        f"sqlite:///{tmp_path / 'bank.db'}", "--port", str(free_port()),
        "--trusted-proxy", "127.0.0.1", "--trusted-proxy", "::1"])
    assert result.exit_code == 0, result.output
    assert seen and seen[0].proxy_headers is True
    assert seen[0].forwarded_allow_ips == ["127.0.0.1/32", "::1/128"]
    assert serving._trusted == ()
