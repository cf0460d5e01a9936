"""The SP's commands: ``svcard sp customer add|block|unblock|list``, ``svcard sp order`` (a
customer without a card buys through the SP), ``svcard sp bills`` (a bill a person reads, and
--json), ``bills close`` / ``bills paid``, and the configuration file's errors."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from svcard.fixtures import fixture_path
from svcard.host.cli.main import main
from svcard.host.demo.system import System
from svcard.host.kit.config import ConfigError
from svcard.host.sp.config import sp_config
from svcard.host.sp.purses.pool import PursePoolConfig
from svcard.host.sp.stack import demo_config, purse_images, start_sp


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), prog_name="svcard")
    return result.exit_code, result.output


def test_customer_accounts(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'sp.db'}"
    key = tmp_path / "alice.key"
    code, out = run("sp", "customer", "add", "alice", "--db", db, "--credit-limit", "25.00",
                    "--key-out", str(key), "--json")
    assert code == 0, out
    added = json.loads(out)
    assert added["credit_limit"] == 2500 and len(added["public_key"]) == 64
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_text().strip()) == 64
    assert key.read_text().strip() not in out                 # the private key is not printed
    code, out = run("sp", "customer", "add", "bob", "--db", db, "--public-key",
                    added["public_key"])
    assert code == 0, out
    # refused: the same id again, a bad key, neither or both key options, a key file that exists
    assert run("sp", "customer", "add", "alice", "--db", db, "--public-key",
               added["public_key"])[0] == 1
    assert run("sp", "customer", "add", "carl", "--db", db, "--public-key", "12")[0] == 2
    assert run("sp", "customer", "add", "carl", "--db", db)[0] == 2
    assert run("sp", "customer", "add", "carl", "--db", db, "--key-out", str(key))[0] == 1
    assert run("sp", "customer", "add", "x" * 33, "--db", db, "--key-out", "k")[0] == 2
    code, out = run("sp", "customer", "block", "bob", "--db", db, "--reason", "chargebacks")
    assert code == 0, out
    assert run("sp", "customer", "block", "nobody", "--db", db, "--reason", "x")[0] == 1
    code, out = run("sp", "customer", "list", "--db", db, "--json")
    rows = {r["id"]: r for r in json.loads(out)}
    assert rows["bob"]["state"] == "blocked" and rows["bob"]["block_reason"] == "chargebacks"
    assert rows["alice"]["credit_limit"] == 2500
    assert run("sp", "customer", "unblock", "bob", "--db", db)[0] == 0
    code, out = run("sp", "customer", "list", "--db", db)
    assert code == 0 and "bob" in out and "blocked" not in out
    # a database that is not an SP's, or none: exit 3, nothing made
    assert run("sp", "customer", "list", "--db", f"sqlite:///{tmp_path / 'none.db'}")[0] == 3
    assert not (tmp_path / "none.db").exists()
    assert run("sp", "customer", "block", "bob", "--db", f"sqlite:///{tmp_path / 'no.db'}",
               "--reason", "x")[0] == 3


def test_order_and_bills_from_the_command_line(system: System, tmp_path: Path) -> None:
    system.load.account("sp-bank", 100_000, "sp-pw")
    purses = purse_images(tmp_path / "purses", 1, ep=20_000)
    config = demo_config(tmp_path / "sp", system.pay.merchant.url, purses=PursePoolConfig(
        readers=[f"virtual:{p}" for p in purses], bank_url=system.load.bank_url,
        account="sp-bank", secret="sp-pw", currency_code=156))
    sp = start_sp(config)
    try:
        db = config.db_url
        key = tmp_path / "dana.key"
        assert run("sp", "customer", "add", "dana", "--db", db, "--key-out", str(key))[0] == 0
        code, out = run("sp", "order", sp.url, "--customer", "dana", "--key", str(key),
                        "--merchant", "MERCH001", "--sku", "song", "--json")
        assert code == 0, out
        assert json.loads(out)["line"]["billed"] == 115
        code, out = run("sp", "order", sp.url, "--customer", "dana", "--key", str(key),
                        "--merchant", "MERCH001", "--sku", "article")
        assert code == 0 and "News article" in out and "CNY 0.33" in out, out
        code, out = run("sp", "order", sp.url, "--customer", "dana", "--key", str(key),
                        "--merchant", "MERCH001", "--sku", "nothing")
        assert code == 1 and "sells no nothing" in out
        assert run("sp", "bills", "--db", db)[1].strip() == "no bills"
        code, out = run("sp", "orders", "--db", db, "--log")
        assert code == 0 and out.count("billed") >= 4 and "ordered" in out, out
        code, out = run("sp", "orders", "--db", db, "--state", "billed", "--json")
        assert [o["sku"] for o in json.loads(out)] == ["song", "article"]
        code, out = run("sp", "bills", "close", "--db", db, "--customer", "dana", "--json")
        assert code == 0 and json.loads(out) == {"bills": [1]}
        code, out = run("sp", "bills", "--db", db)
        assert code == 0, out
        assert "BILL 1  customer dana" in out and "One song (MP3)" in out
        assert "TOTAL" in out and "CNY 1.48" in out
        code, out = run("sp", "bills", "--db", db, "--json")
        [bill] = json.loads(out)
        assert bill["total"] == 148 and len(bill["items"]) == 2
        assert run("sp", "bills", "paid", "1", "--db", db)[0] == 0
        assert run("sp", "bills", "paid", "1", "--db", db)[0] == 1
        assert run("sp", "bills", "close", "--db", db)[0] == 2
    finally:
        sp.close()


def test_demo_configuration_and_its_errors(tmp_path: Path) -> None:
    config = sp_config(fixture_path("sp-demo.toml"))
    assert config.item("MERCH001", "song").retail == 120  # type: ignore[union-attr]
    assert config.purses is not None and "sp-demo-secret" not in repr(config)
    base = fixture_path("sp-demo.toml").read_text()
    for change, field in (
            (base.replace("retail = 120", "retail = -1"), "merchant[0].item[0].retail"),
            (base.replace('sku = "article"', 'sku = "song"'), "merchant[0].item[2].sku"),
            (base.replace("[billing]", "[billing]\nmaximun = 1"), "billing.maximun"),
            (base.replace('period = "month"', 'period = "year"'), "billing.period"),
            (base.replace('name = "MERCH001"', 'name = "MERCH 001"'), "merchant[0].name")):
        path = tmp_path / "sp.toml"
        path.write_text(change)
        with pytest.raises(ConfigError, match=r"sp\.toml: " + re.escape(field)):
            sp_config(path)
    path = tmp_path / "nopool.toml"
    path.write_text(base.split("[purses]")[0])
    code, out = run("serve", "sp", "--config", str(path))
    assert code == 3 and "purses" in out
