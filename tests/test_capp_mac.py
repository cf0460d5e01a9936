"""The MAC'd UPDATE CAPP DATA CACHE (84 DE): in a composite purchase the goods record carries a
MAC under the card's goods key, chained from THIS session's random and offline counter, so a
device relaying the purchase cannot swap the record, replay one from another session, or have
a PSAM alone (a 0-amount purchase) write a good. MACs computed the plain way
(tests/test_secure_write_crypto.py's plain_sm_mac)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import demo_image, with_balance
from plain import plain_diversify
from rawhost import DEMO_SERIAL
from test_capp import TICKETS, TRANSIT, TYPE_CAPP, CappHost, good, update_cache
from test_secure_write_crypto import plain_sm_mac

from svcard.card.image import card_from_image, open_card, save_new_image
from svcard.card.keys import KeyEntry
from svcard.card.storage import WRITE_STEPS, PowerCut, read_image
from svcard.host.cli.main import main
from svcard.host.goods import redeem as R
from svcard.host.terminal.capp import GoodsWrite, capp_purchase
from svcard.host.terminal.goods_key import GoodsKeyService
from svcard.host.terminal.purse import Declined
from svcard.protocols import goods as G
from svcard.reader.virtual import VirtualReader

GOODS_MASTER = bytes.fromhex("3C5A1E77D2094B8866F0AB1325CE9D41")   # TEST KEYS ONLY
OTHER_MASTER = bytes.fromhex("A7E5093BC1D2F46850918C3E7B2D4F60")   # another issuer's
CARD_GOODS_KEY = plain_diversify(GOODS_MASTER, DEMO_SERIAL[-8:])
WHEN = dt.datetime(2027, 3, 14, 15, 9, 26)


KEYS = GoodsKeyService(KeyEntry(1, 1, 0, GOODS_MASTER))   # the issuer's goods key service
DEMO_ISSUER = Path(__file__).resolve().parents[1] / "fixtures" / "demo-issuer.toml"


def goods_issuer_file(folder: Path) -> Path:
    """The demo issuer file with a [goods_key] of GOODS_MASTER (for --goods-issuer)."""
    path = folder / "goods-issuer.toml"
    path.write_text(DEMO_ISSUER.read_text() + "\n[goods_key]\nindex = 1\nversion = 1\n"
                    f'algorithm = 0\nmaster_key = "{GOODS_MASTER.hex().upper()}"\n')
    return path


def goods_key(key: bytes = CARD_GOODS_KEY) -> dict[str, Any]:
    return {"index": 1, "version": 1, "algorithm": 0, "key": key.hex().upper()}


def card_image(ep: int = 10_000, **app: Any) -> dict[str, Any]:
    return with_balance(demo_image("iep", **{"goods_key": goods_key(), **app}), ep=ep)


def mac_apdu(sfi: int, p1: int, record: bytes, random: bytes, counter: int, *,
             key: bytes = CARD_GOODS_KEY, mode: int = G.MODE_RECORD,
             mac_of: bytes | None = None) -> bytes:
    """84 DE P1 P2 Lc record || MAC, the MAC over ``mac_of`` (default: the record sent)."""
    p2, lc = sfi << 3 | mode, len(record) + 4
    icv = random + b"\x00\x00" + counter.to_bytes(2, "big")
    mac = plain_sm_mac(key, icv, bytes([0x84, 0xDE, p1, p2, lc]) + (mac_of or record))
    return bytes([0x84, 0xDE, p1, p2, lc]) + record + mac


class Host(CappHost):
    def mac_write(self, init: dict[str, Any], sfi: int, p1: int, record: bytes,
                  **kw: Any) -> int:
        return self.sw(mac_apdu(sfi, p1, record, init["random"], init["counter"], **kw))


def opened(card: Any) -> Host:
    host = Host(card)
    host.select()
    return host


def app(card: Any) -> dict[str, Any]:
    return card.apps[0].to_state()


def nothing_written(host: Host, card: Any, ep: int = 10_000) -> None:
    assert app(card)["ep"]["balance"] == ep and app(card)["log"] == []
    assert host.read_good(TICKETS, 1)[0] == G.EMPTY


# --- the card --------------------------------------------------------------------------------
def test_the_macd_record_goes_in_with_the_debit() -> None:
    card = card_from_image(card_image())
    host = opened(card)
    init = host.init_capp(400)
    assert host.mac_write(init, TICKETS, 1, good()) == 0x9000
    assert host.mac_write(init, TRANSIT, G.TAG_TRANSIT, good("transit"),
                          mode=G.MODE_TAG) == 0x9000
    _, sw = host.capp_debit(init, 400)
    assert sw == 0x9000, hex(sw)
    assert app(card)["ep"]["balance"] == 9_600
    assert host.read_good(TICKETS, 1)[0] == good()
    assert host.read_good(TRANSIT, 1)[0] == good("transit")
    assert bytes.fromhex(app(card)["log"][0])[9] == TYPE_CAPP


def test_a_swapped_record_is_refused_and_nothing_is_written() -> None:
    """The device keeps the MAC of the good paid for (1 cent) and sends another good's data
    (a 1,000-ride token) with it: 6988, the session ends, no record, no debit."""
    card = card_from_image(card_image())
    host = opened(card)
    init = host.init_capp(1)
    cheap, rich = good("transit", rides_left=1, rides_total=1), good("transit", rides_left=1000,
                                                                     rides_total=1000)
    assert host.mac_write(init, TRANSIT, 1, rich, mac_of=cheap) == 0x6988
    assert app(card)["goods_mac_failures"] == {"1": 1}   # counted, as a secure write's
    assert host.capp_debit(init, 1)[1] == 0x6985         # the session (and its cache) ended
    nothing_written(host, card)
    assert host.read_good(TRANSIT, 1)[0] == G.EMPTY
    # a used ticket brought back with the MAC of its used state: refused the same way
    init = host.init_capp(0)
    used = good(status=G.STATUS_USED)
    assert host.mac_write(init, TICKETS, 1, good(), mac_of=used) == 0x6988
    assert host.capp_debit(init, 0)[1] == 0x6985
    nothing_written(host, card)


def test_a_mac_from_another_session_is_refused() -> None:
    """A MAC made for a session the device abandoned (same counter, another random), or for
    one that completed (the counter moved on): 6988 in this session."""
    card = card_from_image(card_image())
    host = opened(card)
    first = host.init_capp(5)
    kept = mac_apdu(TICKETS, 1, good(), first["random"], first["counter"])
    host.select()                                  # abandoned: no DEBIT
    second = host.init_capp(5)
    assert second["counter"] == first["counter"] and second["random"] != first["random"]
    assert host.sw(kept) == 0x6988
    assert host.capp_debit(second, 5)[1] == 0x6985
    nothing_written(host, card)
    # a completed session's MAC, replayed into the next one (even with a fixed random)
    card = card_from_image(card_image(fixed_random="A1B2C3D4"))
    host = opened(card)
    done = host.init_capp(5)
    apdu = mac_apdu(TICKETS, 1, good(), done["random"], done["counter"])
    assert host.sw(apdu) == 0x9000
    assert host.capp_debit(done, 5)[1] == 0x9000
    again = host.init_capp(5)
    assert again["random"] == done["random"] and again["counter"] == done["counter"] + 1
    assert host.sw(apdu) == 0x6988


def test_a_zero_amount_purchase_with_another_issuers_key_writes_nothing() -> None:
    """A PSAM alone (any terminal of the purse's issuer) cannot write a good: a record MAC'd
    under another goods key, or sent plain, is refused in a 0-amount purchase."""
    card = card_from_image(card_image())
    host = opened(card)
    other = plain_diversify(OTHER_MASTER, DEMO_SERIAL[-8:])
    init = host.init_capp(0)
    assert host.mac_write(init, TICKETS, 1, good(), key=other) == 0x6988
    assert host.capp_debit(init, 0)[1] == 0x6985
    init = host.init_capp(0)
    assert host.sw(update_cache(TICKETS, 1, good())) == 0x6982   # plain 80 DC: refused
    assert host.capp_debit(init, 0)[1] == 0x6985
    nothing_written(host, card)
    assert app(card)["ep"]["offline_counter"] == 0


def test_the_plain_form_only_with_capp_plain_update() -> None:
    card = card_from_image(card_image(capp_plain_update=True))
    host = opened(card)
    host.capp(100, [update_cache(TICKETS, 1, good())])
    assert host.read_good(TICKETS, 1)[0] == good()
    assert app(card)["capp_plain_update"] is True
    assert card_from_image(card_image()).apps[0].to_state()["capp_plain_update"] is False


@pytest.mark.parametrize(("change", "apdu_of", "sw"), [
    ({"goods_key": None}, None, 0x6982),                              # no goods key
    ({"goods_mac_failures": {"1": 3}, "mac_failure_limit": 3}, None, 0x6983),   # locked
    ({}, lambda a: a[:4] + b"\x04" + a[5:9], 0x6700),                 # no room for a MAC
    ({}, lambda a: a[:2] + b"\x00" + a[3:], 0x6A86),                  # record 0 (MAC right)
])
def test_refusals_end_the_session(change: dict[str, Any], apdu_of: Any, sw: int) -> None:
    card = card_from_image(card_image(**change))
    host = opened(card)
    init = host.init_capp(5)
    apdu = mac_apdu(TICKETS, 1, good(), init["random"], init["counter"])
    if apdu_of is not None:
        apdu = apdu_of(apdu)
        if sw == 0x6A86:   # a right MAC over the changed header
            apdu = mac_apdu(TICKETS, 0, good(), init["random"], init["counter"])
    assert host.sw(apdu) == sw
    assert host.capp_debit(init, 5)[1] == 0x6985
    nothing_written(host, card)


def test_84_de_needs_a_capp_session_and_other_84_commands_answer_6882() -> None:
    card = card_from_image(card_image())
    host = opened(card)
    assert host.sw(mac_apdu(TICKETS, 1, good(), b"\x00" * 4, 0)) == 0x6985
    init = host.init_purchase(5)                  # a plain purchase is no CAPP session
    assert host.sw(mac_apdu(TICKETS, 1, good(), init.random, init.counter)) == 0x6985
    assert host.sw(bytes([0x84, 0xDC, 0x01, TICKETS << 3 | 4, 4]) + b"\x00" * 4) == 0x6882
    # an 84 command the purse does not know leaves a CAPP session as it was
    init2 = host.init_capp(5)
    assert host.sw(bytes([0x84, 0x1E, 0x00, 0x00, 0x04]) + b"\x00" * 4) == 0x6882
    assert host.mac_write(init2, TICKETS, 1, good()) == 0x9000
    assert host.capp_debit(init2, 5)[1] == 0x9000


def test_a_right_mac_clears_the_goods_key_failures_with_the_debit() -> None:
    card = card_from_image(card_image(goods_mac_failures={"1": 2}))
    host = opened(card)
    init = host.init_capp(5)
    assert host.mac_write(init, TICKETS, 1, good()) == 0x9000
    assert app(card)["goods_mac_failures"] == {"1": 2}   # not before the DEBIT
    assert host.capp_debit(init, 5)[1] == 0x9000
    assert app(card)["goods_mac_failures"] == {}


class Tear:
    def __init__(self, cut_at: int | None) -> None:
        self.cut_at, self.armed, self.steps = cut_at, False, []

    def __call__(self, step: str) -> None:
        if self.armed:
            self.steps.append(step)
            if len(self.steps) - 1 == self.cut_at:
                raise PowerCut(step)


def run_capp(path: Path, tear: Tear) -> None:
    card = open_card(path, tear=tear)
    try:
        host = opened(card)
        init = host.init_capp(400)
        tear.armed = True
        assert host.mac_write(init, TICKETS, 1, good()) == 0x9000
        assert tear.steps == []     # a cached record writes nothing
        assert host.capp_debit(init, 400)[1] == 0x9000
    finally:
        card.close()


def test_power_cut_at_every_write_step_leaves_both_or_neither(tmp_path: Path) -> None:
    def fresh(name: str) -> Path:
        path = tmp_path / name
        save_new_image(path, card_image(1000, fixed_random="A1B2C3D4"))
        return path

    dry = Tear(None)
    run_capp(fresh("dry.json"), dry)
    assert len(dry.steps) == 2 * len(WRITE_STEPS)
    seen = set()
    for cut in range(len(dry.steps)):
        path = fresh(f"cut{cut}.json")
        with pytest.raises(PowerCut):
            run_capp(path, Tear(cut))
        card = open_card(path)
        try:
            host = opened(card)
            moved = app(card)["ep"]["balance"] != 1000
            seen.add(moved)
            assert host.read_good(TICKETS, 1)[0] == (good() if moved else G.EMPTY)
            assert app(card)["ep"]["balance"] == (600 if moved else 1000)
        finally:
            card.close()
    assert seen == {True, False}


# --- the host ------------------------------------------------------------------------------
def readers(ep: int = 10_000, **app_: Any) -> tuple[Any, VirtualReader, VirtualReader]:
    card = card_from_image(card_image(ep, **app_))
    reader, psam = VirtualReader(card), VirtualReader(card_from_image(demo_image("psam")))
    reader.connect()
    psam.connect()
    return card, reader, psam


def test_the_terminal_macs_each_record_with_the_key_service() -> None:
    card, reader, psam = readers()
    keys = KEYS
    receipt = capp_purchase(reader, psam, 250, [GoodsWrite(TICKETS, good(), 1),
                                                GoodsWrite(TRANSIT, good("transit"))],
                            when=WHEN, goods_keys=keys)
    assert receipt.balance_after == 9_750
    assert app(card)["goods"]["files"][0]["data"] == {"1": good().hex().upper()}
    # without the key service (the plain 80 DC) a card refuses it: nothing written
    with pytest.raises(Declined) as refused:
        capp_purchase(reader, psam, 250, [GoodsWrite(TICKETS, good("ticket", 2), 2)], when=WHEN)
    assert refused.value.sw == 0x6982
    # another issuer's key service: 6988, nothing written
    with pytest.raises(Declined) as refused:
        capp_purchase(reader, psam, 0, [GoodsWrite(TICKETS, good("ticket", 2), 2)], when=WHEN,
                      goods_keys=GoodsKeyService(KeyEntry(1, 1, 0, OTHER_MASTER)))
    assert refused.value.sw == 0x6988
    assert app(card)["ep"]["balance"] == 9_750 and "2" not in app(card)["goods"]["files"][0][
        "data"]


def test_the_validator_redeems_with_the_key_service() -> None:
    card, reader, psam = readers()
    keys = KEYS
    capp_purchase(reader, psam, 0, [GoodsWrite(TRANSIT, good("transit", rides_left=3))],
                  when=WHEN, goods_keys=keys)
    choice = R.Choice(good_id=(1).to_bytes(8, "big"), kind="transit", issuer_id=None)
    done = R.redeem(reader, psam, choice, 0, when=WHEN, goods_keys=keys)
    assert isinstance(done, R.RedeemReceipt)
    assert G.parse(bytes.fromhex(app(card)["goods"]["files"][2]["data"]["1"]))[
        "rides_left"] == 2
    with pytest.raises(Declined) as refused:       # no key service: the plain form, refused
        R.redeem(reader, psam, choice, 0, when=WHEN)
    assert refused.value.sw == 0x6982


def test_the_command_line_takes_the_goods_issuer_file(tmp_path: Path) -> None:
    issuer, base = goods_issuer_file(tmp_path), DEMO_ISSUER
    iep, psam = tmp_path / "iep.json", tmp_path / "psam.json"
    save_new_image(iep, card_image())
    save_new_image(psam, demo_image("psam"))
    slots = ["--card", f"virtual:{iep}", "--psam", f"virtual:{psam}"]
    at = ["--at", "2027-03-14 15:09:26"]
    run = CliRunner().invoke
    done = run(main, ["terminal", "capp", *slots, "--amount", "1.00", "--record",
                      f"11:{good().hex()}", "--goods-issuer", str(issuer), *at])
    assert done.exit_code == 0, done.output
    assert read_image(iep)["app"]["goods"]["files"][0]["data"] == {"1": good().hex().upper()}
    plain = run(main, ["terminal", "capp", *slots, "--amount", "1.00", "--record",
                       f"11:2:{good('ticket', 2).hex()}", *at])
    assert plain.exit_code != 0 and "6982" in plain.output and "--goods-issuer" in plain.output
    used = run(main, ["terminal", "redeem", *slots, "--kind", "ticket", "--goods-issuer",
                      str(issuer), *at])
    assert used.exit_code == 0, used.output
    bad = run(main, ["terminal", "capp", *slots, "--amount", "1.00", "--goods-issuer",
                     str(base), *at])
    assert bad.exit_code != 0 and "demo-issuer.toml" in bad.output and "goods_key" in bad.output


def test_the_fuzzer_sends_84_de_into_capp_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/fuzzing.py mutates 84 DE seeds among the rest; a seeded run reaches the card's
    MAC check inside a CAPP session and never gets a good written (its check())."""
    import fuzzing

    from svcard.protocols import crypto
    assert sum(s[:2] == b"\x84\xDE" for s in fuzzing.IEP_SEEDS) == 2
    checked = []
    real = crypto.capp_update_mac

    def counting(*args: Any) -> bytes:
        checked.append(args)
        return real(*args)
    monkeypatch.setattr(crypto, "capp_update_mac", counting)
    counts = fuzzing.run(20_000, seed=1)
    assert sum(counts.values()) == 20_000 and len(checked) >= 1


def test_the_profile_option_and_the_image_field(tmp_path: Path) -> None:
    from svcard.card.image import ImageError
    from svcard.card.personalise import ProfileError, image_from_profile

    text = DEMO_ISSUER.with_name("iep-demo.toml").read_text().replace(
        'issuer = "demo-issuer.toml"', f'issuer = "{DEMO_ISSUER}"')
    profile = tmp_path / "iep.toml"
    profile.write_text(text)
    assert image_from_profile(profile)["app"]["capp_plain_update"] is False   # the default
    profile.write_text(text.replace("[balances]", "capp_plain_update = true\n\n[balances]", 1))
    image = image_from_profile(profile)
    assert image["app"]["capp_plain_update"] is True
    host = opened(card_from_image(with_balance(image, ep=500)))
    host.capp(100, [update_cache(TICKETS, 1, good())])   # the plain 80 DC, on this card only
    profile.write_text(text.replace("[balances]", 'capp_plain_update = "yes"\n\n[balances]', 1))
    with pytest.raises(ProfileError, match=r"iep\.toml: capp_plain_update"):
        image_from_profile(profile)
    bad = card_image(capp_plain_update="yes")
    with pytest.raises((ImageError, ValueError), match="capp_plain_update"):
        card_from_image(bad)
