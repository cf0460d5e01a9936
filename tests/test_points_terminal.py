"""Loyalty points at the local terminal: ``svcard terminal points`` with a load HSM and a PSAM
personalised with the programme's issuer file; points never mixed with money."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_loyalty import HOTEL_AID, MILES_AID, TWO_PROGRAMMES, write_profile

from svcard.card.image import save_new_image
from svcard.card.personalise import ProfileError, image_from_profile
from svcard.card.storage import read_image
from svcard.host.cli.main import main
from svcard.host.kit.config import ConfigError
from svcard.host.settle.config import clearing_config
from svcard.host.terminal.points import Points

MILES = MILES_AID.hex().upper()
_PSAM = ('terminal_id = "000000000009"\npsam_serial = "00000000000000000009"\n'
         'batch_key = "311B7052A40A83B818D99E9EC07821C9"\n')


@pytest.fixture
def kit(tmp_path: Path) -> dict[str, Path]:
    """A purse card with two programmes, a points PSAM and a load HSM for skymiles, and the
    money PSAM of the demo issuer."""
    save_new_image(tmp_path / "card.json", image_from_profile(write_profile(tmp_path,
                                                                            TWO_PROGRAMMES)))
    (tmp_path / "psam.toml").write_text(
        'kind = "psam"\nissuers = ["miles-issuer.toml"]\nterminal_id = "000000000009"\n'
        'psam_serial = "00000000000000000009"\nbatch_key = "311B7052A40A83B818D99E9EC07821C9"\n'
        "currency_code = 999\ncurrency_exponent = 0\n")
    (tmp_path / "money-psam.toml").write_text(
        'kind = "psam"\nissuers = ["demo-issuer.toml"]\n'
        'terminal_id = "000000000008"\npsam_serial = "00000000000000000008"\n'
        'batch_key = "311B7052A40A83B818D99E9EC07821C9"\n')
    (tmp_path / "hsm.toml").write_text('kind = "hsm"\nissuers = ["miles-issuer.toml"]\n')
    for name in ("psam", "money-psam", "hsm"):
        save_new_image(tmp_path / f"{name}.json", image_from_profile(tmp_path / f"{name}.toml"))
    return {name: tmp_path / f"{name}.json" for name in ("card", "psam", "money-psam", "hsm")}


def svcard(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), prog_name="svcard")
    return result.exit_code, result.output


def points_of(card: Path, index: int = 0) -> dict:
    raw = read_image(card)["loyalty"][index]
    return {"ep": raw["ep"], "log": raw["log"], "proof": raw["proof"]}


def test_load_then_redeem_points_at_the_terminal(kit: dict[str, Path]) -> None:
    card = f"virtual:{kit['card']}"
    code, out = svcard("terminal", "points", "load", "--card", card, "--programme", MILES,
                       "--hsm", f"virtual:{kit['hsm']}", "--points", "2500",
                       "--at", "2027-03-14T15:09:26")
    assert code == 0, out
    assert "load of 2500 pts done" in out and "1000 pts -> 3500 pts" in out
    code, out = svcard("terminal", "points", "redeem", "--card", card, "--programme", MILES,
                       "--psam", f"virtual:{kit['psam']}", "--points", "1200", "--json")
    assert code == 0, out
    receipt = json.loads(out)
    assert (receipt["amount"], receipt["balance_after"], receipt["currency_code"]) == \
        (1200, 2300, 999)
    code, out = svcard("terminal", "points", "balance", "--card", card, "--programme", MILES)
    assert code == 0 and out.startswith("SKYMILES: 2300 pts (programme 2000000000000001")
    code, out = svcard("terminal", "points", "log", "--card", card, "--programme", MILES,
                       "--json")
    assert [(e["amount"], e["type_name"]) for e in json.loads(out)] == \
        [(1200, "EP purchase"), (2500, "EP load")]
    # the PSAM recorded the redemption under the programme's issuer id, for clearing
    records = read_image(kit["psam"])["app"]["records"]
    assert len(records) == 1 and records[0][8:24] == "2000000000000001"
    # the purse and the other programme did not move
    assert read_image(kit["card"])["app"]["ep"]["balance"] == 0
    assert points_of(kit["card"], 1)["ep"]["balance"] == 0


@pytest.mark.parametrize(("args", "message"), [
    # points redeemed beyond the balance
    (("redeem", "--psam", "PSAM", "--points", "1001"), "9401"),
    # a load past the programme's limit (5000)
    (("load", "--hsm", "HSM", "--points", "4001"), "6985"),
    # a programme the card lacks
    (("redeem", "--psam", "PSAM", "--points", "1", "--programme", "F05356434152440409"),
     "no loyalty programme F05356434152440409 on this card"),
    # the money purse is no programme
    (("redeem", "--psam", "PSAM", "--points", "1", "--programme", "F05356434152440101"),
     "not a loyalty programme"),
    # a money PSAM never redeems points
    (("redeem", "--psam", "MONEY", "--points", "1"), "currency"),
    # zero points
    (("redeem", "--psam", "PSAM", "--points", "0"), "--points"),
])
def test_refused_with_nothing_written(kit: dict[str, Path], args: tuple[str, ...],
                                      message: str) -> None:
    before = {name: read_image(path) for name, path in kit.items()}
    rest = [{"PSAM": f"virtual:{kit['psam']}", "HSM": f"virtual:{kit['hsm']}",
             "MONEY": f"virtual:{kit['money-psam']}"}.get(a, a) for a in args[1:]]
    if "--programme" not in rest:
        rest += ["--programme", MILES]
    code, out = svcard("terminal", "points", args[0], "--card", f"virtual:{kit['card']}",
                       *rest)
    assert code != 0 and message in out, out
    for name, path in kit.items():
        assert read_image(path) == before[name], name


def test_another_programmes_keys_redeem_nothing(kit: dict[str, Path]) -> None:
    """The skymiles PSAM holds no hotel keys: INIT SAM answers 9403 and nothing moves."""
    before = read_image(kit["card"])
    code, out = svcard("terminal", "points", "redeem", "--card", f"virtual:{kit['card']}",
                       "--programme", HOTEL_AID.hex(), "--psam", f"virtual:{kit['psam']}",
                       "--points", "1")
    assert code != 0 and "points and money" not in out
    assert read_image(kit["card"])["loyalty"] == before["loyalty"]


def test_points_are_never_mixed() -> None:
    miles, hotel = Points("2000000000000001", 10), Points("3000000000000001", 10)
    assert (miles + Points("2000000000000001", 5)).count == 15
    assert str(miles) == "10 pts"
    with pytest.raises(TypeError, match="never mixed"):
        _ = miles + hotel
    with pytest.raises(TypeError, match="money"):
        _ = miles + 5
    with pytest.raises(ValueError):
        Points("2000000000000001", -1)
    with pytest.raises(ValueError):
        _ = Points("2000000000000001", 1) - Points("2000000000000001", 2)


@pytest.mark.parametrize(("profile", "message"), [
    # a money PSAM (156) may not hold a programme's keys: a client lying about the card's
    # currency could otherwise pay money with points
    ('kind = "psam"\nissuers = ["demo-issuer.toml", "miles-issuer.toml"]\n' + _PSAM,
     r"issuers\[1\]: issuer 2000000000000001 is a points issuer"),
    # a points PSAM (999) may not hold money keys
    ('kind = "psam"\nissuers = ["miles-issuer.toml", "demo-issuer.toml"]\n' + _PSAM
     + "currency_code = 999\ncurrency_exponent = 0\n",
     r"issuers\[1\]: issuer 1000000000000001 is a money issuer"),
    # an HSM holding both would load points as money
    ('kind = "hsm"\nissuers = ["demo-issuer.toml", "miles-issuer.toml"]\n',
     r"issuers\[1\]: issuer 2000000000000001 is a points issuer"),
])
def test_points_and_money_never_share_a_security_module(kit: dict[str, Path], profile: str,
                                                         message: str) -> None:
    path = kit["card"].parent / "mixed.toml"
    path.write_text(profile)
    with pytest.raises(ProfileError, match=message):
        image_from_profile(path)


def test_a_programme_needs_a_points_issuer_file(tmp_path: Path) -> None:
    programmes = TWO_PROGRAMMES.replace('"miles-issuer.toml"', '"demo-issuer.toml"')
    with pytest.raises(ProfileError, match=r"loyalty\[0\]\.issuer: demo-issuer.toml is a money"):
        image_from_profile(write_profile(tmp_path, programmes))


def test_clearing_never_mixes_points_and_money(tmp_path: Path) -> None:
    write_profile(tmp_path, TWO_PROGRAMMES)   # the issuer files
    terminal = ('[[terminal]]\nterminal_id = "000000000009"\nbatch_key = "' + "31" * 16
                + '"\nmerchant_id = "4D45524348303031"\nacquirer_id = "4143515530303031"\n')
    for currency, issuers, bad in (("999", ("miles", "demo"), 1), ("156", ("demo", "miles"), 1),
                                   ("999", ("miles", "hotel"), None)):
        path = tmp_path / "clearing.toml"
        path.write_text(f'settlement_key = "{"5C" * 32}"\ncurrency_code = {currency}\n'
                        + "".join(f'[[issuer]]\nprofile = "{i}-issuer.toml"\n' for i in issuers)
                        + terminal)
        if bad is None:
            assert len(clearing_config(path).issuers) == 2
        else:
            with pytest.raises(ConfigError, match=rf"issuer\[{bad}\]\.profile: a"):
                clearing_config(path)
