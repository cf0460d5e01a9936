"""The wallet's servers as real processes from their TOML files (``svcard serve wallet-fin |
wallet-gateway | wallet-web``), ``svcard wallet source add`` and ``svcard wallet topup``, and a
configuration mistake as one line naming the file and the field."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from svcard.host.cli.main import main
from svcard.host.kit.serving import free_port, wait_http
from svcard.host.wallet.web.app import HEADER

SVCARD = str(Path(sys.executable).parent / "svcard")
ACCOUNT = "1000000000000003"


def write_configs(folder: Path, ports: dict[str, int]) -> dict[str, Path]:
    keys = {n: secrets.token_hex(32) for n in ("fin", "web", "mall", "agent", "s1", "s2")}
    (folder / "agent.key").write_text(keys["agent"] + "\n")
    files = {
        "fin": f'secret_key = "{keys["s1"]}"\nmail_dir = "mail"\n'
               f'[[gateway]]\nid = "gateway"\nkey = "{keys["fin"]}"\n'
               f'[[agent]]\nid = "AGENT1"\nkey_file = "agent.key"\n',
        "gateway": f'secret_key = "{keys["s2"]}"\n'
                   f'fin_url = "http://127.0.0.1:{ports["fin"]}"\nfin_key = "{keys["fin"]}"\n'
                   f'[[web]]\nid = "web"\nkey = "{keys["web"]}"\n'
                   f'[[mall]]\nid = "MALL001"\nkey = "{keys["mall"]}"\n'
                   f'origin = "http://localhost:9999"\n',
        "web": f'gateway_url = "http://127.0.0.1:{ports["gateway"]}"\n'
               f'gateway_key = "{keys["web"]}"\n',
    }
    paths = {}
    for name, text in files.items():
        paths[name] = folder / f"{name}.toml"
        paths[name].write_text(text)
    return paths


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[dict[str, int], dict[str, Path]]]:
    ports = {n: free_port() for n in ("fin", "gateway", "web")}
    configs = write_configs(tmp_path, ports)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name in ("fin", "gateway", "web"):
            procs.append(subprocess.Popen(
                [SVCARD, "serve", f"wallet-{name}", "--config", str(configs[name]),
                 "--db", f"sqlite:///{tmp_path / f'{name}.db'}", "--port", str(ports[name]),
                 "--log-level", "warning"], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
        for name in ("fin", "gateway", "web"):
            wait_http(f"http://127.0.0.1:{ports[name]}/v1/health", timeout=60)
        yield ports, configs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def test_served_processes_issue_charge_and_top_up(served: tuple[dict[str, int],
                                                                dict[str, Path]],
                                                  tmp_path: Path) -> None:
    ports, configs = served
    env = {**os.environ, "ACCOUNT_SECRET": "acct4321"}
    done = subprocess.run([SVCARD, "wallet", "source", "add", "account", ACCOUNT, "--config",
                           str(configs["fin"]), "--db", f"sqlite:///{tmp_path / 'fin.db'}",
                           "--amount", "500.00", "--secret-env", "ACCOUNT_SECRET"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0 and "opened" in done.stdout, done.stderr
    with httpx.Client(base_url=f"http://127.0.0.1:{ports['web']}", headers={HEADER: "1"},
                      timeout=30) as web:
        assert web.post("/api/register", json={"member": "cli1", "password": "pass word"}) \
            .status_code == 201
        assert web.post("/api/login", json={"member": "cli1", "password": "pass word"}) \
            .status_code == 200
        card = web.post("/api/cards", json={"kind": "virtual"}).json()["number"]
        assert web.post("/api/links", json={"kind": "account", "number": ACCOUNT,
                                            "secret": "acct4321"}).status_code == 200
        r = web.post("/api/charges", json={"kind": "account", "card": card, "source": ACCOUNT,
                                           "amount": 12_000, "currency": 156})
        assert r.status_code == 200 and r.json()["balance"] == 12_000
        done = subprocess.run([SVCARD, "wallet", "topup", card, "3.50", "--fin-url",
                               f"http://127.0.0.1:{ports['fin']}", "--agent", "AGENT1",
                               "--key-file", str(tmp_path / "agent.key")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.strip() == f"card {card}: CNY 123.50", \
            done.stderr
        assert web.get("/api/wallet").json()["cards"][0]["balance"] == 12_350
        page = web.get("/wallet")
        assert page.status_code == 200 and "svcard wallet" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
    # a top-up with a key that is not the agent's: refused, exit 1
    (tmp_path / "bad.key").write_text("11" * 32)
    done = subprocess.run([SVCARD, "wallet", "topup", card, "1.00", "--fin-url",
                           f"http://127.0.0.1:{ports['fin']}", "--agent", "AGENT1",
                           "--key-file", str(tmp_path / "bad.key")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "MAC does not verify" in done.stderr


def test_a_configuration_mistake_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "fin.toml"
    bad.write_text('mail_dir = "mail"\n[[gateway]]\nid = "gateway"\nkey = "00"\n')
    result = CliRunner().invoke(main, ["serve", "wallet-fin", "--config", str(bad)])
    assert result.exit_code == 3, result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and str(bad) in line and "secret_key" in line, line
    assert "gateway[0].key" in line, line
