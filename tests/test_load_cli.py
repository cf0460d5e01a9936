"""Loading with the servers as real processes: ``svcard serve bank|load``, ``svcard bank
account``, ``svcard load``, and the load server killed with SIGKILL mid-load, then restarted."""

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

from svcard.card.storage import read_image
from svcard.host.demo.system import card_image
from svcard.host.kit.serving import free_port, wait_http
from svcard.host.load import client as LC
from svcard.host.load.stack import hsm_image
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SVCARD = str(Path(sys.executable).parent / "svcard")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SVCARD, *args], capture_output=True, text=True, timeout=120)


class LoadServers:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.hsm = hsm_image(folder)
        self.bank_port, self.load_port = free_port(), free_port()
        bank = (FIXTURES / "bank-demo.toml").read_text().replace(
            "http://127.0.0.1:8084", f"http://127.0.0.1:{self.load_port}").replace(
            "http://127.0.0.1:8083", f"http://127.0.0.1:{self.bank_port}")
        (folder / "bank.toml").write_text(bank)
        self.bank_db = f"sqlite:///{folder / 'bank.db'}"
        self.load_db = f"sqlite:///{folder / 'loads.db'}"
        created = run("bank", "account", "create", "alice", "--db", self.bank_db, "--funds",
                      "200.00", "--json")
        assert created.returncode == 0, created.stderr
        self.secret = json.loads(created.stdout)["secret"]
        self.bank = subprocess.Popen(
            [SVCARD, "serve", "bank", "--config", str(folder / "bank.toml"), "--db",
             self.bank_db, "--port", str(self.bank_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.load: subprocess.Popen[bytes] | None = None
        self.start_load()
        self.wait_up(f"http://127.0.0.1:{self.bank_port}/v1/health")

    @property
    def bank_url(self) -> str:
        return f"http://127.0.0.1:{self.bank_port}/v1/load"

    def start_load(self) -> None:
        self.load = subprocess.Popen(
            [SVCARD, "serve", "load", "--config", str(FIXTURES / "load-demo.toml"), "--hsm",
             f"virtual:{self.hsm}", "--db", self.load_db, "--port", str(self.load_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_up(f"http://127.0.0.1:{self.load_port}/v1/health")

    def kill_load(self) -> None:
        assert self.load is not None
        os.kill(self.load.pid, signal.SIGKILL)
        self.load.wait()

    @staticmethod
    def wait_up(url: str) -> None:
        wait_http(url, timeout=30)

    def account(self) -> int:
        listed = json.loads(run("bank", "account", "list", "--db", self.bank_db,
                                "--json").stdout)
        return int(listed[0]["balance"])

    def stop(self) -> None:
        for proc in (self.load, self.bank):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LoadServers]:
    s = LoadServers(tmp_path)
    yield s
    s.stop()


def test_svcard_load_against_served_processes(servers: LoadServers, tmp_path: Path) -> None:
    card = card_image(tmp_path, ep=0)
    args = ["load", servers.bank_url, "--card", f"virtual:{card}", "--account", "alice",
            "--secret", servers.secret, "--journal", str(tmp_path / "j.jsonl")]
    done = run(*args, "--amount", "75.00", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["load"]["outcome"] == "loaded"
    assert read_image(card)["app"]["ep"]["balance"] == 7_500
    poor = run(*args, "--amount", "150")
    assert poor.returncode == 1 and "insufficient funds" in poor.stderr
    wrong = run(*args[:-4], "--secret", "nope", "--amount", "1u", "--journal",
                str(tmp_path / "j.jsonl"))
    assert wrong.returncode == 1 and "wrong secret" in wrong.stderr
    assert servers.account() == 12_500
    assert run("bank", "account", "fund", "alice", "5.00", "--db", servers.bank_db).returncode == 0
    assert servers.account() == 13_000


@pytest.mark.parametrize("kill_at", ["/v1/load/request", "/v1/load/result"])
def test_load_server_sigkill_mid_load_then_restart(servers: LoadServers, tmp_path: Path,
                                                   kill_at: str) -> None:
    card = card_image(tmp_path, ep=0)
    journal = Journal(tmp_path / "j.jsonl")

    class Killer(httpx.Client):
        def post(self, url: Any, **kwargs: Any) -> httpx.Response:
            if kill_at in str(url):
                servers.kill_load()
            return super().post(url, **kwargs)

    with Killer(timeout=10) as http, open_reader(f"virtual:{card}") as reader, \
            pytest.raises(httpx.HTTPError):
        LC.load(servers.bank_url, reader, account="alice", secret=servers.secret,
                amount=5_000, journal=journal, http=http)
    loaded = kill_at == "/v1/load/result"  # the card had S2 and loaded itself
    assert read_image(card)["app"]["ep"]["balance"] == (5_000 if loaded else 0)
    servers.start_load()  # same database, same HSM image
    with httpx.Client(timeout=30) as clean, open_reader(f"virtual:{card}") as reader:
        report = LC.resume_loads(reader, journal=journal, http=clean)
    assert [r["outcome"] for r in report] == ["loaded" if loaded else "not loaded"]
    # card, load log and bank agree
    assert read_image(card)["app"]["ep"]["balance"] == (5_000 if loaded else 0)
    assert servers.account() == (15_000 if loaded else 20_000)
    import sqlalchemy as sa
    with sa.create_engine(servers.load_db).connect() as conn:
        states = [tuple(r) for r in conn.execute(sa.text("SELECT state, evidence FROM loads"))]
    # killed before the request arrived: no S2 was ever issued, so "not loaded" at once
    assert states == [("loaded", "") if loaded else ("not_loaded", "no-s2")]
