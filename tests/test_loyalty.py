"""Loyalty programmes on the purse card (seed 002 FIG. 16): one ADF per programme, PBOC's EP
commands unchanged on a purse of points; personalisation, the image, tearing, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from plain import plain_diversify, plain_mac, plain_tac, tdes_encrypt_block
from rawhost import DATE, DEMO_SERIAL, TID, TIME, RawHost, u4
from test_persistence import Tear

from svcard.card.image import card_from_image, check_image, open_card, save_new_image
from svcard.card.loyalty import Programme
from svcard.card.personalise import ProfileError, image_from_profile
from svcard.card.storage import WRITE_STEPS, ImageError, PowerCut, read_image
from svcard.protocols import purse as P

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MILES_AID = bytes.fromhex("F05356434152440401")
HOTEL_AID = bytes.fromhex("F05356434152440402")
MILES_KEYS = {"purchase": "11111111111111112222222222222222",
              "load": "33333333333333334444444444444444",
              "tac": "0123456789ABCDEFFEDCBA9876543210"}
HOTEL_KEYS = {"purchase": "55555555555555556666666666666666",
              "load": "77777777777777778888888888888888",
              "tac": "FEDCBA98765432100123456789ABCDEF"}


def issuer_file(folder: Path, name: str, issuer_id: str, keys: dict[str, str]) -> None:
    (folder / name).write_text(
        f'issuer_id = "{issuer_id}"\ntac_master_key = "{keys["tac"]}"\nunit = "points"\n'
        f'[[purchase_keys]]\nindex = 1\nversion = 1\nmaster_key = "{keys["purchase"]}"\n'
        f'[[load_keys]]\nindex = 1\nversion = 1\nmaster_key = "{keys["load"]}"\n')


def write_profile(folder: Path, programmes: str, extra: str = "") -> Path:
    """The demo purse profile with ``programmes`` (``[[loyalty]]`` tables) appended."""
    (folder / "demo-issuer.toml").write_text((FIXTURES / "demo-issuer.toml").read_text())
    issuer_file(folder, "miles-issuer.toml", "2000000000000001", MILES_KEYS)
    issuer_file(folder, "hotel-issuer.toml", "3000000000000001", HOTEL_KEYS)
    base = (FIXTURES / "iep-demo.toml").read_text()
    head, _, rest = base.partition("[balances]")
    path = folder / "iep.toml"
    path.write_text(head + 'fixed_random = "A1B2C3D4"\n' + extra + "\n[balances]" + rest
                    + "\n" + programmes)
    return path


TWO_PROGRAMMES = f"""
[[loyalty]]
programme = "skymiles"
aid = "{MILES_AID.hex().upper()}"
issuer = "miles-issuer.toml"
balance_limit = 5000
points = 1000

[[loyalty]]
programme = "hotel-points"
label = "HOTEL POINTS"
aid = "{HOTEL_AID.hex().upper()}"
issuer = "hotel-issuer.toml"
"""


@pytest.fixture
def image(tmp_path: Path) -> dict:
    return image_from_profile(write_profile(tmp_path, TWO_PROGRAMMES))


class PointsHost(RawHost):
    """RawHost aimed at a programme's ADF, with that programme's plainly diversified keys."""

    def __init__(self, card, aid: bytes = MILES_AID, keys: dict[str, str] = MILES_KEYS) -> None:
        super().__init__(card)
        factor = DEMO_SERIAL[-8:]
        self.aid = aid
        self.keys = {"dpk": plain_diversify(bytes.fromhex(keys["purchase"]), factor),
                     "dlk": plain_diversify(bytes.fromhex(keys["load"]), factor),
                     "dtk": plain_diversify(bytes.fromhex(keys["tac"]), factor)}

    def select(self) -> bytes:
        data, sw = self.send(b"\x00\xa4\x04\x00" + bytes([len(self.aid)]) + self.aid + b"\x00")
        assert sw == 0x9000, hex(sw)
        return data


def programme(card, name: str) -> Programme:
    found = [a for a in card.apps if isinstance(a, Programme) and a.programme == name]
    assert len(found) == 1
    return found[0]


def value(card) -> list[tuple]:
    """Every purse's and programme's value state: balance, counters, log, proof."""
    return [(a.state.ep.balance, a.state.ep.online_counter, a.state.ep.offline_counter,
             a.state.ed.balance, tuple(a.state.log), a.state.proof) for a in card.apps]


# --- the ADF -------------------------------------------------------------------------------

def test_each_programme_is_an_adf_that_answers_points(image: dict) -> None:
    card = card_from_image(image)
    fci = P.Fci.parse(PointsHost(card).select())
    assert fci.df_name == MILES_AID and fci.label == "SKYMILES"
    assert (fci.currency_code, fci.currency_exponent) == (999, 0)   # points, not money
    public = P.PublicAppData.parse(fci.issuer_discretionary)
    assert public.issuer_id.hex() == "2000000000000001" and public.app_serial == DEMO_SERIAL
    assert PointsHost(card).balance() == 1000
    hotel = PointsHost(card, HOTEL_AID, HOTEL_KEYS)
    assert P.Fci.parse(hotel.select()).label == "HOTEL POINTS"
    assert hotel.balance() == 0
    purse = RawHost(card)
    assert P.Fci.parse(purse.select()).currency_code == 156   # the purse is untouched
    assert purse.balance() == 0


def test_load_and_redeem_points_with_the_programme_keys(image: dict) -> None:
    card = card_from_image(image)
    host = PointsHost(card)
    host.select()
    host.load(700)          # MAC1, MAC2 and TAC under the programme's keys (checked plainly)
    r = host.purchase(300)  # redeem: the EP purchase, unchanged
    assert r["init"].balance == 1700
    assert host.balance() == 1400
    data, sw = host.send("00B201C417")
    assert sw == 0x9000
    newest = P.LogRecord.parse(data)
    assert (newest.amount, newest.txn_type) == (300, P.TYPE_EP_PURCHASE)
    data, sw = host.send("00B202C417")
    assert sw == 0x9000 and P.LogRecord.parse(data).txn_type == P.TYPE_EP_LOAD
    assert host.sw("00B203C417") == 0x6A83
    # the other programme and the purse keep their own balances and logs
    hotel = PointsHost(card, HOTEL_AID, HOTEL_KEYS)
    hotel.select()
    assert hotel.balance() == 0 and hotel.sw("00B201C417") == 0x6A83
    purse = RawHost(card)
    purse.select()
    assert purse.balance() == 0 and purse.sw("00B201C417") == 0x6A83


def test_programme_keys_are_its_own(image: dict) -> None:
    """The hotel programme's keys do not redeem skymiles, nor the purse's."""
    card = card_from_image(image)
    before = value(card)
    wrong = PointsHost(card, MILES_AID, HOTEL_KEYS)
    wrong.select()
    init = wrong.init_purchase(10)
    sk = wrong.purchase_session_key(init, 5)
    assert wrong.sw(wrong.debit_apdu(5, wrong.purchase_mac1(sk, 10))) == 0x9302
    purse_keys = RawHost(card)
    host = PointsHost(card)
    host.select()
    init = host.init_purchase(10)
    sk = purse_keys.purchase_session_key(init, 6)
    assert host.sw(host.debit_apdu(6, purse_keys.purchase_mac1(sk, 10))) == 0x9302
    assert value(card) == before


# --- refused with nothing written ----------------------------------------------------------

def test_refusals_write_nothing(tmp_path: Path, image: dict) -> None:
    path = tmp_path / "card.json"
    save_new_image(path, image)
    card = open_card(path)
    try:
        host = PointsHost(card)
        host.select()
        before = value(card)
        on_disk = read_image(path)["loyalty"]
        # points redeemed beyond the balance
        assert host.sw(host.init_purchase_apdu(1001)) == 0x9401
        # a load past the programme's limit (5000)
        assert host.sw(host.init_load_apdu(4001)) == 0x6985
        # a wrong MAC: on a redemption and on a load
        init = host.init_purchase(10)
        sk = host.purchase_session_key(init, 9)
        assert host.sw(host.debit_apdu(9, host.purchase_mac1(sk, 11))) == 0x9302
        host.init_load(10)
        assert host.sw(host.credit_apdu(bytes(4))) == 0x9302
        # what a programme does not have: the ED, a PIN, the composite purchase, goods writes
        assert host.sw(host.init_purchase_apdu(10, purse=1)) == 0x6A86
        assert host.sw("805C000104") == 0x6A86
        assert host.sw("0020000003123456") == 0x6D00
        assert host.sw("805003020B0100000064112233445566") == 0x6A86
        assert host.sw("805005010B0100000064112233445566") == 0x6A86   # unload
        assert host.sw("80DC018C28" + "00" * 40) == 0x6D00
        assert host.sw("00B0960000") == 0x6A82   # no holder data
        # a load session is not completed by DEBIT, nor a purchase by CREDIT
        host.init_load(10)
        assert host.sw(host.debit_apdu(1, bytes(4))) == 0x6985
        host.init_purchase(10)
        assert host.sw(host.credit_apdu(bytes(4))) == 0x6985
        assert value(card) == before
        after = read_image(path)["loyalty"]
        for key in ("ep", "log", "proof", "pending_log"):
            assert after[0][key] == on_disk[0][key]
        assert after[0]["purchase_mac_failures"] == {"1": 1}   # counted, not value
        # a programme the card lacks
        assert host.sw("00A4040009F05356434152440409") == 0x6A82
    finally:
        card.close()


def test_a_card_without_programmes_refuses_their_aid() -> None:
    card = card_from_image(image_from_profile(FIXTURES / "iep-demo.toml"))
    assert len(card.apps) == 1
    assert RawHost(card).sw("00A4040009" + MILES_AID.hex()) == 0x6A82


# --- the image ------------------------------------------------------------------------------

def test_image_keeps_each_programme_and_reopens(tmp_path: Path, image: dict) -> None:
    path = tmp_path / "card.json"
    save_new_image(path, image)
    card = open_card(path)
    try:
        host = PointsHost(card, HOTEL_AID, HOTEL_KEYS)
        host.select()
        host.load(250)
    finally:
        card.close()
    raw = read_image(path)
    assert [p["programme"] for p in raw["loyalty"]] == ["skymiles", "hotel-points"]
    assert raw["loyalty"][1]["ep"]["balance"] == 250
    assert "holder_data" not in raw["loyalty"][1] and "goods" not in raw["loyalty"][1]
    card = open_card(path)
    try:
        assert programme(card, "hotel-points").state.ep.balance == 250
        assert programme(card, "skymiles").state.ep.balance == 1000
    finally:
        card.close()
    assert "KEY" not in repr(programme(card_from_image(raw), "skymiles")).upper()


def test_a_damaged_programme_entry_is_named(image: dict) -> None:
    bad = json.loads(json.dumps(image))
    bad["loyalty"][1]["ep"]["balance"] = "12"
    with pytest.raises(ImageError, match=r"loyalty\[1\]\.ep\.balance"):
        check_image(bad, "card.json")
    with pytest.raises(ImageError, match=r"card.json: loyalty\[1\]\.ep\.balance"):
        card_from_image(bad, source="card.json")
    bad = json.loads(json.dumps(image))
    bad["loyalty"][0]["tac_key"] = "00"
    with pytest.raises(ImageError, match=r"loyalty\[0\]\.tac_key") as caught:
        check_image(bad, "card.json")
    assert MILES_KEYS["tac"] not in str(caught.value)


@pytest.mark.parametrize(("programmes", "field"), [
    (TWO_PROGRAMMES.replace('"hotel-points"', '"skymiles"'), r"loyalty\[1\]\.programme"),
    (TWO_PROGRAMMES.replace(HOTEL_AID.hex().upper(), MILES_AID.hex().upper()),
     r"loyalty\[1\]\.aid"),
    (TWO_PROGRAMMES.replace(HOTEL_AID.hex().upper(), "F053564341524401"),   # the purse's prefix
     r"loyalty\[1\]\.aid"),
    (TWO_PROGRAMMES.replace("points = 1000", "points = 6000"), r"loyalty\[0\]\.points"),
    (TWO_PROGRAMMES.replace('issuer = "hotel-issuer.toml"', ""), r"loyalty\[1\]\.issuer"),
    (TWO_PROGRAMMES.replace('"hotel-issuer.toml"', '"nowhere.toml"'), r"loyalty\[1\]\.issuer"),
    (TWO_PROGRAMMES.replace('"skymiles"', '"Sky Miles"'), r"loyalty\[0\]\.programme"),
])
def test_profile_errors_name_the_field(tmp_path: Path, programmes: str, field: str) -> None:
    with pytest.raises(ProfileError, match=field):
        image_from_profile(write_profile(tmp_path, programmes))


def test_explicit_programme_keys(tmp_path: Path) -> None:
    factor = DEMO_SERIAL[-8:]
    keys = {k: plain_diversify(bytes.fromhex(v), factor).hex().upper()
            for k, v in MILES_KEYS.items()}
    programmes = f"""
[[loyalty]]
programme = "skymiles"
aid = "{MILES_AID.hex().upper()}"
issuer_id = "2000000000000001"
points = 40
[loyalty.keys]
tac = "{keys['tac']}"
purchase = [{{ index = 1, key = "{keys['purchase']}" }}]
load = [{{ index = 1, key = "{keys['load']}" }}]
"""
    card = card_from_image(image_from_profile(write_profile(tmp_path, programmes)))
    host = PointsHost(card)
    host.select()
    host.purchase(40)
    assert host.balance() == 0


# --- tearing: a power cut at every write step of a load and of a redemption ---------------

def _redeem(path: Path, tear: Tear) -> bytes:
    card = open_card(path, tear=tear)
    try:
        host = PointsHost(card)
        host.select()
        init = host.init_purchase(300)
        sk = host.purchase_session_key(init, 77)
        apdu = host.debit_apdu(77, host.purchase_mac1(sk, 300))
        tear.armed = True
        return bytes(card.transmit(apdu))
    finally:
        card.close()


def _load(path: Path, tear: Tear) -> bytes:
    card = open_card(path, tear=tear)
    try:
        host = PointsHost(card)
        host.select()
        init = host.init_load(300)
        apdu = host.credit_apdu(host.load_mac2(host.load_session_key(init), 300))
        tear.armed = True
        return bytes(card.transmit(apdu))
    finally:
        card.close()


@pytest.mark.parametrize(("flow", "txn_type", "counter", "sign"), [
    (_redeem, P.TYPE_EP_PURCHASE, "offline_counter", -1),
    (_load, P.TYPE_EP_LOAD, "online_counter", +1),
])
def test_power_cut_at_every_write_step(tmp_path: Path, image: dict, flow, txn_type: int,
                                       counter: str, sign: int) -> None:
    dry = tmp_path / "dry.json"
    save_new_image(dry, image)
    tear = Tear(None)
    assert flow(dry, tear)[-2:] == b"\x90\x00"
    assert len(tear.steps) == 2 * len(WRITE_STEPS)
    outcomes = []
    for cut in range(len(tear.steps)):
        path = tmp_path / f"cut{cut}.json"
        save_new_image(path, image)
        before = read_image(path)
        with pytest.raises(PowerCut):
            flow(path, Tear(cut))
        card = open_card(path)   # power back: an interrupted log write finishes by itself
        try:
            miles = programme(card, "skymiles").state
            assert miles.pending_log is None
            moved = miles.ep.balance != 1000
            outcomes.append(moved)
            host = PointsHost(card)
            host.select()
            _, sw = host.send(bytes([0x80, 0x5A, 0x00, txn_type, 0x02, 0x00, 0x00, 0x08]))
            if moved:
                assert miles.ep.balance == 1000 + sign * 300
                assert getattr(miles.ep, counter) == 1 and len(miles.log) == 1
                assert sw == 0x9000
            else:
                assert programme(card, "skymiles").to_state() == before["loyalty"][0]
                assert sw == 0x9406
            # the purse and the other programme never move
            assert card.apps[0].to_state() == before["app"]
            assert programme(card, "hotel-points").to_state() == before["loyalty"][1]
        finally:
            card.close()
    assert outcomes.count(False) >= 3 and outcomes.count(True) >= 4


def test_plain_tac_of_a_redemption(image: dict) -> None:
    """The TAC is the programme's, computed the plain way over the points redeemed."""
    card = card_from_image(image)
    host = PointsHost(card)
    host.select()
    r = host.purchase(5, ttn=3)
    assert r["tac"] == plain_tac(host.keys["dtk"], u4(5) + bytes([6]) + TID + u4(3) + DATE + TIME)
    init = host.init_purchase(1)
    sk = tdes_encrypt_block(host.keys["dpk"], init.random + init.counter.to_bytes(2, "big")
                            + u4(4)[2:])
    assert host.sw(host.debit_apdu(4, plain_mac(sk, u4(1) + b"\x06" + TID + DATE + TIME))) \
        == 0x9000


def test_card_show_lists_each_programme(tmp_path: Path, image: dict) -> None:
    from click.testing import CliRunner

    from svcard.host.cli.main import main

    path = tmp_path / "card.json"
    save_new_image(path, image)
    card = open_card(path)
    try:
        host = PointsHost(card)
        host.select()
        host.purchase(120)
    finally:
        card.close()
    result = CliRunner().invoke(main, ["card", "show", str(path)], prog_name="svcard")
    assert result.exit_code == 0, result.output
    assert "skymiles (SKYMILES) AID F05356434152440401 issuer 2000000000000001: 880 pts" \
        in result.output
    assert "hotel-points (HOTEL POINTS)" in result.output and "120 pts" in result.output
    assert MILES_KEYS["tac"] not in result.output
    result = CliRunner().invoke(main, ["card", "show", str(path), "--json"], prog_name="svcard")
    shown = json.loads(result.output)["loyalty"]
    assert [p["points"] for p in shown] == [880, 0]
    assert shown[0]["log"][0]["amount"] == 120
    assert "tac_key" not in result.output and "load_keys" not in result.output


def test_an_image_with_too_many_log_records_is_refused(image: dict) -> None:
    bad = json.loads(json.dumps(image))
    bad["loyalty"][0]["log"] = ["00" * P.LOG_RECORD_SIZE] * (P.LOG_RECORDS + 1)
    with pytest.raises(ImageError, match=r"loyalty\[0\]\.log"):
        check_image(bad, "card.json")
    bad = json.loads(json.dumps(image))
    bad["loyalty"] = bad["loyalty"] * 5    # 10 programmes: more than a card holds
    with pytest.raises(ImageError, match=r"loyalty"):
        card_from_image(bad, source="card.json")
