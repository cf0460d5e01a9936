"""`svcard audit --aid PROGRAMME` audits a loyalty programme in points: the CLI learns the unit
from the cards (a programme states currency 999) and never prints a programme's figures as money."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from svcard.fixtures import fixture_path
from svcard.host.cli.main import main as cli

PROGRAMME = "F05356434152440401"   # fixtures/iep-miles-demo.toml's [[loyalty]] aid


def _card(tmp_path: Path) -> Path:
    out = tmp_path / "card.json"
    result = CliRunner().invoke(cli, ["card", "new", str(fixture_path("iep-miles-demo.toml")),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_a_programmes_audit_is_in_points(tmp_path: Path) -> None:
    card = _card(tmp_path)
    result = CliRunner().invoke(cli, ["audit", "--card", str(card), "--aid", PROGRAMME])
    assert result.exit_code == 0, result.output
    assert "figures (points)" in result.output
    assert "every point is accounted for" in result.output
    assert "minor units" not in result.output
    as_json = CliRunner().invoke(cli, ["audit", "--card", str(card), "--aid", PROGRAMME,
                                       "--json"])
    assert json.loads(as_json.output)["unit"] == "points"


def test_the_purse_of_the_same_card_is_audited_as_money(tmp_path: Path) -> None:
    card = _card(tmp_path)
    result = CliRunner().invoke(cli, ["audit", "--card", str(card), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["unit"] == "money"
