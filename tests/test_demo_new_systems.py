"""``svcard demo`` shows the systems built beside the purse: loyalty points earned through the
load flow and spent through the payment flow on the demo card's programme, cleared and audited
per programme in points (seed 002 FIG. 16); a good bought by a composite purchase, the good
and the debit written in one step, then listed (seed 000); a trading session opened, a few
micropayments inside its deposit, then closed and cleared (seed 004)."""

from __future__ import annotations

from svcard.host.settle.audit import audit


def test_a_points_audit_says_points_not_money() -> None:
    report = audit({"00000001": 1_300}, opening=1_300, unit="points")
    assert report.clean and report.to_json()["unit"] == "points"
    text = report.text()
    assert "figures (points):" in text and "clean: every point is accounted for" in text
    assert "minor units" not in text and "money" not in text
    money = audit({"00000001": 1_300}, opening=1_300).text()
    assert "figures (minor units):" in money and "every unit of money" in money
