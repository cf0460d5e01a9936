"""Review R-12 of issue 12 (goods files, composite purchase, secure-messaging writes, loyalty
points), as an attacker and as a card engineer: each test here failed on the code before its
fix (see the commit that adds it)."""

from __future__ import annotations

import copy
import time
import tomllib
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from conftest import demo_image, fixture_path
from rawhost import DEMO_SERIAL
from test_capp import CappHost
from test_capp_mac import mac_apdu
from test_loyalty import TWO_PROGRAMMES
from test_loyalty import write_profile as loyalty_profile
from test_secure_write import challenge, goods_of, image, service  # noqa: F401 (fixture)

from svcard.card.image import card_from_image, open_card
from svcard.card.personalise import ProfileError, image_from_profile, load_issuer
from svcard.card.storage import ImageError, read_image
from svcard.host.goods import wire as W
from svcard.host.goods.stack import make_card, start_goods
from svcard.host.terminal.capp import read_goods
from svcard.host.terminal.goods_key import GoodsKeyService
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import goods as G
from svcard.protocols.apdu import ResponseAPDU
from svcard.reader.base import CardRemovedError, Reader

TICKETS, TRANSIT = 0x11, 0x13
ISSUER = bytes.fromhex("2000000000000002")


@pytest.fixture
def loyalty_image(tmp_path: Path) -> dict[str, Any]:
    return image_from_profile(loyalty_profile(tmp_path, TWO_PROGRAMMES))


def token(rides_left: int, status: int = G.STATUS_VALID) -> bytes:
    return G.build("transit", issuer_id=ISSUER, good_id=(9).to_bytes(8, "big"),
                   valid_from=bytes.fromhex("20260101"), valid_to=bytes.fromhex("20281231"),
                   rides_left=rides_left, rides_total=10, fare=300, status=status)


def ticket(status: int = G.STATUS_VALID) -> bytes:
    return G.build("ticket", issuer_id=ISSUER, good_id=(5).to_bytes(8, "big"),
                   valid_from=bytes.fromhex("20260101"), valid_to=bytes.fromhex("20281231"),
                   value=1500, reference=b"ROW12S07", status=status)


def validator_use(host: CappHost, sfi: int, number: int, after: bytes) -> None:
    """What the validator does (host/terminal/redeem.py): a 0-fare composite purchase writing
    the good as it is after use, by record number, MAC'd (84 DE) under the card's goods key."""
    key = host.card.apps[0].state.goods_key.key
    init = host.init_capp(0)
    assert host.sw(mac_apdu(sfi, number, after, init["random"], init["counter"],
                            key=key)) == 0x9000
    assert host.capp_debit(init, 0)[1] == 0x9000


# --- 1. a late or replayed delivery (tag-mode 04 DC) must not bring a used good back -----------

def test_a_redelivered_good_does_not_restore_what_its_use_took(
        tmp_path: Path, service: GoodsKeyService) -> None:  # noqa: F811
    """The fulfilment server hands the same tag-mode write out again whenever the device says
    the card did not take it (a non-9000 status word, or no 'held' at pick-up: both the
    device's unauthenticated word). A device that lies after the card took the good, uses
    it at a validator, then picks it up again would get the ride back (or the used ticket
    valid again), as often as it likes."""
    card = card_from_image(image(tmp_path))
    host = CappHost(card)
    host.select()
    for original, used in ((token(10), token(9)), (ticket(), ticket(G.STATUS_USED))):
        sfi = TRANSIT if original[0] == G.TAG_TRANSIT else TICKETS
        c = challenge(host)
        assert host.sw(service.update_record(DEMO_SERIAL, c, sfi, original)) == 0x9000
        validator_use(host, sfi, 1, used)
        # the fulfilment server's write for the same good, for a fresh challenge
        c = challenge(host)
        assert host.sw(service.update_record(DEMO_SERIAL, c, sfi, original)) == 0x9000
        assert host.read_good(sfi, 1) == (used, 0x9000)
    assert [r for _, _, r in goods_of(card)] == [ticket(G.STATUS_USED), token(9)]


# --- 2. a programme's image entry: every field the card answers from is checked at load --------

@pytest.mark.parametrize(("field", "bad"), [
    ("fixed_random", "A1B2C3"),        # loaded, then every INITIALIZE answered 6F00
    ("label", "MILES ÉLITE"),          # loaded, then SELECT answered 6F00
    ("label", "X" * 17),               # more than the FCI's 16 bytes
    ("aid", "F0" * 17),                # no SELECT can reach it
    ("aid", "F053"),                   # an AID is 5..16 bytes
    ("uid", "00"),                     # a UID is 9 bytes
])
def test_a_programme_entry_off_its_layout_is_refused_naming_the_field(
        loyalty_image: dict[str, Any], field: str, bad: str) -> None:
    damaged = copy.deepcopy(loyalty_image)
    damaged["loyalty"][0][field] = bad
    with pytest.raises(ImageError, match=rf"card.json: loyalty\[0\]\.{field}: ") as caught:
        card_from_image(damaged, source="card.json")
    assert bad not in str(caught.value)


def test_a_purse_image_with_a_fixed_random_off_its_size_is_refused() -> None:
    damaged = demo_image("iep", fixed_random="A1B2C3")
    with pytest.raises(ImageError, match=r"card\.json: app\.fixed_random: "):
        card_from_image(damaged, source="card.json")


# --- 3. the goods key goes to the fulfilment server: it must open no purse key ----------------

@pytest.mark.parametrize("section", ["load_keys", "purchase_keys", "tac_master_key"])
def test_a_goods_master_key_equal_to_a_purse_master_key_is_refused(
        tmp_path: Path, section: str) -> None:
    """The fulfilment server's key service holds the issuer's goods master key; one equal to
    the load master key would let it make load MAC2s for every card (money from nothing), to
    a purchase key MAC1s, to the TAC key TACs."""
    issuer = fixture_path("demo-issuer.toml").read_text()
    doc = tomllib.loads(issuer)
    same = doc[section] if section == "tac_master_key" else doc[section][0]["master_key"]
    path = tmp_path / "issuer.toml"
    path.write_text(issuer + f'\n[goods_key]\nindex = 1\nversion = 1\nmaster_key = "{same}"\n')
    with pytest.raises(ProfileError, match=r"issuer\.toml: goods_key\.master_key: ") as caught:
        load_issuer(path)
    assert same.lower() not in str(caught.value).lower()


def test_an_explicit_goods_key_equal_to_a_card_purse_key_is_refused(tmp_path: Path) -> None:
    profile = tmp_path / "explicit.toml"
    profile.write_text(f"""kind = "iep"
app_serial = "00000000000000000009"
start_date = 2026-01-01
expiry_date = 2031-12-31
issuer_id = "1000000000000001"
[keys]
tac = "{'11' * 16}"
purchase = [{{ index = 1, key = "{'22' * 16}" }}]
load = [{{ index = 1, key = "{'33' * 16}" }}]
goods = {{ index = 2, version = 5, key = "{'33' * 16}" }}
""")
    with pytest.raises(ProfileError, match=r"explicit\.toml: keys\.goods\.key: ") as caught:
        image_from_profile(profile)
    assert "33" * 16 not in str(caught.value)


# --- 1b. the same attack through the real servers (seed 000 stack on loopback) ----------------

class LyingDevice:
    """The device's reader, as a cheating device sees the card: the card takes the goods write
    but the device reports 6A82; at pick-up READ RECORD of the goods files shows nothing."""

    def __init__(self, inner: Reader) -> None:
        self.inner = inner

    def exchange(self, apdu: bytes) -> ResponseAPDU:
        answer = self.inner.exchange(apdu)
        if apdu[:2] == b"\x04\xdc" or (apdu[:2] == b"\x00\xb2" and apdu[3] >> 3 != 0x18):
            return ResponseAPDU(b"", 0x6A82)
        return answer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_through_the_servers_a_lying_device_cannot_win_back_a_used_ticket(
        tmp_path: Path) -> None:
    stack = start_goods(tmp_path / "servers")
    try:
        serial = 70_012
        stack.account("acc1", serial, balance=10_000)
        card = make_card(tmp_path, serial)
        device = stack.device()
        with httpx.Client() as http:
            assert stack.order(http, "ticket", device).status_code == 200
        [first] = device.poll(wait=5)
        with open_reader(f"virtual:{card}") as reader:
            out = device.authorise(cast(Reader, LyingDevice(reader)), first, "123456")
        assert out.sw == 0x6A82 and not out.written       # the card took it all the same
        with open_reader(f"virtual:{card}") as reader:     # the validator uses the ticket
            [held] = read_goods(reader)
        used = held.record[:1] + bytes([G.STATUS_USED]) + held.record[2:]
        opened = open_card(card)
        try:
            host = CappHost(opened, bytes.fromhex(f"{serial:020d}"))
            host.select()
            validator_use(host, held.sfi, held.record_number, used)
        finally:
            opened.close()
        with open_reader(f"virtual:{card}") as reader:     # pick-up: "the card has nothing"
            [again] = device.pickup(cast(Reader, LyingDevice(reader)))
        assert again.order == first.order   # the server handed the same write out again
        with open_reader(f"virtual:{card}") as reader:
            assert [g.record for g in read_goods(reader)] == [used]
    finally:
        stack.close()


class LinkCutBeforeWrite:
    """The victim's reader: the link fails as the goods write goes out (the card never saw
    it), so the good waits at the fulfilment server for the card's next contact."""

    def __init__(self, inner: Reader) -> None:
        self.inner = inner

    def exchange(self, apdu: bytes) -> ResponseAPDU:
        if apdu[:2] == b"\x04\xdc":
            raise CardRemovedError("the card was pulled")
        return self.inner.exchange(apdu)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_another_device_cannot_claim_and_mark_written_someone_elses_good(
        tmp_path: Path) -> None:
    """A pick-up names the card by its serial (public: EF 0x15, the FCI) and any device can
    register itself. If the fulfilment server hands such a device the write of another
    customer's pending good and takes its '9000' for it, the good is marked written without
    ever reaching the card: neither the good nor a refund for the customer who paid."""
    clock = [time.time()]
    stack = start_goods(tmp_path / "servers", clock=lambda: clock[0])
    try:
        serial = 70_013
        stack.account("acc1", serial, balance=10_000)
        card = make_card(tmp_path, serial)
        victim = stack.device()
        with httpx.Client() as http:
            assert stack.order(http, "ticket", victim).status_code == 200
        [first] = victim.poll(wait=5)
        with open_reader(f"virtual:{card}") as reader, pytest.raises(CardRemovedError):
            victim.authorise(cast(Reader, LinkCutBeforeWrite(reader)), first, "123456")
        clock[0] += stack.system.issue_lease + 1          # the write's lease runs out
        attacker = stack.device()                         # anyone may register a device
        now = int(clock[0])
        claim = attacker._post("/v1/pickups", W.PICKUP, {
            "device": attacker.id, "card": f"{serial:020d}", "issuer": first_issuer(card),
            "challenge": "00000000", "held": [], "created": now})
        if claim.get("apdu") is not None:
            attacker._post("/v1/written", W.WRITTEN, {
                "order": claim["order"], "device": attacker.id, "card": f"{serial:020d}",
                "sw": 0x9000, "created": now})
        with open_reader(f"virtual:{card}") as reader:     # the customer's next contact
            victim.pickup(reader)
        with open_reader(f"virtual:{card}") as reader:
            assert len(read_goods(reader)) == 1
    finally:
        stack.close()


def first_issuer(card: Path) -> str:
    return read_image(card)["app"]["public_data"][:16]


# --- 4. a programme whose card keys are the purse's would turn points into money --------------

def test_a_programme_with_the_purses_keys_is_refused(tmp_path: Path) -> None:
    """The points issuer file below reuses the money issuer's master keys (under another
    issuer id, with unit = "points"): the points load server's HSM would then make load
    MAC2s the money purse accepts (a client selects the purse's AID in a points load: money
    from points), and a points PSAM MAC1s that spend money."""
    profile = loyalty_profile(tmp_path, TWO_PROGRAMMES)
    money = (tmp_path / "demo-issuer.toml").read_text()
    (tmp_path / "miles-issuer.toml").write_text(
        money.replace('issuer_id = "1000000000000001"', 'issuer_id = "2000000000000001"\n'
                      'unit = "points"'))
    with pytest.raises(ProfileError, match=r"iep\.toml: loyalty\[0\]\.issuer: ") as caught:
        image_from_profile(profile)
    assert "836909A138FAA7577D7B94C561F98D24" not in str(caught.value)


def test_two_programmes_with_the_same_keys_are_refused(tmp_path: Path) -> None:
    profile = loyalty_profile(tmp_path, TWO_PROGRAMMES)
    miles = (tmp_path / "miles-issuer.toml").read_text()
    (tmp_path / "hotel-issuer.toml").write_text(
        miles.replace('issuer_id = "2000000000000001"', 'issuer_id = "3000000000000001"'))
    with pytest.raises(ProfileError, match=r"iep\.toml: loyalty\[1\]\.issuer: "):
        image_from_profile(profile)


def test_a_sessions_repr_shows_no_session_key() -> None:
    """The INITIALIZE awaiting its DEBIT holds the session key (SESPK): its repr, which a
    traceback or a log line may show, must not."""
    from svcard.card.iep_commands.session import Session
    from svcard.card.keys import KeyEntry

    secret = bytes.fromhex("0123456789ABCDEF")
    s = Session(kind=1, purse_id=2, txn_type=6, key=KeyEntry(1, 1, 0, bytes(16)), amount=1,
                terminal_id=bytes(6), random=bytes(4), counter=0, balance=0, session_key=secret)
    assert secret.hex() not in repr(s).lower() and "0123456789abcdef" not in repr(s).lower()
    assert "session_key" not in repr(s)
