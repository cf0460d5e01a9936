"""Every IEP command: success paths (MACs checked the plain way) and error status words.

Each test runs on both cards: ``virtual`` (the Python card, the reference) and ``jcardsim``
(svcard's Java Card applet in jCardSim, in T=1, personalised from the same image; again as
``jcardsim-cbc-mac`` with the applet's own DES-CBC MAC; skipped unless JCARDSIM_JAR names the
jCardSim jar). What only the Python card's state shows is checked on the
virtual card alone, each with its reason; the same facts are checked on both through APDUs
where an APDU shows them (:func:`probe`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import demo_image, with_balance
from rawhost import DATE, DEMO_AID, TID, TIME, RawHost, u4

from svcard.card.image import card_from_image
from svcard.card.runtime import Card
from svcard.protocols import tlv


@dataclass
class Dut:
    """The IEP under test."""

    kind: str                           # "virtual", "jcardsim" or "jcardsim-cbc-mac"
    host: RawHost
    card: Card | None                   # the Python card (virtual only)
    power_cycle: Callable[[], object]


HostWith = Callable[..., tuple[RawHost, Dut]]


@pytest.fixture(params=["virtual", "jcardsim", "jcardsim-cbc-mac"])
def host_with(request: pytest.FixtureRequest) -> Iterator[HostWith]:
    """``host_with(ep=0, ed=0, select=True, **app_changes)``: a fresh demo IEP with those
    balances on the card this test runs on, and a RawHost that selected it. The applet runs
    twice: with the Signature MAC, and with its own DES-CBC MAC (install flag)."""
    kind = request.param
    applet = request.getfixturevalue("iep_applet") if kind != "virtual" else None
    applet_cards: list[Any] = []

    def make(ep: int = 0, ed: int = 0, select: bool = True,
             **changes: object) -> tuple[RawHost, Dut]:
        image = with_balance(demo_image("iep", **changes), ep, ed)
        if applet is None:
            card = card_from_image(image)
            dut = Dut("virtual", RawHost(card), card, card.reset)
        else:
            applet_card = applet.open(image, cbc_mac=kind == "jcardsim-cbc-mac")
            applet_cards.append(applet_card)
            dut = Dut(kind, RawHost(applet_card), None, applet_card.reset)
        if select:
            dut.host.select()
        return dut.host, dut

    yield make
    for applet_card in applet_cards:
        applet_card.close()


def probe(host: RawHost) -> dict[str, object]:
    """What APDUs show of the purse's persistent state: EP balance, PIN tries, both EP counters
    (INITIALIZE with amount 0: balance, counter, overdraft limit, key version and algorithm),
    the log and the proof of its newest record. Ends any open session (the ED needs a VERIFY,
    which would change the PIN tries: it is left out)."""
    out: dict[str, object] = {"balance": host.send("805C000204"),
                              "pin tries": host.sw("00200000")}
    data, sw = host.send(host.init_load_apdu(0))
    out["load init"] = (data[:8], sw)        # without random and MAC1
    data, sw = host.send(host.init_purchase_apdu(0))
    out["purchase init"] = (data[:11], sw)   # without random
    log = []
    for n in range(1, 11):
        record, sw = host.send(bytes([0x00, 0xB2, n, 0xC4, 0x17]))
        if sw != 0x9000:
            break
        log.append(record)
    out["log"] = log
    if log:
        out["proof"] = host.send(bytes([0x80, 0x5A, 0x00, log[0][9], 0x02]) + log[0][0:2]
                                 + b"\x08")
    return out


def snapshot(dut: Dut) -> dict[str, Any]:
    """The purse's state as APDUs show it and, on the Python card, its whole state but its
    MAC-failure counters (a wrong MAC counts, and nothing else changes: tests/test_card_lockout.py
    checks the counters). Sends APDUs: take it outside an INITIALIZE's session."""
    out: dict[str, Any] = {"apdus": probe(dut.host)}
    if dut.card is not None:
        state = copy.deepcopy(dut.card.apps[0].to_state())
        del state["purchase_mac_failures"], state["load_mac_failures"]
        out["state"] = state
    return out


def counters(host: RawHost) -> tuple[int, int]:
    """The EP's online and offline counters, through INITIALIZE (ends any session)."""
    return host.init_load(0).counter, host.init_purchase(0).counter


def failures(card: Card) -> tuple[dict, dict]:
    state = card.apps[0].to_state()
    return state["purchase_mac_failures"], state["load_mac_failures"]


# --- selection and files -------------------------------------------------------------------

def test_select_returns_fci_with_currency_and_public_data(host_with: HostWith) -> None:
    fci = host_with(select=False)[0].select()
    top = tlv.parse(fci)[0]
    assert top.tag == 0x6F
    assert tlv.find([top], 0x84).value == DEMO_AID  # type: ignore[union-attr]
    assert tlv.find([top], 0x5F2A).value == bytes.fromhex("0156")  # type: ignore[union-attr]
    assert tlv.find([top], 0x5F36).value == b"\x02"  # type: ignore[union-attr]
    assert len(tlv.find([top], 0x9F0C).value) == 30  # type: ignore[union-attr]


def test_select_partial_and_unknown_aid(host_with: HostWith) -> None:
    host, _ = host_with(select=False)
    assert host.sw("00A4040005F053564341") == 0x9000  # partial DF name selects
    assert host.sw("00A4040005A000000003") == 0x6A82
    assert host.sw("00A40403" + "05F053564341") == 0x6A86


def test_commands_before_select(host_with: HostWith) -> None:
    host, dut = host_with(select=False)
    # with no applet selected jCardSim's runtime answers (6986), no applet code runs
    assert host.sw("805C000204") == (0x6985 if dut.kind == "virtual" else 0x6986)


def test_read_binary_public_and_holder_data(host_with: HostWith) -> None:
    host, _ = host_with()
    data, sw = host.send("00B0950000")
    assert sw == 0x9000 and len(data) == 30
    assert data[0:8] == bytes.fromhex("1000000000000001")
    assert data[10:20] == bytes.fromhex("00000000000000000001")
    assert data[20:24] == bytes.fromhex("20260101") and data[24:28] == bytes.fromhex("20311231")
    data, sw = host.send("00B0960000")
    assert sw == 0x9000 and len(data) == 55 and data[2:13] == b"DEMO HOLDER"
    data, sw = host.send("00B0950A0A")
    assert sw == 0x9000 and data == bytes.fromhex("00000000000000000001")
    assert host.sw("00B0990000") == 0x6A82
    assert host.sw("00B0951E00") == 0x6B00
    assert host.sw("00B0000000") == 0x6A82  # no current EF


def test_unknown_ins_and_cla(host_with: HostWith) -> None:
    host, _ = host_with()
    assert host.sw("80CC000000") == 0x6D00
    assert host.sw("005C000204") == 0x6E00  # GET BALANCE is proprietary (CLA 80)
    assert host.sw("A05C000204") == 0x6E00
    assert host.sw("845C000204") == 0x6882  # secure messaging


@pytest.mark.parametrize("apdu", [
    "805C00020101AA04",       # GET BALANCE
    "805C000205D18ACCB90804",
    "805C00010101AA04",       # (the ED without VERIFY: the data is refused first)
    "805C00030101AA04",       # (no such purse: the data is refused first)
    "00B0950001AA00",         # READ BINARY
    "00B201C401AA17",         # READ RECORD
    "80CA9F7701AA00",         # GET DATA
])
def test_commands_without_data_refuse_data(host_with: HostWith, apdu: str) -> None:
    """A command that takes no data answers 6700 to data (the differential test's commonest
    finding on the applet)."""
    host, _ = host_with(ep=100)
    host.purchase(1)                          # a log record to read
    assert host.send(apdu) == (b"", 0x6700)


# --- GET BALANCE, PIN ----------------------------------------------------------------------

def test_get_balance_ep_and_ed_needs_pin(host_with: HostWith) -> None:
    host, _ = host_with(ep=1234, ed=555)
    assert host.balance(2) == 1234
    assert host.sw("805C000104") == 0x6982
    assert host.verify("123456") == 0x9000
    assert host.balance(1) == 555
    assert host.sw("805C000304") == 0x6A86
    assert host.sw("805C010204") == 0x6A86
    assert host.sw("805C000208") == 0x6C04


def test_pin_blocks_after_three_wrong_tries(host_with: HostWith) -> None:
    host, dut = host_with(ed=100)
    assert host.verify("000000") == 0x63C2
    assert host.sw("00200000") == 0x63C2  # retry counter query
    assert host.verify("111111") == 0x63C1
    assert host.verify("123456") == 0x9000  # a right PIN resets the counter
    assert host.verify("000000") == 0x63C2
    assert host.verify("000000") == 0x63C1
    assert host.verify("000000") == 0x6983
    assert host.verify("123456") == 0x6983  # blocked: even the right PIN fails
    assert host.sw("805C000104") == 0x6982
    assert host.sw("00200000") == 0x6983              # no tries left
    if dut.card is not None:  # the Python card's state, as the APDU above shows it
        assert dut.card.apps[0].to_state()["pin_tries_left"] == 0
    assert host.sw(host.init_purchase_apdu(1, purse=1)) == 0x6982


def test_verify_wrong_length_and_p2(host_with: HostWith) -> None:
    host, _ = host_with()
    assert host.sw("0020000001AA") == 0x6700
    assert host.sw("00200001021234") == 0x6A86


def test_change_pin(host_with: HostWith) -> None:
    host, _ = host_with(ed=10)
    assert host.sw("805E01000712 34 56 FF 65 43 21".replace(" ", "")) == 0x9000
    assert host.verify("123456") == 0x63C2
    assert host.verify("654321") == 0x9000


# --- load ----------------------------------------------------------------------------------

def test_load_success_updates_balance_counter_log_and_proof(host_with: HostWith) -> None:
    host, dut = host_with(ep=100)
    result = host.load(2500)
    assert host.balance() == 2600
    if dut.card is not None:  # the Python card's state, as counters() shows it on both
        state = dut.card.apps[0].to_state()
        assert state["ep"]["online_counter"] == 1 and state["ep"]["offline_counter"] == 0
    assert counters(host) == (1, 0)
    record, sw = host.send("00B201C417")
    assert sw == 0x9000
    assert record == (b"\x00\x00" + b"\x00\x00\x00" + u4(2500) + b"\x02" + TID + DATE + TIME)
    data, sw = host.send("805A000202" + "0000" + "08")
    assert sw == 0x9000 and data[4:] == result["tac"]


def test_ed_load_needs_pin(host_with: HostWith) -> None:
    host, _ = host_with()
    assert host.sw(host.init_load_apdu(100, purse=1)) == 0x6982
    assert host.verify("123456") == 0x9000
    host.load(100, purse=1)
    assert host.balance(1) == 100


def test_load_over_the_balance_limit_is_refused(host_with: HostWith) -> None:
    host, dut = host_with(ep=99_000)
    before = snapshot(dut)
    assert host.sw(host.init_load_apdu(1_001)) == 0x6985
    assert snapshot(dut) == before
    host.load(1_000)  # exactly to the limit is fine
    assert host.balance() == 100_000
    assert before["apdus"]["balance"] == (u4(99_000), 0x9000)
    if dut.card is not None:  # the Python card's state, as the line above shows it
        assert before["state"]["ep"]["balance"] == 99_000


def test_credit_with_bad_mac_changes_nothing(host_with: HostWith) -> None:
    host, dut = host_with(ep=100)
    before = snapshot(dut)  # before the INITIALIZE: a snapshot's APDUs would end its session
    init = host.init_load(50)
    sk = host.load_session_key(init)
    bad = bytearray(host.load_mac2(sk, 50))
    bad[0] ^= 1
    assert host.sw(host.credit_apdu(bytes(bad))) == 0x9302
    if dut.card is not None:  # no APDU shows a count below the lock (test_wrong_macs_lock_...)
        assert failures(dut.card) == ({}, {"1": 1})  # the wrong S2 counts against load key 1
    # the session is gone: even the right MAC now needs a new INITIALIZE
    assert host.sw(host.credit_apdu(host.load_mac2(sk, 50))) == 0x6985
    assert snapshot(dut) == before


def test_credit_without_initialize_and_after_purchase_init(host_with: HostWith) -> None:
    host, _ = host_with(ep=100)
    assert host.sw(host.credit_apdu(bytes(4))) == 0x6985
    host.init_purchase(10)
    assert host.sw(host.credit_apdu(bytes(4))) == 0x6985


@pytest.mark.parametrize("change", ["amount", "terminal", "date", "counter", "type"])
def test_changed_load_fields_break_mac2(host_with: HostWith, change: str) -> None:
    host, dut = host_with(ep=100)
    before = snapshot(dut)
    init = host.init_load(50)
    sk = host.load_session_key(init)
    if change == "counter":
        init.counter += 1
        sk = host.load_session_key(init)
    amount = 51 if change == "amount" else 50
    tid = bytes.fromhex("112233445567") if change == "terminal" else TID
    txn_type = 1 if change == "type" else 2
    mac2 = host.load_mac2(sk, amount, txn_type, tid)
    date = bytes.fromhex("20270315") if change == "date" else DATE
    assert host.sw(host.credit_apdu(mac2, date=date)) == 0x9302
    assert snapshot(dut) == before


def test_replayed_credit_is_refused(host_with: HostWith) -> None:
    host, _ = host_with(ep=0)
    init = host.init_load(70)
    credit = host.credit_apdu(host.load_mac2(host.load_session_key(init), 70))
    assert host.sw(credit) == 0x9000
    assert host.sw(credit) == 0x6985           # no session any more
    host.init_load(70)
    assert host.sw(credit) == 0x9302           # new random and counter: old MAC2 is useless
    assert host.balance() == 70


def test_credit_with_a_bad_date_is_refused_before_the_mac(host_with: HostWith) -> None:
    host, dut = host_with()
    before = snapshot(dut)
    init = host.init_load(5)
    mac2 = host.load_mac2(host.load_session_key(init), 5, date=bytes.fromhex("20271399"))
    assert host.sw(host.credit_apdu(mac2, date=bytes.fromhex("20271399"))) == 0x6A80
    if dut.card is not None:  # no APDU shows a count below the lock
        assert failures(dut.card) == ({}, {})  # refused before the MAC: nothing counted
    assert snapshot(dut) == before


# --- purchase ------------------------------------------------------------------------------

def test_purchase_success(host_with: HostWith) -> None:
    host, dut = host_with(ep=1000)
    result = host.purchase(250, ttn=0x01020304)
    assert host.balance() == 750
    if dut.card is not None:  # the Python card's state, as counters() shows it on both
        state = dut.card.apps[0].to_state()
        assert state["ep"]["offline_counter"] == 1 and state["ep"]["online_counter"] == 0
    assert counters(host) == (0, 1)
    record, sw = host.send("00B201C417")
    assert sw == 0x9000
    assert record == b"\x00\x00" + bytes(3) + u4(250) + b"\x06" + TID + DATE + TIME
    data, sw = host.send("805A00060200" + "0008")
    assert sw == 0x9000 and data == result["mac2"] + result["tac"]


def test_purchase_with_second_key_index(host_with: HostWith) -> None:
    host, _ = host_with(ep=100)
    init = host.init_purchase(10, key_index=2)
    assert init.key_version == 2
    sk = host.purchase_session_key(init, 5, key="dpk2")
    assert host.sw(host.debit_apdu(5, host.purchase_mac1(sk, 10))) == 0x9000


def test_zero_amount_purchase_authenticates_without_moving_value(host_with: HostWith) -> None:
    host, _ = host_with(ep=100)
    host.purchase(0)
    assert host.balance() == 100


def test_insufficient_funds(host_with: HostWith) -> None:
    host, dut = host_with(ep=99)
    before = snapshot(dut)
    assert host.sw(host.init_purchase_apdu(100)) == 0x9401
    assert snapshot(dut) == before


def test_unknown_key_index(host_with: HostWith) -> None:
    host, _ = host_with(ep=99)
    assert host.sw(host.init_purchase_apdu(1, key_index=9)) == 0x9403
    assert host.sw(host.init_load_apdu(1, key_index=9)) == 0x9403


@pytest.mark.parametrize(("apdu", "sw"), [
    ("805001020A00000001112233445566", 0x6700),     # Lc 0A: one byte short
    ("805001020B01000000011122334455", 0x6700),     # Lc 0B, 10 bytes: malformed APDU
    ("805006020B0100000001112233445566", 0x6A86),   # P1 06: not supported (03 is the CAPP purchase)
    ("805001030B0100000001112233445566", 0x6A86),   # P2 03: no such purse
    ("805002020B0100000001112233445566", 0x6A86),   # cash withdrawal is ED only
    ("80500102", 0x6700),
])
def test_initialize_errors(host_with: HostWith, apdu: str, sw: int) -> None:
    host, _ = host_with(ep=99)
    assert host.sw(apdu) == sw


def test_debit_without_initialize_and_after_load_init(host_with: HostWith) -> None:
    host, _ = host_with(ep=100)
    assert host.sw(host.debit_apdu(1, bytes(4))) == 0x6985
    host.init_load(10)
    assert host.sw(host.debit_apdu(1, bytes(4))) == 0x6985


def test_debit_wrong_length_and_p1p2(host_with: HostWith) -> None:
    host, _ = host_with(ep=100)
    host.init_purchase(10)
    assert host.sw("805401000E" + "00" * 14) == 0x6700
    host.init_purchase(10)
    assert host.sw("805402000F" + "00" * 15) == 0x6A86


def test_another_command_between_initialize_and_debit_cancels(host_with: HostWith) -> None:
    host, _ = host_with(ep=100)
    init = host.init_purchase(10)
    host.balance()
    sk = host.purchase_session_key(init, 1)
    assert host.sw(host.debit_apdu(1, host.purchase_mac1(sk, 10))) == 0x6985
    assert host.balance() == 100


def test_debit_with_bad_mac_changes_nothing(host_with: HostWith) -> None:
    host, dut = host_with(ep=100)
    before = snapshot(dut)  # before the INITIALIZE: a snapshot's APDUs would end its session
    host.init_purchase(10)
    assert host.sw(host.debit_apdu(1, bytes.fromhex("DEADBEEF"))) == 0x9302
    assert snapshot(dut) == before
    if dut.card is not None:  # no APDU shows a count below the lock (test_wrong_macs_lock_...)
        assert failures(dut.card) == ({"1": 1}, {})  # counted against purchase key 1
    assert host.balance() == 100


def test_wrong_macs_lock_the_key(host_with: HostWith) -> None:
    """mac_failure_limit consecutive wrong MACs lock that key (INITIALIZE answers 6983), across
    a power cycle; a right MAC starts the count again; other keys still work."""
    host, dut = host_with(ep=1000, mac_failure_limit=3)

    def wrong_mac1(key_index: int = 1) -> int:
        host.init_purchase(1, key_index=key_index)
        return host.sw(host.debit_apdu(1, bytes(4)))

    def wrong_s2() -> int:
        host.init_load(5)
        return host.sw(host.credit_apdu(bytes(4)))

    assert [wrong_mac1(), wrong_mac1()] == [0x9302, 0x9302]
    host.purchase(1)                                   # a right MAC: counting starts again
    assert [wrong_mac1(), wrong_mac1(), wrong_mac1()] == [0x9302] * 3
    assert host.sw(host.init_purchase_apdu(1)) == 0x6983
    assert host.sw(host.init_purchase_apdu(1, key_index=2)) == 0x9000
    host.load(5)                                       # the load key is not the purchase key
    assert [wrong_s2(), wrong_s2(), wrong_s2()] == [0x9302] * 3
    assert host.sw(host.init_load_apdu(5)) == 0x6983
    dut.power_cycle()
    host.select()
    assert host.sw(host.init_load_apdu(5)) == 0x6983
    assert host.sw(host.init_purchase_apdu(1)) == 0x6983
    assert host.balance() == 1000 - 1 + 5
    if dut.card is not None:  # the counts themselves, which no APDU shows
        assert failures(dut.card) == ({"1": 3}, {"1": 3})


@pytest.mark.parametrize("change", ["amount", "terminal", "date", "counter", "ttn", "random"])
def test_changed_purchase_fields_break_mac1(host_with: HostWith, change: str) -> None:
    host, dut = host_with(ep=100)
    before = snapshot(dut)
    init = host.init_purchase(10)
    if change == "counter":
        init.counter += 1
    if change == "random":
        init.random = bytes(4)
    sk = host.purchase_session_key(init, 1)
    amount = 11 if change == "amount" else 10
    tid = bytes.fromhex("000000000000") if change == "terminal" else TID
    mac1 = host.purchase_mac1(sk, amount, tid=tid)
    ttn = 2 if change == "ttn" else 1
    date = bytes.fromhex("20270315") if change == "date" else DATE
    assert host.sw(host.debit_apdu(ttn, mac1, date=date)) == 0x9302
    assert snapshot(dut) == before


def test_replayed_debit_is_refused(host_with: HostWith) -> None:
    host, _ = host_with(ep=100)
    init = host.init_purchase(10)
    debit = host.debit_apdu(3, host.purchase_mac1(host.purchase_session_key(init, 3), 10))
    assert host.sw(debit) == 0x9000
    assert host.sw(debit) == 0x6985
    host.init_purchase(10)
    assert host.sw(debit) == 0x9302
    assert host.balance() == 90


def test_ed_purchase_and_cash_withdrawal_with_pin(host_with: HostWith) -> None:
    host, dut = host_with(ed=500)
    assert host.sw(host.init_purchase_apdu(10, purse=1)) == 0x6982
    assert host.verify("123456") == 0x9000
    host.purchase(100, txn_type=5, purse=1)
    assert host.verify("123456") == 0x9000
    host.purchase(50, txn_type=4, purse=1, p1=2)
    assert host.verify("123456") == 0x9000
    assert host.balance(1) == 350
    if dut.card is not None:  # the Python card's state, as READ RECORD shows it on both
        types = [r[9] for r in (bytes.fromhex(x) for x in dut.card.apps[0].to_state()["log"])]
        assert types == [4, 5]
    assert [host.send(f"00B20{n}C417")[0][9] for n in (1, 2)] == [4, 5]


# --- log and proof -------------------------------------------------------------------------

def test_log_is_cyclic_newest_first(host_with: HostWith) -> None:
    host, _ = host_with(ep=10_000)
    for amount in range(1, 13):
        host.purchase(amount)
    amounts = []
    for n in range(1, 11):
        rec, sw = host.send(bytes([0x00, 0xB2, n, 0xC4, 0x17]))
        assert sw == 0x9000
        amounts.append(int.from_bytes(rec[5:9], "big"))
    assert amounts == list(range(12, 2, -1))
    assert host.sw("00B20BC417") == 0x6A83
    assert host.sw("00B201CC17") == 0x6A82   # SFI 19
    assert host.sw("00B200C417") == 0x6A86
    assert host.sw("00B201C017") == 0x6A86   # P2 mode bits not 100
    assert host.sw("00B201C410") == 0x6C17


def test_empty_log(host_with: HostWith) -> None:
    host, _ = host_with()
    assert host.sw("00B201C417") == 0x6A83


def test_get_transaction_prove_before_and_after(host_with: HostWith) -> None:
    host, _ = host_with(ep=100)
    assert host.sw("805A0006020000") == 0x9406
    first = host.purchase(10)
    second = host.purchase(20)
    data, sw = host.send("805A0006020001")
    assert sw == 0x9000 and data == second["mac2"] + second["tac"]
    assert host.sw("805A0006020000") == 0x9406    # only the last transaction is kept
    assert first["counter"] == 0
    assert host.sw("805A0002020001") == 0x9406    # wrong type
    assert host.sw("805A000601" + "00") == 0x6700
    assert host.sw("805A0008020001") == 0x6A86    # 08 is no transaction type


# --- T=0 -----------------------------------------------------------------------------------

def test_t0_mode_uses_get_response() -> None:
    """Virtual only: T=0 answer chaining (61xx, GET RESPONSE) is the Python card runtime's
    transport; the applet answers through jCardSim, which has no T=0."""
    image = with_balance(demo_image("iep"), 100)
    image["t0"] = True
    card = card_from_image(image)
    out = card.transmit(bytes.fromhex("00A4040009") + DEMO_AID + b"\x00")
    assert out[0] == 0x61
    fci = card.transmit(bytes([0x00, 0xC0, 0x00, 0x00, out[1]]))
    assert fci[-2:] == b"\x90\x00" and fci[0] == 0x6F
    # case 2 answers at once, as over T=0
    assert card.transmit(bytes.fromhex("805C000204")) == bytes.fromhex("000000649000")
    # case 4 answers 61xx; a partial GET RESPONSE leaves the rest pending
    out = card.transmit(bytes.fromhex("805001020B0100000001112233445566"))
    assert out == b"\x61\x0f"
    part = card.transmit(bytes.fromhex("00C0000004"))
    assert part == bytes.fromhex("00000064610B")
    rest = card.transmit(bytes.fromhex("00C000000B"))
    assert rest[:2] == b"\x00\x00" and rest[-2:] == b"\x90\x00" and len(rest) == 13
    assert card.transmit(bytes.fromhex("00C0000002")) == b"\x69\x85"


def test_reset_drops_session_but_not_value(host_with: HostWith) -> None:
    host, dut = host_with(ep=100)
    init = host.init_purchase(10)
    dut.power_cycle()
    host.select()
    sk = host.purchase_session_key(init, 1)
    assert host.sw(host.debit_apdu(1, host.purchase_mac1(sk, 10))) == 0x6985
    assert host.balance() == 100


def test_get_data_balance_limit(host_with: HostWith) -> None:
    host, _ = host_with(balance_limit=123_456)
    data, sw = host.send("80CA9F7700")
    assert sw == 0x9000 and data == bytes.fromhex("9F770400") + (123_456).to_bytes(3, "big")
    assert host.sw("80CA9F7600") == 0x6A88          # another tag: referenced data not found
    assert host.sw("80CA9F770101") == 0x6700        # GET DATA carries no data
