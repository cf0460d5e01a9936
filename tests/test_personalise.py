"""Profiles: explicit card keys, bad fields, and the views of every card kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from plain import demo_card_keys

from svcard.card.image import card_from_image
from svcard.card.personalise import ProfileError, image_from_profile
from svcard.fixtures import fixture_path
from svcard.host.cli.main import main
from svcard.host.terminal import purse as T
from svcard.reader import VirtualReader


def test_explicit_card_keys_work_with_the_issuers_psam_and_hsm(tmp_path: Path) -> None:
    keys = demo_card_keys(bytes.fromhex("00000000000000000001"))
    (tmp_path / "card.toml").write_text(f"""
kind = "iep"
issuer_id = "1000000000000001"
app_serial = "00000000000000000001"
start_date = 2026-01-01
expiry_date = 2031-12-31
fixed_random = "0A0B0C0D"
[keys]
tac = "{keys['dtk'].hex()}"
purchase = [{{ index = 1, version = 1, key = "{keys['dpk'].hex()}" }}]
load = [{{ index = 1, version = 1, key = "{keys['dlk'].hex()}" }}]
""")
    card = VirtualReader(card_from_image(image_from_profile(tmp_path / "card.toml")))
    psam = VirtualReader(card_from_image(image_from_profile(fixture_path("psam-demo.toml"))))
    hsm = VirtualReader(card_from_image(image_from_profile(fixture_path("hsm-demo.toml"))))
    for r in (card, psam, hsm):
        r.connect()
    T.load(card, hsm, 500, terminal_id=bytes(6))
    receipt = T.purchase(card, psam, 200)
    assert receipt.balance_after == 300
    # the fixed random makes the card's answers reproducible
    assert card.transmit(bytes.fromhex("805001020B0100000001000000000000"))[11:17] == \
        bytes.fromhex("0A0B0C0D9000")


@pytest.mark.parametrize(("text", "field"), [
    ('kind = "iep"\nissuer = "nope.toml"\napp_serial = "00000000000000000001"\n'
     'start_date = 2026-01-01\nexpiry_date = 2030-01-01',
     "p.toml: issuer: no such file: .*nope.toml"),
    ('kind = "card"', 'p.toml: kind: expected one of iep, psam, hsm, got "card"'),
    ('kind = "iep"\nissuer = "issuer.toml"\napp_serial = "0001"', "app_serial"),
    ('kind = "psam"\nissuers = ["issuer.toml"]\nterminal_id = "01"', "terminal_id"),
    ('kind = "iep"\nissuer = "issuer.toml"\napp_serial = "00000000000000000001"\n'
     'start_date = 2026-01-01\nexpiry_date = "20261301"', "expiry_date"),
    ('kind = "iep"\nissuer = "issuer.toml"\napp_serial = "00000000000000000001"\n'
     'start_date = 2026-01-01\nexpiry_date = 2030-01-01\n[pin]\nvalue = "12"', "pin.value"),
    ('kind = "iep"\nissuer = "issuer.toml"\napp_serial = "00000000000000000001"\n'
     'start_date = 2026-01-01\nexpiry_date = 2030-01-01\nbalance_limit = 10\n'
     '[balances]\nep = 11', "balances.ep"),
    ("kind = ", "not valid TOML"),
])
def test_profile_errors_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    (tmp_path / "issuer.toml").write_text(fixture_path("demo-issuer.toml").read_text())
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(ProfileError, match=field):
        image_from_profile(tmp_path / "p.toml")


def test_show_every_kind(tmp_path: Path) -> None:
    runner = CliRunner()
    for kind, expect in (("psam", "next TTN 1"), ("hsm", "issuers: 1000000000000001")):
        out = tmp_path / f"{kind}.json"
        assert runner.invoke(main, ["card", "new", str(fixture_path(f"{kind}-demo.toml")),
                                    "--out", str(out)]).exit_code == 0
        result = runner.invoke(main, ["card", "show", str(out)])
        assert result.exit_code == 0 and expect in result.output
        data = json.loads(runner.invoke(main, ["card", "show", str(out), "--json"]).output)
        assert data["kind"] == kind
        assert "key" not in json.dumps(data).lower().replace("kind", "")


def test_damaged_image_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "svcard-card-image", "version": 1, "kind": "iep",
                                "app": {"aid": "00"}}))
    result = CliRunner().invoke(main, ["card", "show", str(path)])
    # one line naming the file and the field that is wrong
    assert result.exit_code == 3 and f"{path}: app.public_data: missing" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, ["terminal", "balance", "--card", f"virtual:{path}"])
    assert result.exit_code == 3 and f"{path}: app.public_data: missing" in result.output
    path.write_text(json.dumps({"format": "svcard-card-image", "version": 9}))
    result = CliRunner().invoke(main, ["card", "show", str(path)])
    assert result.exit_code == 3 and "image version 9" in result.output
