"""Overdraft-limit update (INITIALIZE FOR UPDATE 80 50 04 01, UPDATE OVERDRAFT LIMIT 80 58) on
the ED: MACs and TAC computed the plain way, the balance moving by the change of limit, the
lockout, GET TRANSACTION PROVE, the issuer's HSM, and a power cut at every write step."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import demo_image, with_balance
from plain import demo_issuer, plain_diversify, plain_mac, plain_tac, tdes_encrypt_block
from rawhost import DATE, DEMO_SERIAL, TID, TIME, RawHost, u4

from svcard.card.image import card_from_image, open_card, save_new_image
from svcard.card.storage import WRITE_STEPS, PowerCut, read_image

PIN = "123456"
TYPE_UPDATE = 0x07


def u3(v: int) -> bytes:
    return v.to_bytes(3, "big")


def duk(serial: bytes = DEMO_SERIAL) -> bytes:
    master = bytes.fromhex(demo_issuer()["update_keys"][0]["master_key"])
    return plain_diversify(master, serial[-8:])


class UpdateHost(RawHost):
    def init_update_apdu(self, key_index: int = 1, purse: int = 1) -> bytes:
        return bytes([0x80, 0x50, 0x04, purse, 0x07, key_index]) + TID + b"\x13"

    def init_update(self) -> dict:
        data, sw = self.send(self.init_update_apdu())
        assert sw == 0x9000, hex(sw)
        assert len(data) == 19
        init = {"balance": int.from_bytes(data[0:4], "big"),
                "counter": int.from_bytes(data[4:6], "big"),
                "limit": int.from_bytes(data[6:9], "big"), "version": data[9],
                "algorithm": data[10], "random": data[11:15], "mac1": data[15:19]}
        init["sk"] = tdes_encrypt_block(duk(), init["random"]
                                        + init["counter"].to_bytes(2, "big") + b"\x80\x00")
        assert init["mac1"] == plain_mac(init["sk"], u4(init["balance"]) + u3(init["limit"])
                                         + bytes([TYPE_UPDATE]) + TID)
        return init

    @staticmethod
    def mac2(sk: bytes, new_limit: int) -> bytes:
        return plain_mac(sk, u3(new_limit) + bytes([TYPE_UPDATE]) + TID + DATE + TIME)

    @staticmethod
    def update_apdu(new_limit: int, mac2: bytes) -> bytes:
        return b"\x80\x58\x00\x00\x0e" + u3(new_limit) + DATE + TIME + mac2 + b"\x04"

    def update(self, new_limit: int) -> dict:
        init = self.init_update()
        mac2 = self.mac2(init["sk"], new_limit)
        data, sw = self.send(self.update_apdu(new_limit, mac2))
        assert sw == 0x9000, hex(sw)
        after = init["balance"] + new_limit - init["limit"]
        tac = plain_tac(self.keys["dtk"], u4(after) + init["counter"].to_bytes(2, "big")
                        + u3(new_limit) + bytes([TYPE_UPDATE]) + TID + DATE + TIME)
        assert data == tac
        return {**init, "mac2": mac2, "tac": tac}


def ed_card(ed: int = 1000, **app: object):
    return card_from_image(with_balance(demo_image("iep", **app), ed=ed))


def opened(card) -> UpdateHost:
    host = UpdateHost(card)
    host.select()
    assert host.verify(PIN) == 0x9000
    return host


def test_update_sets_the_limit_moves_the_balance_and_answers_the_tac() -> None:
    card = ed_card(1000)
    host = opened(card)
    done = host.update(500)
    assert done["limit"] == 0 and host.balance(1) == 1500
    state = card.apps[0].state
    assert state.ed.overdraft_limit == 500 and state.ed.online_counter == 1
    assert state.ep.overdraft_limit == 0
    record, sw = host.send("00B201C417")
    assert sw == 0x9000
    assert record[0:2] == b"\x00\x00" and record[2:5] == u3(500)
    assert record[5:9] == u4(0) and record[9] == TYPE_UPDATE and record[10:16] == TID
    proof, sw = host.send(bytes([0x80, 0x5A, 0x00, TYPE_UPDATE, 0x02, 0x00, 0x00, 0x08]))
    assert sw == 0x9000 and proof == done["mac2"] + done["tac"]
    # INITIALIZE FOR PURCHASE now shows the limit; the overdraft can be spent
    assert host.init_purchase(1500, purse=1).overdraft == 500
    # lowering the limit takes the balance down by the difference
    lower = host.update(200)
    assert lower["limit"] == 500 and lower["counter"] == 1 and host.balance(1) == 1200


def test_a_lower_limit_the_balance_cannot_cover_is_refused() -> None:
    card = ed_card(100)
    host = opened(card)
    host.update(500)                           # balance 600, of which 500 overdraft
    host.purchase(550, purse=1, txn_type=5)    # balance 50
    init = host.init_update()
    assert host.sw(host.update_apdu(0, host.mac2(init["sk"], 0))) == 0x9401
    state = card.apps[0].state
    assert state.ed.overdraft_limit == 500 and state.ed.balance == 50
    assert state.ed.online_counter == 1


def test_update_needs_the_ed_the_pin_and_the_key() -> None:
    card = ed_card(1000)
    host = UpdateHost(card)
    host.select()
    assert host.sw(host.init_update_apdu()) == 0x6982
    assert host.verify(PIN) == 0x9000
    assert host.sw(host.init_update_apdu(purse=2)) == 0x6A86
    assert host.sw(host.init_update_apdu(key_index=7)) == 0x9403
    assert host.sw(bytes([0x80, 0x50, 0x04, 0x01, 0x0B]) + bytes(11)) == 0x6700
    assert host.sw(host.update_apdu(5, bytes(4))) == 0x6985       # nothing to complete
    image = with_balance(demo_image("iep"), ed=1000)
    del image["app"]["update_keys"]
    old = opened(card_from_image(image))
    assert old.sw(old.init_update_apdu()) == 0x9403
    init = host.init_update()
    bad_date = b"\x80\x58\x00\x00\x0e" + u3(5) + bytes.fromhex("20271332") + TIME \
        + host.mac2(init["sk"], 5) + b"\x04"
    assert host.sw(bad_date) == 0x6A80
    assert card.apps[0].state.ed.overdraft_limit == 0


def test_wrong_mac2_counts_and_locks_the_update_key() -> None:
    card = ed_card(1000, mac_failure_limit=2)
    host = opened(card)
    state = card.apps[0].state
    for n in (1, 2):
        host.init_update()
        assert host.sw(host.update_apdu(900, b"\x01\x02\x03\x04")) == 0x9302
        assert state.update_mac_failures == {1: n}
    assert host.sw(host.init_update_apdu()) == 0x6983
    assert state.ed.overdraft_limit == 0 and state.ed.balance == 1000
    assert state.unload_mac_failures == {}
    host.load(10, purse=1)                      # other keys go on working


def test_the_issuer_hsm_authorizes_and_checks_an_update() -> None:
    card = ed_card(1000)
    host = opened(card)
    hsm = card_from_image(demo_image("hsm"))
    hsm.transmit(b"\x00\xa4\x04\x00\x09" + bytes.fromhex("F05356434152440301"))
    issuer = bytes.fromhex(demo_issuer()["issuer_id"])
    init = host.init_update()

    def hsm_apdu(p1: int, mac: bytes) -> bytes:
        body = (issuer + DEMO_SERIAL[-8:] + bytes([init["version"], init["algorithm"]])
                + u4(init["balance"]) + u3(init["limit"]) + u3(800) + TID
                + init["counter"].to_bytes(2, "big") + init["random"] + DATE + TIME + mac)
        return bytes([0x80, 0xEA, p1, 0x00, len(body)]) + body + (b"\x04" if p1 == 0 else b"")

    out = hsm.transmit(hsm_apdu(0, init["mac1"]))
    assert out[-2:] == b"\x90\x00" and out[:-2] == host.mac2(init["sk"], 800)
    tac, sw = host.send(host.update_apdu(800, out[:-2]))
    assert sw == 0x9000 and host.balance(1) == 1800
    assert hsm.transmit(hsm_apdu(1, tac)) == b"\x90\x00"
    assert hsm.transmit(hsm_apdu(1, bytes(4))) == b"\x93\x02"
    assert hsm.transmit(hsm_apdu(0, bytes(4))) == b"\x93\x02"


class Tear:
    def __init__(self, cut_at: int | None) -> None:
        self.cut_at, self.armed, self.steps = cut_at, False, []

    def __call__(self, step: str) -> None:
        if self.armed:
            self.steps.append(step)
            if len(self.steps) - 1 == self.cut_at:
                raise PowerCut(step)


def run_update(path: Path, tear: Tear) -> dict:
    card = open_card(path, tear=tear)
    try:
        host = opened(card)
        init = host.init_update()
        mac2 = host.mac2(init["sk"], 400)
        tear.armed = True
        return {"out": card.transmit(host.update_apdu(400, mac2)), "mac2": mac2}
    finally:
        card.close()


def test_power_cut_at_every_write_step_of_an_update(tmp_path: Path) -> None:
    def fresh(name: str) -> Path:
        path = tmp_path / name
        save_new_image(path, with_balance(demo_image("iep", fixed_random="0A0B0C0D"), ed=1000))
        return path

    tear = Tear(None)
    ok = run_update(fresh("dry.json"), tear)
    assert ok["out"][-2:] == b"\x90\x00"
    assert len(tear.steps) == 2 * len(WRITE_STEPS)
    outcomes = []
    for cut in range(len(tear.steps)):
        path = fresh(f"cut{cut}.json")
        before = read_image(path)["app"]
        with pytest.raises(PowerCut):
            run_update(path, Tear(cut))
        card = open_card(path)
        try:
            host = opened(card)
            after = card.apps[0].to_state()
            assert after["pending_log"] is None
            moved = after["ed"]["overdraft_limit"] != 0
            outcomes.append(moved)
            proof, sw = host.send(bytes([0x80, 0x5A, 0x00, TYPE_UPDATE, 0x02, 0, 0, 0x08]))
            if moved:   # limit, balance and counter moved together, never one alone
                assert after["ed"] == {**before["ed"], "balance": 1400, "online_counter": 1,
                                       "overdraft_limit": 400}
                assert len(after["log"]) == 1 and bytes.fromhex(after["log"][0])[9] == 7
                assert sw == 0x9000 and proof == ok["mac2"] + ok["out"][:-2]
            else:
                assert after == {**before, "log": [], "pending_log": None}
                assert sw == 0x9406
        finally:
            card.close()
    assert outcomes.count(False) >= 3 and outcomes.count(True) >= 4


def test_svcard_terminal_overdraft_and_the_log(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from svcard.host.cli.main import main

    iep, hsm = tmp_path / "iep.json", tmp_path / "hsm.json"
    save_new_image(iep, with_balance(demo_image("iep"), ed=1000))
    save_new_image(hsm, demo_image("hsm"))
    cards = ["--card", f"virtual:{iep}", "--hsm", f"virtual:{hsm}"]
    run = CliRunner().invoke
    done = run(main, ["terminal", "overdraft", *cards, "--limit", "50", "--pin", PIN])
    assert done.exit_code == 0, done.output
    assert "ED overdraft limit CNY 0.00 -> CNY 50.00 set" in done.output
    ed = read_image(iep)["app"]["ed"]
    assert ed["overdraft_limit"] == 5000 and ed["balance"] == 6000
    too_big = run(main, ["terminal", "overdraft", *cards, "--limit", "200000", "--pin", PIN])
    assert too_big.exit_code != 0 and "at most" in too_big.output
    log = run(main, ["terminal", "log", "--card", f"virtual:{iep}", "--json"])
    assert log.exit_code == 0
    entry = __import__("json").loads(log.output)[0]
    assert entry["type_name"] == "overdraft limit update" and entry["overdraft_limit"] == 5000
    text = run(main, ["terminal", "log", "--card", f"virtual:{iep}"]).output
    assert "overdraft limit update" in text and "limit CNY 50.00" in text
