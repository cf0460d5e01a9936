"""``svcard demo``'s network goods part (seed 000): a good bought on a device through the five
goods servers, paid from a bank account, written by secure messaging, listed and audited."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from svcard.host.demo import story as S
from svcard.host.demo.goods_network_story import run_goods_network


def money(amount: int) -> str:
    return f"CNY {amount / 100:.2f}"


def test_a_voucher_is_bought_paid_by_the_bank_written_listed_and_audited(
        tmp_path: Path) -> None:
    lines: list[str] = []
    data = run_goods_network(tmp_path, lines, money)
    assert data["sw"] == 0x9000 and data["round_trips"] == 2
    assert data["kinds"] == ["voucher"] and data["amount"] == 5000
    assert data["goods"][0]["good_id"] == data["order"][:16].upper()
    assert data["audit"]["clean"], data["audit"]["discrepancies"]
    assert data["audit"]["figures"]["goods 156: bank debits"] == 5000
    text = "\n".join(lines)
    assert "GOODS OVER THE NETWORK (seed 000)" in text
    assert "04 DC" in text and "SW 9000; 2 round trips" in text
    assert "GOODS ON THAT CARD: 1" in text and "voucher valid" in text
    assert "GOODS BOOKS (svcard audit --goods-db): bank debits CNY 50.00" in text
    assert ": clean (" in text
    assert data["ms"] > 0


def test_svcard_demo_tells_the_network_goods_part_after_the_local_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other network parts are stubbed: they have their own tests."""
    def stub(name: str) -> Any:
        def told(*_args: Any) -> Any:
            lines = _args[2] if name == "goods" else _args[1]
            lines.append(f"<{name}>")
            return {}
        return told
    monkeypatch.setattr(S, "run_goods", stub("goods"))
    monkeypatch.setattr(S, "_network", stub("network"))
    monkeypatch.setattr(S, "run_trade", lambda _folder: (["<trade>"], {}))
    story = S.run_demo(tmp_path, 10_000, 1_234)
    assert story.data["goods_network"]["audit"]["clean"]
    text = story.text
    assert text.index("<goods>") < text.index("GOODS OVER THE NETWORK") < text.index(
        "<network>")
