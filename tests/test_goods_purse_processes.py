"""The purse pays, with every party its own process: ``svcard serve goods-payment --psam``
holds the PSAM, ``svcard device wait --pay purse`` relays one composite purchase, and
``svcard device pickup`` settles a purchase whose answer was lost (here: a proof the
device already gave, answered again, never a second debit)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_goods_processes import SVCARD, Processes, device_args, run
from test_goods_purse import EP, ep, goods_on

from svcard.host.goods.config import ROLES
from svcard.host.goods.stack import make_card
from svcard.host.kit.serving import wait_http

SERIAL = 73_001


class PurseProcesses(Processes):
    def start(self, role: str) -> None:
        if role != "payment":
            super().start(role)
            return
        log = self.folder / f"{role}.log"
        with log.open("ab") as err:
            self.procs[role] = subprocess.Popen(
                [SVCARD, "serve", "goods-payment", "--config", str(self.config),
                 "--psam", f"virtual:{self.folder / 'goods-psam1.json'}",
                 "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_http(f"{self.url(role)}/v1/health", timeout=60)
        except TimeoutError:
            raise AssertionError(f"goods-payment did not start: {log.read_text()[-2000:]}"
                                 ) from None


@pytest.fixture
def system(tmp_path: Path) -> Iterator[PurseProcesses]:
    made = json.loads(run("goods", "init", str(tmp_path / "sys"), "--json").stdout)
    assert Path(made["psam"]).is_file()
    procs = PurseProcesses(tmp_path / "sys")
    try:
        for role in ROLES:
            procs.start(role)
        yield procs
    finally:
        procs.stop()


def test_a_ticket_paid_by_the_purse_through_five_processes(
        system: PurseProcesses, tmp_path: Path) -> None:
    card = make_card(tmp_path / "cards", SERIAL, ep=EP)
    key = tmp_path / "device.key"
    device = json.loads(run("device", "init", "--key", str(key), "--json").stdout)["device"]
    run("device", "register", *device_args(system, key))
    with httpx.Client(timeout=30) as http:
        answer = http.post(f"{system.url('merchant')}/v1/orders",
                           json={"sku": "ticket", "device": device})
        assert answer.status_code == 200, answer.text
        order = answer.json()["order"]
    got = json.loads(run("device", "wait", *device_args(system, key), "--card",
                         f"virtual:{card}", "--yes", "--pay", "purse", "--wait", "5",
                         "--json").stdout)
    assert got["round_trips"] == 2, got
    assert got["handled"][0]["paid"] is True and got["handled"][0]["written"] is True
    assert ep(card) == EP - 1250
    [good] = goods_on(card)
    assert good["kind"] == "ticket" and good["good_id"] == bytes.fromhex(order)[:8]
    with httpx.Client(timeout=30) as http:
        shown = http.get(f"{system.url('merchant')}/v1/orders/{order}")
        assert shown.json()["state"] == "purse_paid"
    again = json.loads(run("device", "pickup", *device_args(system, key), "--card",
                           f"virtual:{card}", "--json").stdout)
    assert [(w["order"], w["paid"]) for w in again["written"]] == [(order, True)]
    assert ep(card) == EP - 1250 and len(goods_on(card)) == 1
