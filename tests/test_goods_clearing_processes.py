"""Issue 12, the purse-paid goods to clearing with every party its own process: a ticket paid
by the purse (``svcard device wait --pay purse``), ``svcard goods close-batch`` against
``svcard serve goods-payment --psam``, ``svcard clearing run`` paying the goods merchant, and
``svcard audit`` tying the card, the goods books and the clearing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_goods_clearing import ACQUIRER, MERCHANT, PRICE, Clearing
from test_goods_processes import device_args, run
from test_goods_purse import EP, ep
from test_goods_purse_processes import PurseProcesses

from svcard.host.goods.config import ROLES
from svcard.host.goods.stack import make_card

SERIAL = 73_101


@pytest.fixture
def system(tmp_path: Path) -> Iterator[PurseProcesses]:
    run("goods", "init", str(tmp_path / "sys"), "--json")
    procs = PurseProcesses(tmp_path / "sys")
    try:
        for role in ROLES:
            procs.start(role)
        yield procs
    finally:
        procs.stop()


def test_a_purse_ticket_through_processes_is_closed_cleared_and_audited(
        system: PurseProcesses, tmp_path: Path) -> None:
    card = make_card(tmp_path / "cards", SERIAL, ep=EP)
    key = tmp_path / "device.key"
    device = json.loads(run("device", "init", "--key", str(key), "--json").stdout)["device"]
    run("device", "register", *device_args(system, key))
    with httpx.Client(timeout=30) as http:
        answer = http.post(f"{system.url('merchant')}/v1/orders",
                           json={"sku": "ticket", "device": device})
        assert answer.status_code == 200, answer.text
    run("device", "wait", *device_args(system, key), "--card", f"virtual:{card}", "--yes",
        "--pay", "purse", "--wait", "5", "--json")
    assert ep(card) == EP - PRICE
    clearing = Clearing(tmp_path, "000000000001")   # the demo PSAM's terminal id
    config = str(system.folder / "goods.toml")
    closed = json.loads(run("goods", "close-batch", "--config", config, "--out",
                            str(clearing.batches), "--json").stdout)
    assert len(closed["files"]) == 1
    db = f"sqlite:///{tmp_path / 'clearing.db'}"
    cleared = json.loads(run("clearing", "run", "--config", str(clearing.path), "--batches",
                             str(clearing.batches), "--db", db, "--out",
                             str(tmp_path / "settlement"), "--json").stdout)
    assert cleared["total_paid"] == PRICE
    assert [(line["payer"], line["payee"], line["amount"]) for line in cleared["lines"]
            if line["payer"] == ACQUIRER] == [(ACQUIRER, MERCHANT, PRICE)]
    again = json.loads(run("goods", "close-batch", "--config", config, "--out",
                           str(clearing.batches), "--json").stdout)
    assert again["files"] == []
    args = ["audit", "--card", str(card), "--opening", str(EP), "--clearing-db", db]
    for role in ROLES:
        args += ["--goods-db", system.doc["parties"][role]["db"]]
    audited = run(*args, check=False)
    assert audited.returncode == 0 and "clean" in audited.stdout, audited.stdout
    assert "purchases settled" in audited.stdout
