"""The composite (CAPP) purchase on the IEP (INITIALIZE FOR CAPP PURCHASE 80 50 03 02, UPDATE
CAPP DATA CACHE 80 DC, DEBIT FOR CAPP PURCHASE 80 54 01 00): goods records and the debit are
written together or not at all. MACs and TACs computed the plain way (tests/rawhost.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import demo_image, with_balance
from plain import plain_mac, plain_tac
from rawhost import DATE, TID, TIME, RawHost, u4

from svcard.card.image import card_from_image, open_card, save_new_image
from svcard.card.storage import WRITE_STEPS, PowerCut, read_image
from svcard.protocols import goods as G

TYPE_CAPP = 0x09
# these tests send the plain 80 DC: a card personalised to take it (a card takes only the MAC'd
# 84 DE by default: tests/test_capp_mac.py)
PLAIN = {"capp_plain_update": True}
TICKETS, COUPONS, TRANSIT = 0x11, 0x12, 0x13


def good(kind: str = "ticket", n: int = 1, **fields: object) -> bytes:
    base: dict[str, object] = {"issuer_id": bytes.fromhex("4D45524348414E54"),
                               "good_id": n.to_bytes(8, "big"),
                               "valid_from": bytes.fromhex("20260101"),
                               "valid_to": bytes.fromhex("20281231")}
    body: dict[str, object] = {
        "ticket": {"value": 1500, "reference": b"SEAT-12A"},
        "coupon": {"value": 200, "min_spend": 1000},
        "transit": {"rides_left": 10, "rides_total": 10, "fare": 300},
        "voucher": {"value": 5000, "code": bytes(range(10))}}[kind]
    return G.build(kind, **{**base, **body, **fields})


def update_cache(sfi: int, p1: int, data: bytes, mode: int = G.MODE_RECORD) -> bytes:
    return bytes([0x80, 0xDC, p1, (sfi << 3) | mode, len(data)]) + data


class CappHost(RawHost):
    def init_capp(self, amount: int) -> dict:
        data, sw = self.send(self.init_purchase_apdu(amount, p1=3))
        assert sw == 0x9000, hex(sw)
        assert len(data) == 15
        return {"balance": int.from_bytes(data[:4], "big"),
                "counter": int.from_bytes(data[4:6], "big"), "random": data[11:15],
                "init": self._init(data)}

    def _init(self, data: bytes):
        from rawhost import InitPurchase
        return InitPurchase(int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:6], "big"),
                            int.from_bytes(data[6:9], "big"), data[9], data[10], data[11:15])

    def capp_debit(self, init: dict, amount: int, ttn: int = 7, bad_mac: bool = False
                   ) -> tuple[bytes, int]:
        sk = self.purchase_session_key(init["init"], ttn)
        mac1 = self.purchase_mac1(sk, amount, TYPE_CAPP)
        if bad_mac:
            mac1 = bytes([mac1[0] ^ 1]) + mac1[1:]
        return self.send(self.debit_apdu(ttn, mac1))

    def capp(self, amount: int, writes: list[bytes], ttn: int = 7) -> dict:
        init = self.init_capp(amount)
        for apdu in writes:
            assert self.sw(apdu) == 0x9000
        data, sw = self.capp_debit(init, amount, ttn)
        assert sw == 0x9000, hex(sw)
        tac, mac2 = data[:4], data[4:]
        sk = self.purchase_session_key(init["init"], ttn)
        assert mac2 == plain_mac(sk, u4(amount))
        assert tac == plain_tac(self.keys["dtk"], u4(amount) + bytes([TYPE_CAPP]) + TID
                                + u4(ttn) + DATE + TIME)
        return {**init, "tac": tac, "mac2": mac2}

    def read_good(self, sfi: int, n: int) -> tuple[bytes, int]:
        return self.send(bytes([0x00, 0xB2, n, (sfi << 3) | 4, G.RECORD_SIZE]))


def new_card(ep: int = 10_000, **app: object):
    return card_from_image(with_balance(demo_image("iep", **{**PLAIN, **app}), ep=ep))


def opened(card) -> CappHost:
    host = CappHost(card)
    host.select()
    return host


def state(card) -> dict:
    return card.apps[0].to_state()


def test_a_composite_purchase_writes_the_good_and_debits_together() -> None:
    card = new_card()
    host = opened(card)
    ticket = good()
    out = host.capp(1500, [update_cache(TICKETS, 1, ticket)])
    assert host.balance() == 10_000 - 1500
    assert host.read_good(TICKETS, 1) == (ticket, 0x9000)
    log, sw = host.send("00B201C417")
    assert sw == 0x9000 and log[9] == TYPE_CAPP and int.from_bytes(log[5:9], "big") == 1500
    proof, sw = host.send(bytes([0x80, 0x5A, 0x00, TYPE_CAPP, 0x02]) + out["counter"].to_bytes(
        2, "big") + b"\x08")
    assert sw == 0x9000 and proof == out["mac2"] + out["tac"]
    assert state(card)["ep"]["offline_counter"] == out["counter"] + 1


def test_tag_mode_finds_the_same_good_or_the_first_empty_record() -> None:
    card = new_card()
    host = opened(card)
    first, second = good(n=1), good(n=2)
    host.capp(0, [update_cache(TICKETS, 3, first)])           # record 3 by number
    # tag 01, the same good (issuer and good id): record 3, replaced
    used = good(n=1, status=G.STATUS_USED)
    host.capp(0, [update_cache(TICKETS, G.TAG_TICKET, used, G.MODE_TAG)])
    assert host.read_good(TICKETS, 3)[0] == used
    # another good: the first empty record
    host.capp(0, [update_cache(TICKETS, G.TAG_TICKET, second, G.MODE_TAG)])
    assert host.read_good(TICKETS, 1)[0] == second
    # in one session a tag write sees the cached ones: two coupons take records 1 and 2, the
    # first one written again stays in record 1
    c1, c2 = good("coupon", 1), good("coupon", 2)
    c1_used = good("coupon", 1, status=G.STATUS_USED)
    host.capp(100, [update_cache(COUPONS, G.TAG_COUPON, c1, G.MODE_TAG),
                    update_cache(COUPONS, G.TAG_COUPON, c2, G.MODE_TAG),
                    update_cache(COUPONS, G.TAG_COUPON, c1_used, G.MODE_TAG)])
    assert [host.read_good(COUPONS, n)[0] for n in (1, 2, 3)] == [c1_used, c2, G.EMPTY]
    assert host.balance() == 10_000 - 100


def test_several_records_and_none_at_all() -> None:
    card = new_card()
    host = opened(card)
    writes = [update_cache(TICKETS, n, good(n=n)) for n in range(1, 5)]
    writes.append(update_cache(TRANSIT, 1, good("transit")))
    host.capp(700, writes)
    assert [host.read_good(TICKETS, n)[0][:1] for n in range(1, 6)] == [b"\x01"] * 4 + [b"\x00"]
    host.capp(50, [])        # a composite purchase without records is a purchase of type 09
    assert host.balance() == 10_000 - 750


@pytest.mark.parametrize("between", ["805C000204", "00B201C417", "00A4040009F05356434152440101",
                                     "0020000003123456"])
def test_another_command_drops_the_cache(between: str) -> None:
    card = new_card()
    host = opened(card)
    before = state(card)
    init = host.init_capp(100)
    assert host.sw(update_cache(TICKETS, 1, good())) == 0x9000
    host.send(between)
    assert host.capp_debit(init, 100)[1] == 0x6985
    assert state(card) == before


def test_a_wrong_mac1_drops_the_cache_and_counts_the_failure() -> None:
    card = new_card()
    host = opened(card)
    before = state(card)
    init = host.init_capp(100)
    assert host.sw(update_cache(TICKETS, 1, good())) == 0x9000
    assert host.capp_debit(init, 100, bad_mac=True)[1] == 0x9302
    after = state(card)
    assert after["purchase_mac_failures"] == {"1": 1}
    assert {**after, "purchase_mac_failures": {}} == before
    assert host.capp_debit(init, 100)[1] == 0x6985   # the session is gone with its cache


def test_a_reset_drops_the_cache() -> None:
    card = new_card()
    host = opened(card)
    before = state(card)
    init = host.init_capp(100)
    assert host.sw(update_cache(TICKETS, 1, good())) == 0x9000
    card.reset()
    host.select()
    assert host.capp_debit(init, 100)[1] == 0x6985
    assert state(card) == before


def test_the_cache_needs_a_capp_session() -> None:
    card = new_card()
    host = opened(card)
    before = state(card)
    assert host.sw(update_cache(TICKETS, 1, good())) == 0x6985           # no session
    host.init_purchase(100)                                                # a plain purchase
    assert host.sw(update_cache(TICKETS, 1, good())) == 0x6985
    init = host.init_purchase(100)
    sk = host.purchase_session_key(init, 7)
    # the plain purchase's session ended at the refused 80 DC
    assert host.sw(update_cache(TICKETS, 1, good())) == 0x6985
    assert host.send(host.debit_apdu(7, host.purchase_mac1(sk, 100)))[1] == 0x6985
    assert state(card) == before
    assert host.sw(host.init_purchase_apdu(100, p1=3, purse=1)) == 0x6A86   # EP only


def full_tickets(card) -> None:
    host = opened(card)
    host.capp(0, [update_cache(TICKETS, n, good(n=n)) for n in range(1, 9)])


@pytest.mark.parametrize(("apdu", "sw"), [
    (update_cache(TICKETS, 1, good()[:-1]), 0x6700),               # one byte short
    (update_cache(TICKETS, 1, good() + b"\x00"), 0x6700),           # one byte long
    (update_cache(0x1E, 1, good()), 0x6A82),                        # no goods file 1E
    (update_cache(0x18, 1, good()), 0x6A82),                        # the log is no goods file
    (update_cache(0, 1, good()), 0x6A86),                           # SFI 0
    (update_cache(TICKETS, 0, good()), 0x6A86),                     # record 0
    (update_cache(TICKETS, 9, good()), 0x6A83),                     # beyond the 8 records
    (update_cache(TICKETS, 1, good(), mode=0b010), 0x6A86),         # an unknown mode
    (update_cache(COUPONS, 1, good()), 0x6A80),                     # a ticket in the coupons
    (update_cache(TICKETS, 2, good(), mode=G.MODE_TAG), 0x6A80),    # P1 is not the tag
    (update_cache(TICKETS, 1, b"\x01\x09" + good()[2:]), 0x6A80),   # unknown status
    (update_cache(TICKETS, 1, good()[:18] + b"\x20\x26\x13\x01" + good()[22:]), 0x6A80),
])
def test_a_refused_record_ends_the_session_and_writes_nothing(apdu: bytes, sw: int) -> None:
    card = new_card()
    host = opened(card)
    before = state(card)
    init = host.init_capp(100)
    assert host.sw(update_cache(TRANSIT, 1, good("transit"))) == 0x9000
    assert host.sw(apdu) == sw
    assert host.capp_debit(init, 100)[1] == 0x6985
    assert state(card) == before


def test_a_full_file_refuses_a_new_good_by_tag() -> None:
    card = new_card()
    full_tickets(card)
    host = opened(card)
    # the same good by tag: its record, even in a full file
    used = good(n=3, status=G.STATUS_USED)
    host.capp(0, [update_cache(TICKETS, G.TAG_TICKET, used, G.MODE_TAG)])
    assert host.read_good(TICKETS, 3)[0] == used
    before = state(card)
    init = host.init_capp(100)
    assert host.sw(update_cache(TICKETS, G.TAG_TICKET, good(n=9), G.MODE_TAG)) == 0x6A84
    assert host.capp_debit(init, 100)[1] == 0x6985
    assert state(card) == before


def test_the_cache_holds_eight_records_at_most() -> None:
    card = new_card()
    host = opened(card)
    before = state(card)
    init = host.init_capp(100)
    for n in range(1, 9):
        assert host.sw(update_cache(TICKETS, n, good(n=n))) == 0x9000
    assert host.sw(update_cache(TICKETS, 8, good(n=80))) == 0x9000   # the same record again
    assert host.sw(update_cache(COUPONS, 1, good("coupon"))) == 0x6A84
    assert host.capp_debit(init, 100)[1] == 0x6985
    assert state(card) == before


def test_goods_survive_in_the_image_and_old_images_load_empty(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    image = with_balance(demo_image("iep", **PLAIN), ep=1000)
    image["app"].pop("goods", None)                 # an image written before goods files
    save_new_image(path, image)
    card = open_card(path)
    try:
        host = opened(card)
        assert host.read_good(TICKETS, 1) == (G.EMPTY, 0x9000)
        host.capp(300, [update_cache(TICKETS, 2, good())])
    finally:
        card.close()
    on_disk = read_image(path)["app"]
    assert on_disk["goods"]["files"][0]["data"] == {"2": good().hex().upper()}
    assert on_disk["ep"]["balance"] == 700
    card = open_card(path)
    try:
        assert opened(card).read_good(TICKETS, 2) == (good(), 0x9000)
    finally:
        card.close()


class Tear:
    """Counts image write steps once armed; cuts the power at step ``cut_at``."""

    def __init__(self, cut_at: int | None) -> None:
        self.cut_at, self.armed, self.steps = cut_at, False, []

    def __call__(self, step: str) -> None:
        if self.armed:
            self.steps.append(step)
            if len(self.steps) - 1 == self.cut_at:
                raise PowerCut(step)


def run_capp(path: Path, tear: Tear) -> bytes:
    card = open_card(path, tear=tear)
    try:
        host = opened(card)
        init = host.init_capp(400)
        for n, apdu in enumerate([update_cache(TICKETS, 1, good()),
                                  update_cache(TRANSIT, G.TAG_TRANSIT, good("transit"),
                                               G.MODE_TAG)]):
            if n == 1:
                tear.armed = True    # a cache write writes nothing: no step to cut at
            assert host.sw(apdu) == 0x9000
        assert tear.steps == []
        data, sw = host.capp_debit(init, 400)
        return data + sw.to_bytes(2, "big")
    finally:
        card.close()


def test_power_cut_at_every_write_step_of_a_composite_purchase(tmp_path: Path) -> None:
    def fresh(name: str) -> Path:
        path = tmp_path / name
        save_new_image(path, with_balance(demo_image("iep", fixed_random="A1B2C3D4", **PLAIN),
                                            ep=1000))
        return path

    tear = Tear(None)
    assert run_capp(fresh("dry.json"), tear)[-2:] == b"\x90\x00"
    assert len(tear.steps) == 2 * len(WRITE_STEPS)
    outcomes = []
    for cut in range(len(tear.steps)):
        path = fresh(f"cut{cut}.json")
        before = read_image(path)["app"]
        with pytest.raises(PowerCut):
            run_capp(path, Tear(cut))
        card = open_card(path)       # power comes back: a pending log record is written
        try:
            host = opened(card)
            after = state(card)
            assert after["pending_log"] is None
            moved = after["ep"]["balance"] != 1000
            ticket = host.read_good(TICKETS, 1)[0]
            token = host.read_good(TRANSIT, 1)[0]
            outcomes.append(moved)
            if moved:        # both goods, the debit, the log record
                assert after["ep"]["balance"] == 600 and ticket == good()
                assert token == good("transit")
                assert len(after["log"]) == 1 and bytes.fromhex(after["log"][0])[9] == TYPE_CAPP
            else:            # neither
                assert after == {**before, "log": [], "pending_log": None}
                assert ticket == token == G.EMPTY
        finally:
            card.close()
    assert outcomes.count(False) >= 3 and outcomes.count(True) >= 4
