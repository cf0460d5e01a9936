"""Seed 000 with every party its own process: ``svcard goods init``, five ``svcard serve
goods-*`` servers, ``svcard goods account``, ``svcard device init|register|wait|pickup``, a real
card image. A server killed (SIGKILL) after the payment and started again finishes the good."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_goods_flow import goods_on

from svcard.host.goods.config import ROLES
from svcard.host.goods.stack import make_card
from svcard.host.kit.serving import wait_http

SVCARD = str(Path(sys.executable).parent / "svcard")
SERIAL = 70_021


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([SVCARD, *args], capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done


class Processes:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.config = folder / "goods.toml"
        self.doc = tomllib.loads(self.config.read_text())
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def url(self, role: str) -> str:
        return str(self.doc["parties"][role]["url"])

    def start(self, role: str) -> None:
        log = self.folder / f"{role}.log"
        with log.open("ab") as err:
            self.procs[role] = subprocess.Popen(
                [SVCARD, "serve", f"goods-{role}", "--config", str(self.config),
                 "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_http(f"{self.url(role)}/v1/health", timeout=60)
        except TimeoutError:
            raise AssertionError(f"goods-{role} did not start: {log.read_text()[-2000:]}"
                                 ) from None

    def kill(self, role: str) -> None:
        self.procs[role].send_signal(signal.SIGKILL)
        self.procs[role].wait(timeout=30)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def system(tmp_path: Path) -> Iterator[Processes]:
    run("goods", "init", str(tmp_path / "sys"))
    procs = Processes(tmp_path / "sys")
    try:
        for role in ROLES:
            procs.start(role)
        yield procs
    finally:
        procs.stop()


def device_args(system: Processes, key: Path) -> list[str]:
    auth = system.doc["parties"]["auth"]
    return ["--auth", auth["url"], "--auth-id", auth["id"], "--auth-key", auth["public_key"],
            "--key", str(key)]


def test_goods_bought_through_five_server_processes_and_the_device_command(
        system: Processes, tmp_path: Path) -> None:
    card = make_card(tmp_path / "cards", SERIAL)
    pin = tmp_path / "pin"
    pin.write_text("123456\n")
    run("goods", "account", "acc1", "--config", str(system.config), "--card",
        f"{SERIAL:020d}", "--pin-file", str(pin), "--balance", "10000")
    key = tmp_path / "device.key"
    device = json.loads(run("device", "init", "--key", str(key), "--json").stdout)["device"]
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    run("device", "register", *device_args(system, key))
    with httpx.Client(timeout=30) as http:
        answer = http.post(f"{system.url('merchant')}/v1/orders",
                           json={"sku": "rides10", "device": device})
        assert answer.status_code == 200, answer.text
    got = json.loads(run("device", "wait", *device_args(system, key), "--card",
                         f"virtual:{card}", "--yes", "--pin-file", str(pin), "--wait", "5",
                         "--json").stdout)
    assert got["round_trips"] == 2 and got["handled"][0]["written"] is True
    [good] = goods_on(card)
    assert good["kind"] == "transit" and good["rides_left"] == 10
    shown = run("card", "show", str(card)).stdout
    assert "transit" in shown
    # the fulfilment server killed before the next authorisation: paid, not written
    with httpx.Client(timeout=30) as http:
        assert http.post(f"{system.url('merchant')}/v1/orders",
                         json={"sku": "ticket", "device": device}).status_code == 200
    system.kill("fulfil")
    failed = run("device", "wait", *device_args(system, key), "--card", f"virtual:{card}",
                 "--yes", "--pin-file", str(pin), "--wait", "5", check=False)
    assert failed.returncode == 1 and "502" in failed.stderr
    system.start("fulfil")
    system.kill("payment")
    system.start("payment")            # its recovery gives the fulfilment server the good
    done = json.loads(run("device", "pickup", *device_args(system, key), "--card",
                          f"virtual:{card}", "--json").stdout)
    assert [w["written"] for w in done["written"]] == [True]
    assert sorted(g["kind"] for g in goods_on(card)) == ["ticket", "transit"]
    bad = run("device", "wait", *device_args(system, key)[:-2], "--key",
              str(tmp_path / "missing.key"), "--card", f"virtual:{card}", check=False)
    assert bad.returncode == 3 and "missing.key" in bad.stderr
