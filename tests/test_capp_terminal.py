"""The terminal's composite (CAPP) purchase (host/terminal/capp.py, ``svcard terminal capp``):
card <-> PSAM with goods records, the PSAM's type-09 batch record and its TAC as clearing
checks it, ``svcard terminal goods`` and ``svcard card show`` listing the goods."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from conftest import demo_image
from plain import demo_card_keys, plain_tac
from rawhost import DEMO_SERIAL
from test_capp import good
from test_capp_mac import card_image, goods_issuer_file

from svcard.card.image import save_new_image
from svcard.card.storage import read_image
from svcard.host.cli.main import main
from svcard.host.settle.batches import tac_input
from svcard.protocols import goods as G
from svcard.protocols import purse as P

AT = ["--at", "2027-03-14 15:09:26"]


def images(tmp_path: Path, ep: int = 10_000) -> tuple[Path, Path, list[str]]:
    iep, psam = tmp_path / "iep.json", tmp_path / "psam.json"
    save_new_image(iep, card_image(ep))   # with a goods key: the records go MAC'd (84 DE)
    save_new_image(psam, demo_image("psam"))
    return iep, psam, ["--card", f"virtual:{iep}", "--psam", f"virtual:{psam}",
                       "--goods-issuer", str(goods_issuer_file(tmp_path))]


def test_a_composite_purchase_from_the_command_line(tmp_path: Path) -> None:
    iep, psam, cards = images(tmp_path)
    ticket, token = good(), good("transit")
    run = CliRunner().invoke
    done = run(main, ["terminal", "capp", *cards, "--amount", "18.00", "--record",
                      f"11:{ticket.hex()}", "--record", f"13:2:{token.hex()}", *AT])
    assert done.exit_code == 0, done.output
    assert "composite purchase of CNY 18.00 approved, 2 goods record(s)" in done.output
    assert "SFI 13 record 2: transit valid" in done.output
    app = read_image(iep)["app"]
    assert app["ep"]["balance"] == 10_000 - 1800
    assert app["goods"]["files"][0]["data"] == {"1": ticket.hex().upper()}
    assert app["goods"]["files"][2]["data"] == {"2": token.hex().upper()}
    # the PSAM recorded a type-09 purchase whose TAC is the card's, as clearing checks it
    records = read_image(psam)["app"]["records"]
    assert len(records) == 1
    raw = bytes.fromhex(records[0])
    rec = P.PsamRecord.parse(raw)
    assert rec.txn_type == P.TYPE_COMPOSITE_PURCHASE and rec.amount == 1800 and rec.status == 0
    assert rec.tac == plain_tac(demo_card_keys(DEMO_SERIAL)["dtk"], tac_input(raw))
    # the goods, read from the card and from its image
    listed = run(main, ["terminal", "goods", "--card", f"virtual:{iep}", "--json"])
    assert listed.exit_code == 0, listed.output
    goods = json.loads(listed.output)
    assert [(g["sfi"], g["record_number"], g["kind"]) for g in goods] == [
        (0x11, 1, "ticket"), (0x13, 2, "transit")]
    assert goods[1]["rides_left"] == 10 and goods[0]["issuer_id"] == "4D45524348414E54"
    shown = run(main, ["card", "show", str(iep)])
    assert shown.exit_code == 0, shown.output
    assert "goods (2):" in shown.output and "SFI 11 record 1: ticket valid" in shown.output
    shown_json = json.loads(run(main, ["card", "show", str(iep), "--json"]).output)
    assert shown_json["goods"] == goods
    log = run(main, ["terminal", "log", "--card", f"virtual:{iep}"])
    assert "composite purchase" in log.output and "CNY 18.00" in log.output


def test_a_refused_record_moves_nothing(tmp_path: Path) -> None:
    iep, psam, cards = images(tmp_path)
    before = read_image(iep)["app"]
    run = CliRunner().invoke
    # a ticket into the coupons file: the card refuses it (6A80); no debit, no PSAM record
    done = run(main, ["terminal", "capp", *cards, "--amount", "1", "--record",
                      f"12:{good().hex()}", *AT])
    assert done.exit_code != 0
    assert "UPDATE CAPP DATA CACHE (1 of 1): 6A80" in done.output
    assert read_image(iep)["app"] == before
    assert read_image(psam)["app"]["records"] == []
    # eight tickets fill the file; a ninth by tag is refused: 6A84
    fill = [a for n in range(1, 9) for a in ("--record", f"11:{good(n=n).hex()}")]
    assert run(main, ["terminal", "capp", *cards, "--amount", "0.08", *fill, *AT]).exit_code == 0
    full = read_image(iep)["app"]
    ninth = run(main, ["terminal", "capp", *cards, "--amount", "1", "--record",
                       f"11:{good(n=9).hex()}", *AT])
    assert ninth.exit_code != 0 and "6A84" in ninth.output
    assert read_image(iep)["app"] == full


def test_a_bad_record_option_is_a_usage_error(tmp_path: Path) -> None:
    _, _, cards = images(tmp_path)
    run = CliRunner().invoke
    for value, words in [("11", "SFI:HEX"), ("zz:00", "not hex"), ("11:0:" + good().hex(),
                                                                     "1..254"),
                         ("11:" + good().hex()[:-2], "40 bytes"), ("11:XYZ", "not hex")]:
        out = run(main, ["terminal", "capp", *cards, "--amount", "1", "--record", value])
        assert out.exit_code == 2, (value, out.output)
        assert "--record" in out.output and words in out.output, (value, out.output)


def test_a_good_by_tag_finds_the_same_good(tmp_path: Path) -> None:
    """Redeeming a ride: the token written back by its tag lands on its own record."""
    iep, _, cards = images(tmp_path)
    run = CliRunner().invoke
    assert run(main, ["terminal", "capp", *cards, "--amount", "0", "--record",
                      f"13:3:{good('transit').hex()}", *AT]).exit_code == 0
    ride = good("transit", rides_left=9)
    done = run(main, ["terminal", "capp", *cards, "--amount", "3.00", "--record",
                      f"13:{ride.hex()}", *AT])
    assert done.exit_code == 0, done.output
    data = read_image(iep)["app"]["goods"]["files"][2]["data"]
    assert data == {"3": ride.hex().upper()}
    assert G.parse(ride)["rides_left"] == 9
