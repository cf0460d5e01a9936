"""``svcard demo`` shows the systems built beside the purse: loyalty points earned through the
load flow and spent through the payment flow on the demo card's programme, cleared and audited
per programme in points (seed 002 FIG. 16); a good bought by a composite purchase, the good
and the debit written in one step, then listed (seed 000); a trading session opened, a few
micropayments inside its deposit, then closed and cleared (seed 004)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from svcard.card.storage import read_image
from svcard.host.demo.story import Story, run_demo
from svcard.host.settle.audit import audit
from svcard.host.terminal.capp import describe_goods

MILES_AID = bytes.fromhex("F05356434152440401")   # fixtures/iep-miles-demo.toml's programme


def test_a_points_audit_says_points_not_money() -> None:
    report = audit({"00000001": 1_300}, opening=1_300, unit="points")
    assert report.clean and report.to_json()["unit"] == "points"
    text = report.text()
    assert "figures (points):" in text and "clean: every point is accounted for" in text
    assert "minor units" not in text and "money" not in text
    money = audit({"00000001": 1_300}, opening=1_300).text()
    assert "figures (minor units):" in money and "every unit of money" in money


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Story:
    return run_demo(tmp_path_factory.mktemp("demo") / "kept", 10_000, 1_234)


def test_points_are_earned_spent_cleared_and_audited_per_programme(demo: Story) -> None:
    points = demo.data["network"]["points"]
    assert points["programme"] == "SKYMILES" and points["aid"] == MILES_AID.hex().upper()
    assert points["issuer_id"] == "2000000000000001"
    earned, spent = points["earned"], points["spent"]
    assert earned["outcome"] == "loaded" and earned["amount"] == 2_500
    assert (points["points_before"], earned["balance_after"]) == (0, 2_500)
    assert spent["variant"] == "fig6" and spent["amount"] == 1_200
    assert spent["goods"] == "LOUNGE-PASS-7F3A" and spent["balance_after"] == 1_300
    assert points["points_after"] == 1_300
    assert points["clearing"]["total_paid"] == 1_200
    assert points["clearing"]["total_loaded"] == 2_500
    audit = points["audit"]
    assert audit["clean"] is True and audit["unit"] == "points"
    assert audit["figures"]["card balances"] == 1_300
    assert audit["figures"]["bank accounts debited"] == audit["figures"]["loads confirmed"] \
        == 2_500
    # the points sit on the same card as its money, in the programme's own ADF
    image = read_image(Path(demo.data["folder"]) / "network-card.json")
    assert image["loyalty"][0]["ep"]["balance"] == 1_300
    # and the money's clearing and audit never saw a point
    network = demo.data["network"]
    spent_money = sum(p["amount"] for p in network["purchases"])
    sp = network["sp"]
    assert network["clearing"]["total_paid"] == spent_money + sp["order"]["line"]["wholesale"]
    assert network["clearing"]["total_loaded"] == 10_000 + sp["topped_up"]
    assert network["audit"]["clean"] is True and network["audit"]["unit"] == "money"


def test_a_good_is_bought_with_the_debit_listed_and_one_ride_redeemed(demo: Story) -> None:
    goods = demo.data["goods"]
    bought = goods["purchase"]
    assert bought["txn_type"] == 9 and bought["amount"] == 2_500
    assert bought["balance_before"] == 10_000 - 1_234
    assert bought["balance_after"] == 10_000 - 1_234 - 2_500
    assert sorted((g["kind"], g["sfi"]) for g in goods["goods"]) == [("ticket", 0x11),
                                                                       ("transit", 0x13)]
    [token] = [g for g in goods["goods"] if g["kind"] == "transit"]
    assert (token["rides_left"], token["rides_total"], token["fare"]) == (10, 10, 200)
    ride = goods["ride"]
    assert ride["redeemed"] is True and ride["charged"] == 0
    assert ride["purchase"]["txn_type"] == 9
    assert ride["purchase"]["balance_after"] == bought["balance_after"]
    assert ride["good"]["rides_left"] == 9
    [after] = [g for g in goods["goods_after_ride"] if g["kind"] == "transit"]
    assert after["rides_left"] == 9 and after["record_number"] == token["record_number"]
    # the card image holds the good as the ride left it, and the purse's debit
    app = read_image(Path(demo.data["folder"]) / "iep.json")["app"]
    assert app["ep"]["balance"] == 10_000 - 1_234 - 2_500
    [held] = [g for g in describe_goods(app) if g["kind"] == "transit"]
    assert held["rides_left"] == 9


def test_a_trading_session_buys_inside_its_deposit_and_clears(demo: Story) -> None:
    trade = demo.data["trade"]
    assert (trade["deposit"], trade["currency"], trade["currency_merchant"]) == (500, "EUR",
                                                                               "JPY")
    assert trade["deposit_merchant"] == 791 and trade["unit"] == 10
    assert [(p["item"], p["amount"]) for p in trade["purchases"]] == [
        ("song", 30), ("article", 10), ("map", 50)]
    assert trade["length"] == 79     # whole links of 10 JPY in 791 JPY
    assert trade["purchases"][-1]["left"] == 79 * 10 - 90
    clearing = trade["closed"]["clearing"]
    assert clearing["outcome"] == "agreed" and clearing["paid"] == 90
    assert clearing["withdrawal"] + clearing["returned"] == 500


def test_the_story_shows_each_new_system_in_its_place(demo: Story) -> None:
    text = demo.text
    order = ["Card balance now CNY 87.66", "GOODS (seed 000)", "GOODS ON THE CARD",
             "RIDE at a validator", "Network:", "LOYALTY (seed 002 FIG. 16)",
             "POINTS EARNED", "POINTS SPENT", "POINTS CLEARED AND AUDITED", "SERVICE PROVIDER",
             "CLEARING:", "AUDIT:", "TRADING SESSION (seed 004)", "closed: both records agreed"]
    at = [text.index(needle) for needle in order]
    assert at == sorted(at)
    assert "card 1300 pts + settled 1200 = opening 0 + earned 2500: clean" in text
    assert "9 of 10 rides left" in text
    json.dumps(demo.data)          # --json prints all of it


def test_goods_the_card_cannot_pay_are_skipped_with_nothing_written(tmp_path: Path) -> None:
    from svcard.card.image import save_new_image
    from svcard.card.personalise import image_from_profile
    from svcard.fixtures import fixture_path
    from svcard.host.demo.goods_story import run_goods

    paths = {}
    for kind in ("iep", "psam"):
        paths[kind] = tmp_path / f"{kind}.json"
        save_new_image(paths[kind], image_from_profile(fixture_path(f"{kind}-demo.toml")))
    image = read_image(paths["iep"])
    image["app"]["ep"]["balance"] = 2_499         # a cent short of the goods' 25.00
    save_new_image(paths["iep"], image, overwrite=True)
    lines: list[str] = []
    out = run_goods(paths["iep"], paths["psam"], lines, lambda n: f"CNY {n / 100:.2f}")
    assert out == {"skipped": "insufficient funds", "price": 2_500}
    assert "skipped, the card cannot pay their CNY 25.00" in lines[-1]
    app = read_image(paths["iep"])["app"]
    assert app["ep"]["balance"] == 2_499 and describe_goods(app) == []
