"""The validator terminal (host/goods/redeem.py, ``svcard terminal redeem``): a good used up
with one composite purchase of the fare (0 for a prepaid good), its record and the debit
together or not at all; every refusal (expired, not yet valid, already used, empty token, no
such good, insufficient balance, ...) names its reason and writes nothing; the redemptions go
out in the PSAM's batch (type 09) and through clearing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import demo_image, with_balance
from plain import demo_card_keys, plain_tac
from rawhost import DEMO_SERIAL
from test_capp import CappHost, good, update_cache
from test_capp_mac import KEYS, card_image, goods_issuer_file
from test_persistence import Tear

from svcard.card.image import open_card, save_new_image
from svcard.card.storage import PowerCut, read_image
from svcard.fixtures import fixture_path
from svcard.host.cli.main import main
from svcard.host.goods import redeem as R
from svcard.host.pay.server.batches import collect_batch
from svcard.host.settle.batches import tac_input
from svcard.host.settle.clearing import run_clearing
from svcard.host.settle.config import clearing_config
from svcard.host.settle.db import make_engine
from svcard.host.terminal import apdus
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import goods as G
from svcard.protocols import purse as P
from svcard.reader.virtual import VirtualReader

AT = ["--at", "2027-03-14 15:09:26"]
TICKETS, COUPONS, TRANSIT, VOUCHERS = 0x11, 0x12, 0x13, 0x14


class Kit:
    """A card and a validator's PSAM as image files, driven through ``svcard terminal``."""

    def __init__(self, folder: Path, ep: int = 10_000) -> None:
        self.iep, self.psam = folder / "iep.json", folder / "psam.json"
        # a card with a goods key: the records go MAC'd (84 DE) with the issuer's key service
        save_new_image(self.iep, card_image(ep, fixed_random="A1B2C3D4"))
        save_new_image(self.psam, demo_image("psam"))
        self.slots = ["--card", f"virtual:{self.iep}", "--psam", f"virtual:{self.psam}",
                      "--goods-issuer", str(goods_issuer_file(folder))]

    def run(self, *args: str) -> Any:
        return CliRunner().invoke(main, ["terminal", *args])

    def buy(self, amount: str, *records: tuple[int, bytes]) -> None:
        """A composite purchase writing the goods (the fulfilment's purse-paid write)."""
        extra = [x for sfi, rec in records for x in ("--record", f"{sfi:02X}:{rec.hex()}")]
        done = self.run("capp", *self.slots, "--amount", amount, *extra, *AT)
        assert done.exit_code == 0, done.output

    def redeem(self, *args: str, at: list[str] = AT) -> Any:
        return self.run("redeem", *self.slots, *args, *at)

    def app(self) -> dict[str, Any]:
        return read_image(self.iep)["app"]

    def record(self, sfi: int, n: int = 1) -> bytes:
        files = {f["sfi"]: f for f in self.app()["goods"]["files"]}
        return bytes.fromhex(files[sfi]["data"].get(str(n), G.EMPTY.hex()))

    def psam_records(self) -> list[Any]:
        return [P.PsamRecord.parse(bytes.fromhex(r))
                for r in read_image(self.psam)["app"]["records"]]

    def both(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.app(), read_image(self.psam)["app"]


def test_the_card_takes_a_zero_amount_composite_purchase() -> None:
    """PBOC practice (an ETC entry station's 80 50 03 02 0B 01 00000000 ... then 80 DC and a
    0-amount DEBIT): amount 0 is a composite purchase like any other, checked the plain way:
    MAC2 and TAC over amount 0, the counter counted, a type-09 log record, the record written."""
    from svcard.card.image import card_from_image
    card = card_from_image(with_balance(demo_image("iep", capp_plain_update=True), ep=0))
    host = CappHost(card)
    host.select()
    used_ticket = R.used(good())
    host.capp(0, [update_cache(TICKETS, 1, used_ticket)])   # checks MAC2 and the TAC
    assert host.read_good(TICKETS, 1) == (used_ticket, 0x9000)
    state = card.apps[0].to_state()
    assert state["ep"]["balance"] == 0 and state["ep"]["offline_counter"] == 1
    log = bytes.fromhex(state["log"][0])
    assert log[9] == P.TYPE_COMPOSITE_PURCHASE and log[5:9] == bytes(4)


def test_a_ticket_is_redeemed_once_then_refused(tmp_path: Path) -> None:
    kit = Kit(tmp_path)
    kit.buy("15.00", (TICKETS, good()))
    counter = kit.app()["ep"]["offline_counter"]
    done = kit.redeem("--good", "1")
    assert done.exit_code == 0, done.output
    assert "redeemed ticket 0000000000000001 of issuer 4D45524348414E54" in done.output
    assert "now used" in done.output and "charged CNY 0.00" in done.output
    after = G.parse(kit.record(TICKETS))
    assert after["status"] == G.STATUS_USED and after["reference"] == b"SEAT-12A"
    app = kit.app()
    assert app["ep"]["balance"] == 10_000 - 1500   # prepaid: a 0-fare composite purchase
    assert app["ep"]["offline_counter"] == counter + 1
    assert bytes.fromhex(app["log"][0])[9] == P.TYPE_COMPOSITE_PURCHASE
    records = kit.psam_records()
    assert [(r.txn_type, r.amount, r.status) for r in records] == [(9, 1500, 0), (9, 0, 0)]
    # the 0-amount redemption carries the card's TAC, as clearing checks it
    raw = bytes.fromhex(read_image(kit.psam)["app"]["records"][1])
    assert records[1].tac == plain_tac(demo_card_keys(DEMO_SERIAL)["dtk"], tac_input(raw))
    # the same ticket again: refused, nothing written anywhere
    before = kit.both()
    again = kit.redeem("--good", "0000000000000001", "--json")
    assert again.exit_code == 1
    assert "svcard: redeem refused: already used (ticket 0000000000000001" in again.output
    assert json.loads(again.stdout)["reason"] == "already used"
    assert kit.both() == before


def test_a_token_gives_three_rides_and_the_fourth_is_refused(tmp_path: Path) -> None:
    kit = Kit(tmp_path)
    token = good("transit", 7, rides_left=3, rides_total=3, fare=300)
    kit.buy("9.00", (TRANSIT, token))
    for left in (2, 1, 0):
        done = kit.redeem("--kind", "transit", "--json")
        assert done.exit_code == 0, done.output
        out = json.loads(done.output)
        assert out["good"]["rides_left"] == left and out["charged"] == 0
        assert G.parse(kit.record(TRANSIT))["rides_left"] == left
    assert G.parse(kit.record(TRANSIT))["status"] == G.STATUS_VALID
    before = kit.both()
    fourth = kit.redeem("--kind", "transit")
    assert fourth.exit_code == 1
    assert "redeem refused: empty token (transit 0000000000000007" in fourth.output
    assert kit.both() == before
    assert kit.app()["ep"]["balance"] == 10_000 - 900
    assert [r.amount for r in kit.psam_records()] == [900, 0, 0, 0]


def test_on_the_wire_a_redemption_is_one_composite_purchase(tmp_path: Path) -> None:
    """The card's trace: goods read by READ RECORD, then INITIALIZE FOR CAPP PURCHASE of 0,
    ONE UPDATE CAPP DATA CACHE of the used record by its record number, DEBIT FOR CAPP
    PURCHASE; the PSAM's trace: INIT SAM FOR PURCHASE of type 09, CREDIT SAM FOR PURCHASE."""
    kit = Kit(tmp_path)
    kit.buy("15.00", (TICKETS, good()))
    trace = tmp_path / "redeem.jsonl"
    done = kit.redeem("--good", "1", "--trace-out", str(trace))
    assert done.exit_code == 0, done.output
    card = [bytes.fromhex(json.loads(x)["command"]) for x in trace.read_text().splitlines()
            if '"command"' in x]
    psam = [bytes.fromhex(json.loads(x)["command"])
            for x in trace.with_name("redeem.psam.jsonl").read_text().splitlines()
            if '"command"' in x]
    values = [c for c in card if c[:2] in (b"\x80\x50", b"\x84\xDE", b"\x80\x54")]
    assert [c[:4].hex().upper() for c in values] == ["80500302", "84DE018C", "80540100"]
    assert values[0][6:10] == bytes(4)                          # the amount: 0
    assert values[1][4] == G.RECORD_SIZE + 4 and values[1][5:-4] == R.used(good())   # + MAC
    assert any(c[:2] == b"\x00\xB2" and c[3] == (TICKETS << 3) | 4 for c in card)
    init_sam = next(c for c in psam if c[:2] == b"\x80\x70")
    assert init_sam[5 + 10] == P.TYPE_COMPOSITE_PURCHASE         # after random, counter, amount
    assert any(c[:2] == b"\x80\x72" for c in psam)


@pytest.mark.parametrize(("record", "args", "reason"), [
    (good(valid_to=bytes.fromhex("20261231")), ["--good", "1"], "expired"),
    (good(status=G.STATUS_EXPIRED), ["--good", "1"], "expired"),
    (good(valid_from=bytes.fromhex("20270315")), ["--good", "1"], "not yet valid"),
    (good(status=G.STATUS_VOID), ["--kind", "ticket"], "void"),
    (good(), ["--good", "2"], "no such good"),                       # another card's good
    (good(), ["--good", "1", "--issuer", "4F54484552"], "no such good"),   # another issuer
    (good(), ["--kind", "voucher"], "no such good"),
    (good("coupon", value=200, min_spend=1000), ["--kind", "coupon", "--fare", "9.99"],
     "fare below the coupon's minimum spend"),
    (good(), ["--good", "1", "--fare", "200.00"], "insufficient balance for the fare"),
])
def test_a_good_that_cannot_be_used_is_refused_and_nothing_is_written(
        tmp_path: Path, record: bytes, args: list[str], reason: str) -> None:
    kit = Kit(tmp_path)
    kit.buy("1.00", (COUPONS if record[0] == G.TAG_COUPON else TICKETS, record))
    done = kit.run("capp", *kit.slots, "--amount", "89.00", *AT)   # leave 10.00
    assert done.exit_code == 0, done.output
    before = kit.both()
    refused = kit.redeem(*args)
    assert refused.exit_code == 1, refused.output
    lines = refused.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"svcard: redeem refused: {reason} (")
    assert kit.both() == before   # no debit, no record change, no PSAM record


def test_a_coupon_takes_its_value_off_the_fare(tmp_path: Path) -> None:
    kit = Kit(tmp_path)
    kit.buy("1.00", (COUPONS, good("coupon", 3, value=200, min_spend=1000)))
    done = kit.redeem("--kind", "coupon", "--fare", "12.00", "--json")
    assert done.exit_code == 0, done.output
    out = json.loads(done.output)
    assert (out["fare"], out["charged"], out["good"]["status_name"]) == (1200, 1000, "used")
    assert kit.app()["ep"]["balance"] == 10_000 - 100 - 1000
    assert kit.psam_records()[-1].amount == 1000


def test_the_usable_good_that_expires_first_is_taken(tmp_path: Path) -> None:
    kit = Kit(tmp_path)
    late = good(n=1, valid_to=bytes.fromhex("20281231"))
    soon = good(n=2, valid_to=bytes.fromhex("20270401"))
    used = good(n=3, status=G.STATUS_USED, valid_to=bytes.fromhex("20270320"))
    kit.buy("30.00", (TICKETS, late), (TICKETS, soon), (TICKETS, used))
    done = kit.redeem("--kind", "ticket", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["good"]["good_id"] == "0000000000000002"
    assert kit.record(TICKETS, 1) == late


@pytest.mark.parametrize(("args", "message"), [
    ([], "give --good GOOD_ID or --kind KIND"),
    (["--good", "XYZ"], "--good"),
    (["--good", "1" * 17], "--good"),
    (["--kind", "pony"], "--kind"),
    (["--good", "1", "--fare", "1.234"], "--fare"),
])
def test_bad_command_lines_are_usage_errors(tmp_path: Path, args: list[str],
                                            message: str) -> None:
    kit = Kit(tmp_path)
    done = kit.redeem(*args)
    assert done.exit_code == 2 and message in done.output, done.output


def test_validator_check_order() -> None:
    """A used-up token says 'empty token' whatever its status; a void good is void even
    inside its dates; dates are checked before rides."""
    import datetime as dt
    today = dt.date(2027, 3, 14)
    empty_used = good("transit", rides_left=0, status=G.STATUS_USED)
    assert R.why_not(empty_used, today) == "empty token"
    assert R.why_not(good("transit", rides_left=0), today) == "empty token"
    assert R.why_not(good("transit", rides_left=0, valid_to=bytes.fromhex("20270101")),
                     today) == "expired"
    assert R.why_not(good(status=G.STATUS_VOID), today) == "void"
    assert R.why_not(good(valid_to=bytes.fromhex("20270314")), today) is None   # last day
    assert R.used(good("transit"))[26:28] == (9).to_bytes(2, "big")
    assert R.used(good())[1] == G.STATUS_USED


# --- a power cut during the redemption -----------------------------------------------------
def _torn_redeem(kit: Kit, tear: Tear, fare: int, journal: Journal | None = None) -> None:
    """A redemption whose DEBIT loses power at write step ``tear.cut_at``, or (cut_at None
    with ``tear.lose`` set) whose DEBIT completes and its answer is lost."""
    card = open_card(kit.iep, tear=tear)
    reader = VirtualReader(card)
    reader.connect()
    real = reader.exchange

    def exchange(apdu: bytes) -> Any:
        tear.armed = apdu[:2] == b"\x80\x54"    # DEBIT FOR CAPP PURCHASE: the only write
        answer = real(apdu)
        if tear.armed and getattr(tear, "lose", False):
            raise PowerCut("the answer was lost")
        return answer
    reader.exchange = exchange  # type: ignore[method-assign]
    try:
        with open_reader(f"virtual:{kit.psam}") as psam:
            R.redeem(reader, psam, R.Choice(kind="transit"), fare, journal=journal,
                     goods_keys=KEYS)
    finally:
        card.close()


def test_a_power_cut_during_a_redemption_leaves_both_or_neither(tmp_path: Path) -> None:
    def fresh(name: str) -> Kit:
        folder = tmp_path / name
        folder.mkdir()
        kit = Kit(folder)
        kit.buy("9.00", (TRANSIT, good("transit", rides_left=3, rides_total=3)))
        return kit

    dry = Tear(None)
    _torn_redeem(fresh("dry"), dry, 150)
    assert len(dry.steps) == 8      # two image writes of four steps: balance+record, log
    outcomes = []
    for cut in range(len(dry.steps)):
        kit = fresh(f"cut{cut}")
        before = kit.app()
        with pytest.raises(PowerCut):
            _torn_redeem(kit, Tear(cut), 150)
        card = open_card(kit.iep)          # power back: a pending log record is finished
        card.close()
        after = kit.app()
        token = G.parse(kit.record(TRANSIT))
        moved = after["ep"]["balance"] != before["ep"]["balance"]
        outcomes.append(moved)
        if moved:    # the ride and the fare, the counter and the log record, together
            assert token["rides_left"] == 2 and after["ep"]["balance"] == 10_000 - 900 - 150
            assert after["ep"]["offline_counter"] == before["ep"]["offline_counter"] + 1
            assert len(after["log"]) == 2 and bytes.fromhex(after["log"][0])[9] == 9
        else:        # neither
            assert token["rides_left"] == 3
            assert {k: after[k] for k in ("ep", "goods", "log")} == {
                k: before[k] for k in ("ep", "goods", "log")}
        # the rider taps again: exactly one more ride (the validator reads what the card has)
        done = kit.redeem("--kind", "transit", "--json")
        assert done.exit_code == 0, done.output
        assert json.loads(done.output)["good"]["rides_left"] == (1 if moved else 2)
    assert outcomes == [False] * 3 + [True] * 5    # committed once write 1 is renamed


@pytest.mark.parametrize("interruption", ["cut-before-commit", "cut-after-commit",
                                          "answer-lost"])
def test_a_journalled_validator_never_takes_a_second_ride_for_one_tap(
        tmp_path: Path, interruption: str) -> None:
    """The rider taps, the tap is interrupted, the rider taps again at the same validator: one
    ride in all, whether or not the first tap reached the card."""
    kit = Kit(tmp_path)
    kit.buy("9.00", (TRANSIT, good("transit", rides_left=3, rides_total=3)))
    journal_path = tmp_path / "validator.jsonl"
    tear = Tear({"cut-before-commit": 0, "cut-after-commit": 3, "answer-lost": None}[
        interruption])
    tear.lose = interruption == "answer-lost"  # type: ignore[attr-defined]
    with pytest.raises(PowerCut):
        _torn_redeem(kit, tear, 0, Journal(journal_path))
    open_card(kit.iep).close()              # power back
    landed = interruption != "cut-before-commit"
    assert G.parse(kit.record(TRANSIT))["rides_left"] == (2 if landed else 3)
    psam_before = kit.psam_records()
    again = kit.redeem("--kind", "transit", "--journal", str(journal_path), "--json")
    assert again.exit_code == 0, again.output
    out = json.loads(again.output)
    assert out["good"]["rides_left"] == 2                       # one ride, not two
    assert out.get("finished_interrupted", False) is landed
    assert len(kit.psam_records()) == len(psam_before) + (0 if landed else 1)
    entry = next(iter(Journal(journal_path).entries().values()))   # the interrupted tap
    assert entry["state"] == ("done" if landed else "abandoned")
    if landed:        # the card's TAC for the PSAM's record that never got one
        assert entry["finished_later"]
        raw = bytes.fromhex(read_image(kit.psam)["app"]["records"][-1])
        assert P.PsamRecord.parse(raw).tac == bytes(4)    # CREDIT SAM never came
        assert entry["tac"] == plain_tac(demo_card_keys(DEMO_SERIAL)["dtk"],
                                         tac_input(raw)).hex().upper()
    # the next tap is a ride of its own; nothing left open
    third = kit.redeem("--kind", "transit", "--journal", str(journal_path), "--json")
    assert json.loads(third.output)["good"]["rides_left"] == 1
    assert all(e["state"] in ("done", "abandoned")
               for e in Journal(journal_path).entries().values())
    # a tap the card refuses (it cannot pay the fare) is closed at once
    refused = kit.redeem("--kind", "transit", "--fare", "500.00", "--journal",
                         str(journal_path))
    assert "insufficient balance for the fare" in refused.output
    assert list(Journal(journal_path).entries().values())[-1]["state"] == "abandoned"


# --- the PSAM batch and clearing -----------------------------------------------------------
def test_redemptions_go_out_in_the_psam_batch_and_through_clearing(tmp_path: Path) -> None:
    kit = Kit(tmp_path)
    kit.buy("24.00", (TICKETS, good()), (TRANSIT, good("transit", 5, rides_left=3)))
    for args in (["--good", "1", "--kind", "ticket"], ["--kind", "transit"],
                 ["--kind", "transit", "--fare", "2.00"]):
        done = kit.redeem(*args)
        assert done.exit_code == 0, done.output
    with open_reader(f"virtual:{kit.psam}") as psam:
        assert psam.exchange(apdus.select(P.DEFAULT_PSAM_AID)).ok
        psam_id = psam.exchange(apdus.read_binary(P.SFI_PUBLIC_DATA, 10)).data.hex().upper()
        batch = collect_batch(psam)
    assert batch is not None
    types = [(P.PsamRecord.parse(bytes.fromhex(r)).txn_type,
              P.PsamRecord.parse(bytes.fromhex(r)).amount) for r in batch["records"]]
    assert types == [(9, 2400), (9, 0), (9, 0), (9, 200)]
    folder = tmp_path / "concentration"
    folder.mkdir()
    (folder / "batch-1.json").write_text(json.dumps({**batch, "psam_id": psam_id}))
    report = run_clearing(clearing_config(fixture_path("clearing-demo.toml")), folder,
                          make_engine(f"sqlite:///{tmp_path / 'clearing.db'}"),
                          tmp_path / "settlement")
    assert report.records_cleared == 2 and report.total_paid == 2400 + 200
    states = report.batches[0]["counts"]
    assert states == {"cleared": 2, "skipped": 2}   # the 0-fare rides move no money


# --- randomised: many taps on many goods ------------------------------------------------------
def test_random_taps_consume_only_usable_goods_and_refusals_write_nothing() -> None:
    """Random goods (kinds, statuses, dates, rides, two issuers) bought in one composite
    purchase, then random taps (by kind, good id, issuer; a random clock; a fare now and then,
    some beyond the balance). Each tap's outcome is checked against a plain model: a success
    changes exactly the good the model picks (and the balance by the charge, the PSAM by one
    record), a refusal names the model's reason and changes nothing. SVCARD_REDEEM_TAPS
    (default 80) and SVCARD_REDEEM_SEED replay a run."""
    import datetime as dt
    import os
    import random

    from svcard.card.image import card_from_image
    from svcard.host.terminal.capp import GoodsWrite, capp_purchase

    seed = int(os.environ.get("SVCARD_REDEEM_SEED", "20261122"))
    taps = int(os.environ.get("SVCARD_REDEEM_TAPS", "80"))
    print(f"redeem randomised: seed {seed}, {taps} taps")
    rng = random.Random(seed)
    card = card_from_image(card_image(1_000_000))
    psam_card = card_from_image(demo_image("psam"))
    reader, psam = VirtualReader(card), VirtualReader(psam_card)
    reader.connect()
    psam.connect()
    issuers = [bytes.fromhex("4D45524348414E54"), bytes.fromhex("5452414E53495431")]
    sfi_of = {"ticket": TICKETS, "coupon": COUPONS, "transit": TRANSIT, "voucher": VOUCHERS}

    def day(n: int) -> bytes:
        return P.bcd_date(dt.date(2026, 1, 1) + dt.timedelta(days=n))

    model: dict[tuple[int, int], bytes] = {}
    for kind, sfi in sfi_of.items():
        for number in range(1, 5):
            start = rng.randrange(0, 700)
            fields: dict[str, Any] = {
                "issuer_id": rng.choice(issuers), "good_id": rng.randrange(1, 7).to_bytes(8, "big"),
                "valid_from": day(start), "valid_to": day(start + rng.randrange(0, 400)),
                "status": rng.choice([G.STATUS_VALID] * 5 + [G.STATUS_USED, G.STATUS_EXPIRED,
                                                             G.STATUS_VOID])}
            if kind == "transit":
                fields.update(rides_left=rng.randrange(0, 4), rides_total=3, fare=300)
            if kind == "coupon":
                fields.update(value=rng.randrange(0, 500), min_spend=rng.randrange(0, 800))
            model[(sfi, number)] = good(kind, **fields)
    when0 = dt.datetime(2026, 6, 1, 12, 0, 0)
    items = list(model.items())   # 8 records a composite purchase at most
    for i in range(0, len(items), 8):
        capp_purchase(reader, psam, 1, [GoodsWrite(sfi, rec, n) for (sfi, n), rec in
                                        items[i:i + 8]], when=when0, goods_keys=KEYS)
    balance, psam_records, successes = 1_000_000 - 2, 2, 0
    reasons: set[str] = set()

    def usable(rec: bytes, today: bytes) -> str | None:
        rides = int.from_bytes(rec[26:28], "big") if rec[0] == G.TAG_TRANSIT else None
        if rec[1] == G.STATUS_VOID:
            return "void"
        if rec[1] == G.STATUS_USED:
            return "empty token" if rides == 0 else "already used"
        if rec[1] == G.STATUS_EXPIRED or today > rec[22:26]:
            return "expired"
        if today < rec[18:22]:
            return "not yet valid"
        return "empty token" if rides == 0 else None

    for tap in range(taps):
        when = when0 + dt.timedelta(days=rng.randrange(-150, 500), seconds=tap)
        if tap % 10 == 9:   # a good bought again into a random record: the run never dries up
            key = rng.choice(sorted(model))
            kind = G.KIND_OF_TAG[model[key][0]]
            start = (when.date() - dt.date(2026, 1, 1)).days - rng.randrange(0, 30)
            extra: dict[str, Any] = ({"rides_left": 3, "rides_total": 3, "fare": 300}
                                     if kind == "transit" else {})
            model[key] = good(kind, rng.randrange(1, 7), issuer_id=rng.choice(issuers),
                              valid_from=day(start), valid_to=day(start + 60), **extra)
            capp_purchase(reader, psam, 1, [GoodsWrite(key[0], model[key], key[1])], when=when,
                          goods_keys=KEYS)
            balance, psam_records = balance - 1, psam_records + 1
        today = P.bcd_date(when.date())
        kind = rng.choice([None, "ticket", "coupon", "transit", "voucher"])
        good_id = rng.choice([None, None, rng.randrange(1, 8).to_bytes(8, "big")])
        if kind is None and good_id is None:
            kind = "transit"
        issuer = rng.choice([None, None, None, *issuers])
        fare = rng.choice([0, 0, 0, 250, 900, 5_000_000])   # the last beyond the balance
        choice = R.Choice(good_id=good_id, kind=kind, issuer_id=issuer)
        matching = [(k, r) for k, r in model.items() if choice.matches(r)]
        ok = sorted((r[22:26], k) for k, r in matching if usable(r, today) is None)
        expected: str | None = None
        if not matching:
            expected = "no such good"
        elif not ok:
            expected = usable(matching[0][1], today)
        else:
            key = ok[0][1]
            rec = model[key]
            charge = fare
            if rec[0] == G.TAG_COUPON:
                value, floor = (int.from_bytes(rec[x:x + 4], "big") for x in (26, 30))
                expected = "fare below the coupon's minimum spend" if fare < floor else None
                charge = fare - min(fare, value)
            if expected is None and charge > balance:
                expected = "insufficient balance for the fare"
        before = (card.apps[0].to_state(), psam_card.apps[0].to_state()["records"])
        try:
            receipt = R.redeem(reader, psam, choice, fare, when=when, goods_keys=KEYS)
        except R.Refused as refused:
            assert refused.reason == expected, (seed, tap, refused, expected)
            reasons.add(refused.reason)
            after = (card.apps[0].to_state(), psam_card.apps[0].to_state()["records"])
            assert after == before, (seed, tap)
            continue
        assert expected is None, (seed, tap, expected)
        assert isinstance(receipt, R.RedeemReceipt)
        assert (receipt.sfi, receipt.record_number) == key, (seed, tap)
        model[key] = R.used(rec)
        balance -= charge
        psam_records += 1
        successes += 1
        state = card.apps[0].to_state()
        assert state["ep"]["balance"] == balance
        files = {f["sfi"]: f["data"] for f in state["goods"]["files"]}
        assert all(files[s].get(str(n)) == r.hex().upper() for (s, n), r in model.items())
    assert len(psam_card.apps[0].to_state()["records"]) == psam_records
    print(f"  {successes} redeemed, refused for: {', '.join(sorted(reasons))}")
    assert successes >= taps // 20 and len(reasons) >= min(5, taps // 10), (successes, reasons)
