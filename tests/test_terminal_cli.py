"""The local terminal flows and the ``svcard`` command line, over card images on disk."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from svcard.card.storage import read_image
from svcard.host.cli.main import main
from svcard.host.terminal import purse as T
from svcard.host.terminal.reader_specs import ReaderSpecError, open_reader


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_purchase_and_load_through_virtual_readers(image_files: dict[str, Path]) -> None:
    iep, psam, hsm = (f"virtual:{image_files[k]}" for k in ("iep", "psam", "hsm"))
    with open_reader(iep) as card, open_reader(psam) as sam:
        receipt = T.purchase(card, sam, 2500)
    assert (receipt.balance_before, receipt.balance_after) == (10000, 7500)
    with open_reader(iep) as card, open_reader(hsm) as h:
        loaded = T.load(card, h, 1000, terminal_id=bytes.fromhex("0000000000AA"))
    assert loaded.balance_after == 8500 and loaded.online_counter == 0
    app = read_image(image_files["iep"])["app"]
    assert app["ep"] == {"balance": 8500, "online_counter": 1, "offline_counter": 1,
                         "overdraft_limit": 0}
    psam_app = read_image(image_files["psam"])["app"]
    assert psam_app["next_ttn"] == 2 and len(psam_app["records"]) == 1
    with open_reader(iep) as card:
        log = T.read_log(card)
    assert [(e.type_name, e.amount) for e in log] == [("EP load", 1000), ("EP purchase", 2500)]


def test_expired_card_is_refused_before_any_value_moves(image_files: dict[str, Path]) -> None:
    iep, psam = f"virtual:{image_files['iep']}", f"virtual:{image_files['psam']}"
    with open_reader(iep) as card, open_reader(psam) as sam, \
            pytest.raises(T.TerminalCheckFailed, match="expired on 2031-12-31"):
        T.purchase(card, sam, 1, when=dt.datetime(2032, 1, 1, 12, 0, 0))
    with open_reader(iep) as card, open_reader(psam) as sam, \
            pytest.raises(T.TerminalCheckFailed, match="not valid before"):
        T.purchase(card, sam, 1, when=dt.datetime(2025, 1, 1, 12, 0, 0))
    assert read_image(image_files["iep"])["app"]["ep"]["balance"] == 10000
    assert read_image(image_files["psam"])["app"]["next_ttn"] == 1


def test_currency_mismatch_is_refused(image_files: dict[str, Path]) -> None:
    image = read_image(image_files["psam"])
    image["app"]["currency_code"] = 978
    image_files["psam"].write_text(json.dumps(image))
    with open_reader(f"virtual:{image_files['iep']}") as card, \
            open_reader(f"virtual:{image_files['psam']}") as sam, \
            pytest.raises(T.TerminalCheckFailed, match="currency 156"):
        T.purchase(card, sam, 1)


def test_insufficient_funds_is_declined_by_the_card(image_files: dict[str, Path]) -> None:
    with open_reader(f"virtual:{image_files['iep']}") as card, \
            open_reader(f"virtual:{image_files['psam']}") as sam, \
            pytest.raises(T.Declined) as err:
        T.purchase(card, sam, 10001)
    assert err.value.sw == 0x9401 and err.value.step == "INITIALIZE FOR PURCHASE"


def test_reader_specs() -> None:
    with pytest.raises(ReaderSpecError, match="not SCHEME:TARGET"):
        open_reader("card.json")
    with pytest.raises(ReaderSpecError, match="unknown reader scheme"):
        open_reader("usb:1")
    with pytest.raises(ReaderSpecError, match="jcardsim:APPLET_CLASS:AID"):
        open_reader("jcardsim:NoAid")


def test_format_amount_uses_integers() -> None:
    assert T.format_amount(1234, 2) == "12.34"
    assert T.format_amount(5, 2) == "0.05"
    assert T.format_amount(-5, 3) == "-0.005"
    assert T.format_amount(7, 0) == "7"


# --- CLI -----------------------------------------------------------------------------------

def test_cli_card_new_and_show(tmp_path: Path) -> None:
    fixtures = Path(__file__).resolve().parent.parent / "fixtures"
    out = tmp_path / "card.json"
    code, text = run("card", "new", str(fixtures / "iep-demo.toml"), "--out", str(out))
    assert code == 0 and "wrote iep card image" in text
    code, text = run("card", "new", str(fixtures / "iep-demo.toml"), "--out", str(out))
    assert code == 3 and "exists already" in text
    code, text = run("card", "show", str(out))
    assert code == 0 and "EP: balance CNY 0.00" in text and "PIN tries left: 3" in text
    code, text = run("card", "show", str(out), "--json")
    data = json.loads(text)
    assert data["kind"] == "iep" and data["ep"]["balance"] == 0
    issuer = (fixtures / "demo-issuer.toml").read_text()
    key = issuer.split('tac_master_key = "')[1][:32]
    assert key not in text and key.lower() not in text.lower()


def test_cli_bad_profile_names_the_field(tmp_path: Path) -> None:
    profile = tmp_path / "p.toml"
    profile.write_text('kind = "iep"\nissuer_id = "10"\n[keys]\ntac = "00"\npurchase = []\n'
                       'load = []\n')
    code, text = run("card", "new", str(profile), "--out", str(tmp_path / "x.json"))
    assert code == 3 and "app_serial" in text


def test_cli_terminal_commands(image_files: dict[str, Path]) -> None:
    card = f"virtual:{image_files['iep']}"
    code, text = run("terminal", "balance", "--card", card)
    assert code == 0 and "EP balance: CNY 100.00" in text
    code, text = run("terminal", "purchase", "--card", card, "--psam",
                     f"virtual:{image_files['psam']}", "--amount", "1234u", "--json")
    assert code == 0
    receipt = json.loads(text)
    assert receipt["balance_after"] == 10000 - 1234 and len(receipt["tac"]) == 8
    code, text = run("terminal", "load", "--card", card, "--hsm",
                     f"virtual:{image_files['hsm']}", "--amount", "0.34")
    assert code == 0 and "CNY 87.66 -> CNY 88.00" in text
    code, text = run("terminal", "log", "--card", card, "--json")
    assert [e["amount"] for e in json.loads(text)] == [34, 1234]
    code, text = run("terminal", "purchase", "--card", card, "--psam",
                     f"virtual:{image_files['psam']}", "--minor", "999999")
    assert code == 1 and "9401 (insufficient funds)" in text
    code, text = run("terminal", "balance", "--card", card, "--purse", "ed", "--pin", "000000")
    assert code == 1 and "63C2" in text
    code, text = run("terminal", "balance", "--card", "virtual:/nonexistent/x.json")
    assert code == 3 and ("no folder" in text or "no card image" in text)
    code, _ = run("terminal", "purchase", "--card", card, "--amount", "-1", "--psam", card)
    assert code == 2


def test_cli_apdu(image_files: dict[str, Path]) -> None:
    spec = f"virtual:{image_files['iep']}"
    code, text = run("apdu", "--reader", spec, "00A40400 09 F05356434152440101",
                     "805C000204", "80CC000000")
    assert code == 0
    assert "Received (9000, success):\n00002710" in text
    assert "6D00, instruction not supported" in text
    code, text = run("apdu", "--reader", spec, "--json", "805C000204")
    assert json.loads(text)[0]["sw"] == "6985"
    code, text = run("apdu", "--reader", spec, "80CA")
    assert code == 2 and "not a command APDU" in text
    code, text = run("apdu", "--reader", spec, "zz")
    assert code == 2


def test_cli_demo_json() -> None:
    code, text = run("demo", "--json")
    assert code == 0
    data = json.loads(text)
    assert data["load"]["balance_after"] == 10000
    assert data["purchase"]["balance_after"] == 10000 - 1234
    assert data["balance"] == 10000 - 1234
    assert [e["txn_type"] for e in data["log"]] == [6, 2]
    network = data["network"]
    assert network["load"]["outcome"] == "loaded" and network["load"]["balance_after"] == 10000
    purchases = network["purchases"]
    assert [n["variant"] for n in purchases] == ["fig5", "fig6", "fig7", "fig8", "fig6"]
    assert [n["round_trips"] for n in purchases] == [3, 3, 2, 2, 3]
    assert purchases[-1]["receipt"]["status"] == "authentication OK"
    spent = sum(n["amount"] for n in purchases)
    assert purchases[-1]["balance_after"] == 10000 - spent
    sp = network["sp"]      # the SP's purse paid the song wholesale, cleared like any card
    sp_paid = sp["order"]["line"]["wholesale"]
    assert network["clearing"]["total_paid"] == spent + sp_paid
    assert network["audit"]["clean"] is True
    assert network["audit"]["figures"]["card balances"] == (
        10000 - spent + sp["topped_up"] - sp_paid)


def test_console_script_runs_the_demo() -> None:
    beside = Path(sys.executable).parent / "svcard"  # the venv's own, before any on PATH
    exe = str(beside) if beside.exists() else shutil.which("svcard")
    assert exe, "the svcard console script is not installed"
    proc = subprocess.run([exe, "demo"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Card balance now CNY 87.66" in proc.stdout
