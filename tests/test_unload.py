"""Unload (INITIALIZE FOR UNLOAD 80 50 05 01, DEBIT FOR UNLOAD 80 54 03 00) on the ED: MACs
computed the plain way, the MAC-failure lockout, GET TRANSACTION PROVE, the issuer's HSM, and
a power cut at every write step."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import demo_image, with_balance
from plain import demo_issuer, plain_diversify, plain_mac, tdes_encrypt_block
from rawhost import DATE, DEMO_SERIAL, TID, TIME, RawHost, u4

from svcard.card.iep_commands.lockout import unlock_keys
from svcard.card.image import card_from_image, open_card, save_new_image
from svcard.card.storage import WRITE_STEPS, PowerCut, read_image

PIN = "123456"
TYPE_UNLOAD = 0x03


def dulk(serial: bytes = DEMO_SERIAL) -> bytes:
    master = bytes.fromhex(demo_issuer()["unload_keys"][0]["master_key"])
    return plain_diversify(master, serial[-8:])


class UnloadHost(RawHost):
    def init_unload_apdu(self, amount: int, key_index: int = 1, purse: int = 1) -> bytes:
        return bytes([0x80, 0x50, 0x05, purse, 0x0B, key_index]) + u4(amount) + TID + b"\x10"

    def init_unload(self, amount: int) -> dict:
        data, sw = self.send(self.init_unload_apdu(amount))
        assert sw == 0x9000, hex(sw)
        assert len(data) == 16
        init = {"balance": int.from_bytes(data[0:4], "big"),
                "counter": int.from_bytes(data[4:6], "big"), "version": data[6],
                "algorithm": data[7], "random": data[8:12], "mac1": data[12:16]}
        init["sk"] = tdes_encrypt_block(dulk(), init["random"]
                                        + init["counter"].to_bytes(2, "big") + b"\x80\x00")
        assert init["mac1"] == plain_mac(init["sk"], u4(init["balance"]) + u4(amount)
                                         + bytes([TYPE_UNLOAD]) + TID)
        return init

    @staticmethod
    def mac2(sk: bytes, amount: int) -> bytes:
        return plain_mac(sk, u4(amount) + bytes([TYPE_UNLOAD]) + TID + DATE + TIME)

    @staticmethod
    def debit_apdu(mac2: bytes) -> bytes:  # type: ignore[override]
        return b"\x80\x54\x03\x00\x0b" + DATE + TIME + mac2 + b"\x04"

    def unload(self, amount: int) -> dict:
        init = self.init_unload(amount)
        mac2 = self.mac2(init["sk"], amount)
        data, sw = self.send(self.debit_apdu(mac2))
        assert sw == 0x9000, hex(sw)
        mac3 = plain_mac(init["sk"], u4(init["balance"] - amount)
                         + init["counter"].to_bytes(2, "big") + u4(amount)
                         + bytes([TYPE_UNLOAD]) + TID + DATE + TIME)
        assert data == mac3
        return {**init, "mac2": mac2, "mac3": mac3}


def ed_card(ed: int = 1000, **app: object):
    return card_from_image(with_balance(demo_image("iep", **app), ed=ed))


def opened(card) -> UnloadHost:
    host = UnloadHost(card)
    host.select()
    assert host.verify(PIN) == 0x9000
    return host


def test_unload_debits_the_ed_and_answers_mac3() -> None:
    card = ed_card(1000)
    host = opened(card)
    done = host.unload(300)
    assert host.balance(1) == 700
    state = card.apps[0].state
    assert state.ed.online_counter == 1 and state.ed.offline_counter == 0
    assert state.ep.balance == 0
    record, sw = host.send("00B201C417")
    assert sw == 0x9000
    assert record[0:2] == b"\x00\x00"              # the counter INITIALIZE answered
    assert record[5:9] == u4(300) and record[9] == TYPE_UNLOAD and record[10:16] == TID
    assert record[16:20] == DATE and record[20:23] == TIME
    proof, sw = host.send(bytes([0x80, 0x5A, 0x00, TYPE_UNLOAD, 0x02, 0x00, 0x00, 0x08]))
    assert sw == 0x9000 and proof == done["mac2"] + done["mac3"]
    # a second unload uses the next online counter
    again = host.unload(700)
    assert again["counter"] == 1 and host.balance(1) == 0


def test_unload_needs_the_ed_the_pin_the_funds_and_the_key() -> None:
    card = ed_card(1000)
    host = UnloadHost(card)
    host.select()
    assert host.sw(host.init_unload_apdu(100)) == 0x6982            # no VERIFY yet
    assert host.verify(PIN) == 0x9000
    assert host.sw(host.init_unload_apdu(100, purse=2)) == 0x6A86   # the EP does not unload
    assert host.sw(host.init_unload_apdu(1001)) == 0x9401
    assert host.sw(host.init_unload_apdu(100, key_index=9)) == 0x9403
    assert host.sw(bytes([0x80, 0x50, 0x05, 0x01, 0x07]) + bytes(7)) == 0x6700
    # an image written before unload keys existed loads, and answers 9403
    image = with_balance(demo_image("iep"), ed=1000)
    del image["app"]["unload_keys"]
    old = opened(card_from_image(image))
    assert old.sw(old.init_unload_apdu(100)) == 0x9403
    assert host.balance(1) == 1000


def test_debit_of_the_wrong_kind_is_refused_and_spends_the_session() -> None:
    card = ed_card(1000)
    host = opened(card)
    init = host.init_unload(100)
    # a purchase DEBIT after INITIALIZE FOR UNLOAD
    assert host.sw(b"\x80\x54\x01\x00\x0f" + u4(1) + DATE + TIME + bytes(4) + b"\x08") == 0x6985
    assert host.sw(host.debit_apdu(host.mac2(init["sk"], 100))) == 0x6985   # spent
    # an unload DEBIT after INITIALIZE FOR PURCHASE
    host.init_purchase(10, purse=1)
    assert host.sw(host.debit_apdu(bytes(4))) == 0x6985
    # a CREDIT FOR LOAD after INITIALIZE FOR UNLOAD
    host.init_unload(100)
    assert host.sw(host.credit_apdu(bytes(4))) == 0x6985
    assert host.balance(1) == 1000
    assert card.apps[0].state.log == []


def test_wrong_mac2_counts_locks_the_unload_key_and_changes_nothing() -> None:
    card = ed_card(1000, mac_failure_limit=3)
    host = opened(card)
    state = card.apps[0].state
    for n in (1, 2):
        host.init_unload(100)
        assert host.sw(host.debit_apdu(b"\x00\x11\x22\x33")) == 0x9302
        assert state.unload_mac_failures == {1: n}
    # a right MAC2 restarts the count, in the same write as the debit
    host.unload(100)
    assert state.unload_mac_failures == {} and host.balance(1) == 900
    for _ in range(3):
        host.init_unload(100)
        assert host.sw(host.debit_apdu(b"\x00\x11\x22\x33")) == 0x9302
    assert host.sw(host.init_unload_apdu(100)) == 0x6983               # locked
    assert host.balance(1) == 900 and state.ed.online_counter == 1
    unlock_keys(state)                  # the issuer's unlock, at re-personalisation
    host.unload(100)
    assert host.balance(1) == 800
    # the other keys still work: a load of the ED
    assert state.load_mac_failures == {} and state.purchase_mac_failures == {}
    host.load(50, purse=1)
    assert host.balance(1) == 850


def test_the_issuer_hsm_authorizes_and_checks_an_unload() -> None:
    card = ed_card(1000)
    host = opened(card)
    hsm = card_from_image(demo_image("hsm"))
    assert hsm.transmit(b"\x00\xa4\x04\x00\x09" + bytes.fromhex("F05356434152440301"))[-2:] \
        == b"\x90\x00"
    issuer = bytes.fromhex(demo_issuer()["issuer_id"])
    init = host.init_unload(250)

    def hsm_apdu(p1: int, mac: bytes) -> bytes:
        body = (issuer + DEMO_SERIAL[-8:] + bytes([init["version"], init["algorithm"]])
                + u4(init["balance"]) + u4(250) + TID + init["counter"].to_bytes(2, "big")
                + init["random"] + DATE + TIME + mac)
        return bytes([0x80, 0xE8, p1, 0x00, len(body)]) + body + (b"\x04" if p1 == 0 else b"")

    assert hsm.transmit(hsm_apdu(0, b"\x00\x00\x00\x00"))[-2:] == b"\x93\x02"
    out = hsm.transmit(hsm_apdu(0, init["mac1"]))
    assert out[-2:] == b"\x90\x00" and out[:-2] == host.mac2(init["sk"], 250)
    # the earlier refusal spent the card's session: start again with the same HSM
    init = host.init_unload(250)
    mac2 = hsm.transmit(hsm_apdu(0, init["mac1"]))[:-2]
    mac3, sw = host.send(host.debit_apdu(mac2))
    assert sw == 0x9000 and host.balance(1) == 750
    assert hsm.transmit(hsm_apdu(1, mac3)) == b"\x90\x00"
    assert hsm.transmit(hsm_apdu(1, bytes(4))) == b"\x93\x02"


class Tear:
    """Counts image write steps once armed; cuts the power at step ``cut_at``."""

    def __init__(self, cut_at: int | None) -> None:
        self.cut_at, self.armed, self.steps = cut_at, False, []

    def __call__(self, step: str) -> None:
        if self.armed:
            self.steps.append(step)
            if len(self.steps) - 1 == self.cut_at:
                raise PowerCut(step)


def run_unload(path: Path, tear: Tear) -> dict:
    card = open_card(path, tear=tear)
    try:
        host = opened(card)
        init = host.init_unload(300)
        mac2 = host.mac2(init["sk"], 300)
        tear.armed = True
        return {"out": card.transmit(host.debit_apdu(mac2)), "mac2": mac2}
    finally:
        card.close()


def test_power_cut_at_every_write_step_of_an_unload(tmp_path: Path) -> None:
    def fresh(name: str) -> Path:
        path = tmp_path / name
        save_new_image(path, with_balance(demo_image("iep", fixed_random="A1B2C3D4"), ed=1000))
        return path

    tear = Tear(None)
    ok = run_unload(fresh("dry.json"), tear)
    assert ok["out"][-2:] == b"\x90\x00"
    assert len(tear.steps) == 2 * len(WRITE_STEPS)
    outcomes = []
    for cut in range(len(tear.steps)):
        path = fresh(f"cut{cut}.json")
        before = read_image(path)["app"]
        with pytest.raises(PowerCut):
            run_unload(path, Tear(cut))
        card = open_card(path)       # power comes back: a pending log record is written
        try:
            host = opened(card)
            after = card.apps[0].to_state()
            assert after["pending_log"] is None and after["ep"] == before["ep"]
            moved = after["ed"]["balance"] != 1000
            outcomes.append(moved)
            proof, sw = host.send(bytes([0x80, 0x5A, 0x00, TYPE_UNLOAD, 0x02, 0, 0, 0x08]))
            if moved:
                assert after["ed"] == {**before["ed"], "balance": 700, "online_counter": 1}
                assert len(after["log"]) == 1 and bytes.fromhex(after["log"][0])[9] == 3
                assert sw == 0x9000 and proof == ok["mac2"] + ok["out"][:-2]
            else:
                assert after == {**before, "log": [], "pending_log": None}
                assert sw == 0x9406
        finally:
            card.close()
    assert outcomes.count(False) >= 3 and outcomes.count(True) >= 4


def test_svcard_terminal_unload_and_the_log(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from svcard.host.cli.main import main

    iep, hsm = tmp_path / "iep.json", tmp_path / "hsm.json"
    save_new_image(iep, with_balance(demo_image("iep"), ed=10000))
    save_new_image(hsm, demo_image("hsm"))
    cards = ["--card", f"virtual:{iep}", "--hsm", f"virtual:{hsm}"]
    run = CliRunner().invoke
    done = run(main, ["terminal", "unload", *cards, "--amount", "12.34", "--pin", PIN,
                      "--at", "2027-03-14 15:09:26"])
    assert done.exit_code == 0, done.output
    assert "ED unload of CNY 12.34 done" in done.output and "CNY 87.66" in done.output
    assert read_image(iep)["app"]["ed"]["balance"] == 8766
    nopin = run(main, ["terminal", "unload", *cards, "--amount", "1", "--json"])
    assert nopin.exit_code != 0 and "--pin" in nopin.output
    over = run(main, ["terminal", "unload", *cards, "--amount", "1000", "--pin", PIN])
    assert over.exit_code != 0 and "INITIALIZE FOR UNLOAD: 9401" in over.output
    badtid = run(main, ["terminal", "unload", *cards, "--amount", "1", "--pin", PIN,
                        "--terminal-id", "0102"])
    assert badtid.exit_code == 2 and "--terminal-id" in badtid.output
    log = run(main, ["terminal", "log", "--card", f"virtual:{iep}"])
    assert log.exit_code == 0 and "unload" in log.output and "CNY 12.34" in log.output
    assert read_image(iep)["app"]["ed"]["balance"] == 8766


def test_the_overdraft_credit_is_never_unloaded() -> None:
    """The ED balance includes the overdraft credit: only the holder's own value (balance less
    the limit) unloads, so raising the limit and unloading cannot turn credit into cash."""
    image = with_balance(demo_image("iep"), ed=1000)
    image["app"]["ed"]["overdraft_limit"] = 500
    host = opened(card_from_image(image))
    assert host.sw(host.init_unload_apdu(501)) == 0x9401
    host.unload(500)
    assert host.balance(1) == 500
    assert host.sw(host.init_unload_apdu(1)) == 0x9401
    image = with_balance(demo_image("iep"), ed=300)     # already using 200 of the credit
    image["app"]["ed"]["overdraft_limit"] = 500
    host = opened(card_from_image(image))
    assert host.sw(host.init_unload_apdu(1)) == 0x9401
