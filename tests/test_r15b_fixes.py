"""Small fixes after the review of issue 15 (R-15): each test failed before its fix."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from svcard.host.trade.stack import TradeStack, start_trade


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[TradeStack]:
    s = start_trade(tmp_path / "trade", close_seconds=3600)
    yield s
    s.close()


# --- 1: the pseudonym that gates a session's status is compared in constant time ------------

def test_the_pseudonym_comparison_accepts_and_refuses() -> None:
    from svcard.host.trade.server.common import same_pseudonym
    assert same_pseudonym("p" * 32, "p" * 32)
    assert not same_pseudonym("p" * 31 + "q", "p" * 32)
    assert not same_pseudonym("p" * 31, "p" * 32)          # a prefix is not the pseudonym
    assert not same_pseudonym("p" * 33, "p" * 32)
    assert not same_pseudonym("", "p" * 32)
    assert not same_pseudonym(None, "p" * 32)
    assert not same_pseudonym("pé\udcff", "p" * 32)         # non-ASCII: refused, never raises


def test_status_and_clearing_view_compare_with_compare_digest(
        stack: TradeStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /v1/sessions/{s} at the merchant and GET .../clearing at the account manager
    compared the ``?pseudonym=`` with ``!=``; both now go through hmac.compare_digest."""
    from svcard.host.trade.server import common
    calls: list[tuple[bytes, bytes]] = []

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return hmac.compare_digest(a, b)

    monkeypatch.setattr(common, "hmac", SimpleNamespace(compare_digest=spy))
    alice = stack.customer("alice", 10_00)
    with httpx.Client(timeout=30) as http:
        s = stack.open(http, alice, 5_00)
        status = f"{stack.url('shop')}/v1/sessions/{s.session}"
        calls.clear()
        assert http.get(status, params={"pseudonym": s.pseudonym}).status_code == 200
        assert calls and calls[-1] == (s.pseudonym.encode(), s.pseudonym.encode())
        for wrong in (s.pseudonym[:-1], s.pseudonym + "0", "é" * 8, ""):
            calls.clear()
            answer = http.get(status, params={"pseudonym": wrong})
            assert answer.status_code == 404 and calls, (wrong, answer.text)
        assert http.get(status).status_code == 404
        clearing = f"{stack.am.url}/v1/sessions/{s.session}/clearing"
        calls.clear()
        right = http.get(clearing, params={"pseudonym": s.pseudonym})
        assert right.status_code == 404 and "not cleared yet" in right.text and calls
        calls.clear()
        wrong_one = http.get(clearing, params={"pseudonym": s.pseudonym[:-1] + "x"})
        assert wrong_one.status_code == 404 and "no such session" in wrong_one.text and calls


# --- 2: the customer agent's session file is 0600 even when a 0644 .tmp was left behind ------

def _session() -> Any:
    from svcard.host.trade import customer as C
    return C.Session("am1.1", "p1", "shop", "", 100, "EUR", 20_000, "JPY", "1/1", 100, 1,
                     100, 0, b"k" * 32, b"s" * 32)


def test_save_never_reuses_a_world_readable_temp_file(tmp_path: Path) -> None:
    """save() opened ``NAME.tmp`` with O_CREAT|O_TRUNC: an existing file keeps its mode, so a
    0644 leftover made the session file (which holds the session's private key) 0644."""
    from svcard.host.trade import customer as C
    path = tmp_path / "session.json"
    tmp = tmp_path / "session.json.tmp"
    tmp.write_text("left over")
    tmp.chmod(0o644)
    C.save(path, _session())
    assert path.stat().st_mode & 0o777 == 0o600
    assert not tmp.exists() or tmp.stat().st_mode & 0o777 == 0o600
    assert C.load(path).session == "am1.1"
    for left in tmp_path.iterdir():
        assert left.stat().st_mode & 0o777 == 0o600, left


def test_save_does_not_follow_a_link_planted_as_the_temp_file(tmp_path: Path) -> None:
    from svcard.host.trade import customer as C
    target = tmp_path / "elsewhere"
    target.write_text("theirs")
    target.chmod(0o644)
    path = tmp_path / "session.json"
    (tmp_path / "session.json.tmp").symlink_to(target)
    C.save(path, _session())
    assert target.read_text() == "theirs"                  # the secrets did not go there
    assert path.stat().st_mode & 0o777 == 0o600 and not path.is_symlink()


# --- 3: docs/trade.md states what R-15's fixes made the servers do -----------------------------

def test_the_trade_doc_states_the_limits_the_code_has() -> None:
    from svcard.host.trade import closing as K
    from svcard.host.trade.server import acquirer as A
    doc = " ".join((Path(__file__).parent.parent / "docs" / "trade.md").read_text().split())
    assert f"A session takes at most {K.MAX_ENTRIES:,} purchases" in doc
    assert f"the {K.MAX_ENTRIES + 1:,}st is refused with 409 (end it and open another)" in doc
    # T5: without the merchant's record the agent waits past the grace, until abandon_seconds
    assert "Only `abandon_seconds` after the expiry (7 days by default" in doc
    minutes = A.INFORMING_TIMEOUT_MS // 60_000
    assert f"refuses an initiation it has left undecided for {minutes} minutes at the next " \
           "lookup" in doc
