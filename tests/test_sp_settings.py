"""The settings that only tests and stacks could set before (issue 13): a merchant's ``[pon]``
(seed 001 FIG. 3B) read by ``svcard serve merchant`` from its TOML file and checked like every
other setting; every setting of the SP's, the payment server's and the merchant's files shown
in its demo file (commented where it is optional) and parsed once uncommented; a shared POS
configured as a node refused in one line; and the two queries docs/security.md gives a merchant
to find a PON paid twice."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel
from sqlalchemy import insert, text

from svcard.card.image import save_new_image
from svcard.card.personalise import image_from_profile
from svcard.fixtures import fixture_path
from svcard.host.kit.command_line import EXIT_INPUT
from svcard.host.kit.config import ConfigError
from svcard.host.kit.serving import free_port
from svcard.host.pay import config as PC
from svcard.host.pay.merchant import db as MD
from svcard.host.pay.merchant import pon as MP
from svcard.host.pay.merchant.server import MerchantServer
from svcard.host.pay.server import db as PD
from svcard.host.sp import config as SC
from svcard.host.sp.purses.config import PursePoolConfig

SVCARD = str(Path(sys.executable).parent / "svcard")
ROOT = Path(__file__).resolve().parent.parent
KEY = bytes(range(1, 33))          # the merchant's Ed25519 private key in these tests
CLIENT = {"X-Svcard-Client": "1"}


def write_key(folder: Path, name: str = "pon.key", mode: int = 0o600,
              key: bytes = KEY) -> Path:
    path = folder / name
    path.write_text(key.hex() + "\n")
    os.chmod(path, mode)
    return path


def merchant_toml(folder: Path, pon: str, *, port: int = 8081) -> Path:
    """The demo merchant file with ``[pon]`` holding the lines ``pon`` (the commented example
    block left as it is)."""
    source = fixture_path("merchant-demo.toml").read_text()
    assert "\n# [pon]\n" in source
    text_ = source.replace("http://127.0.0.1:8081", f"http://127.0.0.1:{port}")
    text_ = text_.replace("[client_terminals]", f"[pon]\n{pon}\n\n[client_terminals]")
    path = folder / "merchant.toml"
    path.write_text(text_)
    return path


GOOD = ('key_file = "pon.key"\nsp_name = "MERCH001"\nsp_url = "http://127.0.0.1:8085"\n'
        "lifetime = 120\nmax_open = 7")


# --- 1. [pon] from the merchant's file -----------------------------------------------------------
def test_pon_settings_come_from_the_merchant_file(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    write_key(tmp_path)
    config = PC.merchant_config(merchant_toml(tmp_path, GOOD))
    assert config.pon == MP.PonSettings(KEY, "MERCH001", "http://127.0.0.1:8085", 120, 7)
    assert KEY.hex() not in repr(config) and KEY.hex() not in repr(config.pon)
    # the defaults, and the key from the environment or written in the file
    monkeypatch.setenv("SVCARD_TEST_PON_KEY", KEY.hex())
    config = PC.merchant_config(merchant_toml(
        tmp_path, 'key_env = "SVCARD_TEST_PON_KEY"\nsp_name = "M-1"'))
    assert config.pon == MP.PonSettings(KEY, "M-1")
    assert (config.pon.lifetime, config.pon.max_open, config.pon.sp_url) == (3600, 10_000, None)
    config = PC.merchant_config(merchant_toml(tmp_path, f'key = "{KEY.hex()}"\nsp_name = "M"'))
    assert config.pon is not None and config.pon.key == KEY
    # no [pon]: no PONs, as before
    assert PC.merchant_config(fixture_path("merchant-demo.toml")).pon is None


# (the lines of [pon], the message expected after "FILE: ")
BAD = [
    ('key_file = "pon.key"\nsp_name = "M"\nlifetime = 0',
     "pon.lifetime: expected a whole number >= 1, got 0"),
    ('key_file = "pon.key"\nsp_name = "M"\nmax_open = "many"',
     'pon.max_open: expected a whole number >= 1, got "many"'),
    ('key_file = "pon.key"\nsp_name = "MERCH 001"', "pon.sp_name: string should match pattern"),
    ('key_file = "pon.key"\nsp_name = "' + "M" * 33 + '"', "pon.sp_name: "),
    ('key_file = "pon.key"\nsp_name = "M"\nsp_url = "127.0.0.1:8085"',
     'pon.sp_url: expected an http:// or https:// URL, got "127.0.0.1:8085"'),
    ('key_file = "short.key"\nsp_name = "M"', "pon.key: expected 32 bytes of hex, got 30"),
    (f'key = "{KEY.hex()[:60]}"\nsp_name = "M"', "pon.key: expected 32 bytes of hex, got 30"),
    (f'key = "{KEY.hex()}"\nkey_file = "pon.key"\nsp_name = "M"',
     "pon.key_file: give one of key, key_file, key_env, not key and key_file"),
    ('key_file = "pon.key"', "pon.sp_name: missing (required)"),
    ('sp_name = "M"', "pon.key: missing (required)"),
    ('key_file = "pon.key"\nsp_name = "M"\nlifetme = 60', "pon.lifetme: unknown key"),
    ('key_file = "open.key"\nsp_name = "M"', "pon.key_file: others may read {folder}/open.key "
                                             "(mode 0644); chmod 600 it"),
    ('key_file = "group.key"\nsp_name = "M"', "pon.key_file: others may read {folder}/group.key "
                                              "(mode 0640); chmod 600 it"),
    ('key_file = "none.key"\nsp_name = "M"', "pon.key_file: cannot read {folder}/none.key"),
]


@pytest.mark.parametrize(("lines", "expected"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_a_bad_pon_setting_is_one_line_naming_file_and_field(tmp_path: Path, lines: str,
                                                             expected: str) -> None:
    write_key(tmp_path)
    write_key(tmp_path, "short.key", key=KEY[:30])
    write_key(tmp_path, "open.key", 0o644)
    write_key(tmp_path, "group.key", 0o640)
    path = merchant_toml(tmp_path, lines)
    with pytest.raises(ConfigError) as caught:
        PC.merchant_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert expected.format(folder=tmp_path) in message, message
    assert KEY.hex()[:16] not in message.lower(), message   # never the key, nor a part of it


def test_serve_merchant_refuses_a_bad_pon_setting_in_one_line(tmp_path: Path) -> None:
    """What a person sees: exit 3 (an input that cannot be used, as every configuration
    error), one line, the key never printed, no database made."""
    from svcard.host.cli.main import main

    write_key(tmp_path, "open.key", 0o644)
    path = merchant_toml(tmp_path, 'key_file = "open.key"\nsp_name = "MERCH001"')
    db = tmp_path / "merchant.db"
    result = CliRunner().invoke(main, ["serve", "merchant", "--config", str(path), "--db",
                                       f"sqlite:///{db}", "--port", "1"])
    assert result.exit_code == EXIT_INPUT, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines == [f"svcard: {path}: pon.key_file: others may read {tmp_path}/open.key "
                     "(mode 0644); chmod 600 it"], result.output
    assert KEY.hex() not in result.output and not db.exists()


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not healthy within {timeout:g} s")


def test_serve_merchant_takes_pons_with_the_file_s_settings(tmp_path: Path) -> None:
    """The real ``svcard serve merchant``: its PONs name ``sp_name``, expire after
    ``lifetime``, are bounded by ``max_open`` and are answered signed with the file's key."""
    write_key(tmp_path)
    port = free_port()
    path = merchant_toml(tmp_path, 'key_file = "pon.key"\nsp_name = "SHOP7"\nlifetime = 120\n'
                                   "max_open = 1", port=port)
    proc = subprocess.Popen([SVCARD, "serve", "merchant", "--config", str(path), "--db",
                             f"sqlite:///{tmp_path / 'merchant.db'}", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        made = httpx.post(f"{url}/v1/pon", json={"sku": "song", "customer": "alice"},
                          headers=CLIENT, timeout=10)
        assert made.status_code == 200, made.text
        pon = made.json()
        assert pon["merchant"] == "SHOP7"
        assert abs(pon["expires"] - (time.time() + 120)) < 30
        nonce = uuid.uuid4().hex
        quote = httpx.get(f"{url}/v1/pon/{pon['pon']}", params={"nonce": nonce}, timeout=10)
        assert quote.status_code == 200, quote.text
        public = Ed25519PrivateKey.from_private_bytes(KEY).public_key()
        public.verify(bytes.fromhex(quote.headers[MP.HEADER]), MP.QUOTE_DOMAIN + quote.content)
        assert quote.json()["nonce"] == nonce and quote.json()["merchant"] == "SHOP7"
        more = httpx.post(f"{url}/v1/pon", json={"sku": "song", "customer": "bob"},
                          headers=CLIENT, timeout=10)
        assert more.status_code == 503, more.text      # max_open = 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --- 2. every setting shown in its demo file -----------------------------------------------------
def _fields(*models: type[BaseModel]) -> set[str]:
    return {name for model in models for name in model.model_fields}


DEMO_FILES = {
    "sp-demo.toml": _fields(SC.SpFile, SC.BillingEntry, SC.MerchantEntry, SC.ItemEntry,
                            PursePoolConfig),
    "payment-demo.toml": _fields(PC.PaymentFile, PC.MerchantEntry),
    "merchant-demo.toml": _fields(PC.MerchantFile, PC.PonEntry),
}


@pytest.mark.parametrize("fixture", sorted(DEMO_FILES))
def test_every_setting_is_shown_in_its_demo_file(fixture: str) -> None:
    source = fixture_path(fixture).read_text()
    missing = sorted(name for name in DEMO_FILES[fixture] if not re.search(
        rf"^#? ?(\[\[?([\w.]+\.)?{name}\]\]?$|{name}(_file|_env)? = )", source, re.M))
    assert not missing, f"{fixture} does not show {missing}"


def uncommented(fixture: str) -> str:
    """The demo file with its commented settings (``# name = value``, ``# [table]``) made real."""
    return re.sub(r"^# (\[\w+\]|\w+ = .*)$", r"\1", fixture_path(fixture).read_text(),
                  flags=re.M)


def test_the_commented_settings_parse_once_uncommented(tmp_path: Path) -> None:
    path = tmp_path / "sp.toml"
    path.write_text(uncommented("sp-demo.toml"))
    sp = SC.sp_config(path)
    assert sp.purses is not None
    assert (sp.purses.drain_margin, sp.purses.journal_max_bytes) == (0, 1 << 20)
    assert (sp.purses.retire_margin, sp.purses.lease_timeout, sp.purses.lease_ttl) == \
        (16, 30.0, 300.0)
    path = tmp_path / "payment.toml"
    path.write_text(uncommented("payment-demo.toml"))
    payment = PC.payment_config(path)
    assert [a.terminal_id for a in payment.merchants.values()] == [bytes.fromhex("000000000001")]
    write_key(tmp_path, "merchant-pon.key")
    path = tmp_path / "merchant.toml"
    path.write_text(uncommented("merchant-demo.toml"))
    merchant = PC.merchant_config(path)
    assert merchant.pon == MP.PonSettings(KEY, "MERCH001", "http://127.0.0.1:8085", 3600, 10_000)
    # and the demo files as they are still read (the README's commands use them)
    assert SC.sp_config(fixture_path("sp-demo.toml")).purses is not None
    assert PC.payment_config(fixture_path("payment-demo.toml")).merchants
    assert PC.merchant_config(fixture_path("merchant-demo.toml")).pon is None


# --- 3. a shared POS with a terminal per merchant, run as a node ---------------------------------
def test_a_shared_pos_configured_as_a_node_is_one_config_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node leases PSAMs of one terminal: the server refuses a node name for a shared POS.
    ``svcard serve payment`` says so in one line naming the file and the setting (exit 3), not
    as an internal error, and makes no database."""
    from svcard.host.cli.main import main

    terminals = ("0000000000A1", "0000000000B2")
    text_ = fixture_path("payment-demo.toml").read_text().replace(
        "# terminal_id = \"000000000001\"", f'terminal_id = "{terminals[0]}"')
    text_ += ('\n[[merchant]]\nid = "4D45524348303032"\nshared_key = "' + "5A" * 32 +
              f'"\nterminal_id = "{terminals[1]}"\n')
    path = tmp_path / "payment.toml"
    path.write_text(text_)
    psams = []
    for n, tid in enumerate(terminals, 1):
        psams += ["--psam", f"virtual:{tmp_path / f'psam{n}.json'}"]
        save_new_image(tmp_path / f"psam{n}.json", image_from_profile(
            fixture_path("psam-demo.toml"), psam_serial=f"{n:020d}", terminal_id=tid))
    read = PC.payment_config

    def as_node(config_path: Path, db_url: str | None = None) -> Any:
        # the node name a deployment gives (docs/deploy-nodes.md: not a file setting yet)
        return dataclasses.replace(read(config_path, db_url), node_name="node-1")

    monkeypatch.setattr(PC, "payment_config", as_node)
    db = tmp_path / "payments.db"
    result = CliRunner().invoke(main, ["serve", "payment", "--config", str(path), *psams,
                                       "--db", f"sqlite:///{db}", "--port", "1"])
    assert result.exit_code == EXIT_INPUT, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"svcard: {path}: node_name: a shared POS"), \
        result.output
    assert "internal error" not in result.output and not db.exists()


# --- 4. the merchant's queries for a PON paid twice ----------------------------------------------
def security_queries() -> list[str]:
    doc = (ROOT / "docs" / "security.md").read_text()
    part = doc[doc.index("**A PON paid twice"):]
    part = part[:part.index("\n**", 10)]
    return re.findall(r"```sql\n(.*?)```", part, re.S)


def test_the_documented_queries_find_a_pon_paid_twice(tmp_path: Path) -> None:
    """Three checkouts of one PON: the first payment releases it, the second card also paid
    (its confirmation was refused), the third was abandoned. The first query names the other
    two checkouts; the payment server's record names the second only."""
    write_key(tmp_path)
    config = PC.merchant_config(merchant_toml(tmp_path, GOOD),
                                f"sqlite:///{tmp_path / 'merchant.db'}")
    server = MerchantServer(config)
    desk = server.pons
    assert desk is not None
    now = int(time.time() * 1000)
    row, _secret = desk._new_pon("song", "lee", now)
    assert desk._insert(row, now)
    txns = []
    for _ in range(3):
        _params, order = server.new_order("song", "fig6")
        order["client_address"] = "test"
        assert desk._link(row["pon"], order["txn_id"], now) == "ok"
        assert server.db.create(order, 10_000, 10_000) == "ok"
        txns.append(order["txn_id"])
    assert desk.release(txns[0], MD.PAID, "{}", now, "d1")
    assert not desk.release(txns[1], MD.PAID, "{}", now, "d2")    # refused: nothing released
    other_pon, _ = desk._new_pon("song", "kim", now)               # paid once: not listed
    assert desk._insert(other_pon, now)
    _params, order = server.new_order("song", "fig6")
    order["client_address"] = "test"
    assert desk._link(other_pon["pon"], order["txn_id"], now) == "ok"
    assert server.db.create(order, 10_000, 10_000) == "ok"
    assert desk.release(order["txn_id"], MD.PAID, "{}", now, "d3")

    mine, theirs = security_queries()
    with server.db.engine.connect() as conn:
        found = {(r.pon, r.txn_id) for r in conn.execute(text(mine))}
    assert found == {(row["pon"], txns[1]), (row["pon"], txns[2])}

    engine = PD.make_engine(f"sqlite:///{tmp_path / 'payments.db'}")
    merchant = config.merchant_id.hex()
    with engine.begin() as conn:
        for n, (txn, state) in enumerate([(txns[0], "confirmed"), (txns[1], "confirmed"),
                                          (order["txn_id"], "confirmed")]):
            conn.execute(insert(PD.payments).values(
                merchant_id=merchant, txn_id=txn, variant=6, state=state, reason="",
                amount=99, currency_code=156, card_serial=f"{n:016d}", card_counter=n,
                draw_digest="00" * 32, created=now, updated=now))
    paid_twice = []
    with engine.connect() as conn:
        for _pon, txn in sorted(found):
            paid_twice += [dict(r._mapping) for r in conn.execute(
                text(theirs), {"merchant": merchant, "txn": txn})]
    assert [(p["txn_id"], p["amount"], p["card_serial"]) for p in paid_twice] == \
        [(txns[1], 99, f"{1:016d}")]
