"""K3: a card counts wrong MACs per key and locks the key (issue 9).

Before the fix an attacker holding a card (or a rogue terminal) could send 2,000 wrong MAC1 and
5,000 wrong S2 and the card answered 9302 to each, forever: an online oracle for the purse keys'
MACs. Now each key has a counter of consecutive wrong MACs, written to the card image before the
answer, reset by a right MAC, and at ``mac_failure_limit`` INITIALIZE with that key answers 6983.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import demo_image, with_balance
from rawhost import RawHost

from svcard.card.iep_commands.lockout import DEFAULT_MAC_FAILURE_LIMIT, unlock_keys
from svcard.card.image import card_from_image, open_card, save_new_image
from svcard.card.personalise import ProfileError, image_from_profile
from svcard.card.runtime import Card
from svcard.card.storage import read_image
from svcard.fixtures import fixture_path

LOCKED = 0x6983
LIMIT = DEFAULT_MAC_FAILURE_LIMIT


def selected(card: Card) -> RawHost:
    host = RawHost(card)
    host.select()
    return host


def guess_mac1s(host: RawHost, tries: int, key_index: int = 1) -> dict[int, int]:
    """The attacker's loop: INITIALIZE FOR PURCHASE, then DEBIT with a guessed MAC1, ``tries``
    times; returns how often each status word came back (INITIALIZE refusals included)."""
    seen: dict[int, int] = {}
    for n in range(tries):
        sw = host.sw(host.init_purchase_apdu(1, key_index=key_index))
        if sw == 0x9000:
            sw = host.sw(host.debit_apdu(n, n.to_bytes(4, "big")))
        seen[sw] = seen.get(sw, 0) + 1
    return seen


def guess_s2s(host: RawHost, tries: int) -> dict[int, int]:
    """The same with INITIALIZE FOR LOAD and CREDIT FOR LOAD with a guessed S2."""
    seen: dict[int, int] = {}
    for n in range(tries):
        sw = host.sw(host.init_load_apdu(1))
        if sw == 0x9000:
            sw = host.sw(host.credit_apdu(n.to_bytes(4, "big")))
        seen[sw] = seen.get(sw, 0) + 1
    return seen


def test_2000_wrong_mac1_are_cut_off_at_the_limit() -> None:
    card = card_from_image(with_balance(demo_image("iep"), ep=1_000))
    host = selected(card)
    seen = guess_mac1s(host, 2_000)
    assert seen == {0x9302: LIMIT, LOCKED: 2_000 - LIMIT}
    # the right MAC1 no longer helps: INITIALIZE itself is refused
    assert host.sw(host.init_purchase_apdu(10)) == LOCKED
    assert host.balance() == 1_000
    # the lock is per key: key index 2 and the load key still work
    init = host.init_purchase(10, key_index=2)
    sk = host.purchase_session_key(init, 5, key="dpk2")
    assert host.sw(host.debit_apdu(5, host.purchase_mac1(sk, 10))) == 0x9000
    host.load(50)
    assert host.balance() == 1_040


def test_5000_wrong_s2_are_cut_off_at_the_limit_and_the_right_s2_is_refused() -> None:
    card = card_from_image(with_balance(demo_image("iep"), ep=100))
    host = selected(card)
    seen = guess_s2s(host, 5_000)
    assert seen == {0x9302: LIMIT, LOCKED: 5_000 - LIMIT}
    assert host.sw(host.init_load_apdu(50)) == LOCKED
    assert host.balance() == 100
    host.purchase(10)  # purchases use other keys and go on
    assert host.balance() == 90


def test_the_right_mac_after_the_lock_is_refused_even_in_an_open_session() -> None:
    """The attacker opens a session, then spends the last guesses on another session: the
    counter is the key's, not the session's."""
    card = card_from_image(with_balance(demo_image("iep"), ep=500))
    host = selected(card)
    guess_mac1s(host, LIMIT - 1)
    init = host.init_purchase(20)
    assert host.sw(host.debit_apdu(1, b"\x00\x00\x00\x01")) == 0x9302  # the last wrong guess
    # the card now refuses to start anything with the key, so the right MAC1 has no session
    assert host.sw(host.init_purchase_apdu(20)) == LOCKED
    sk = host.purchase_session_key(init, 1)
    assert host.sw(host.debit_apdu(1, host.purchase_mac1(sk, 20))) == 0x6985
    assert host.balance() == 500


def test_a_right_mac_before_the_limit_resets_the_count() -> None:
    card = card_from_image(with_balance(demo_image("iep"), ep=500))
    host = selected(card)
    for _ in range(3):
        assert guess_mac1s(host, LIMIT - 1) == {0x9302: LIMIT - 1}
        host.purchase(1)             # consecutive failures only: a right MAC1 restarts
        assert guess_s2s(host, LIMIT - 1) == {0x9302: LIMIT - 1}
        host.load(1)
    state = card.apps[0].to_state()
    assert state["purchase_mac_failures"] == {} and state["load_mac_failures"] == {}
    assert host.balance() == 500


def test_the_lock_survives_a_power_cycle_and_a_reopened_image(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    save_new_image(path, with_balance(demo_image("iep"), ep=300))
    card = open_card(path)
    try:
        host = selected(card)
        assert guess_mac1s(host, LIMIT - 1) == {0x9302: LIMIT - 1}
        card.reset()  # the attacker pulls the card and tries again: the count stays
        host.select()
        assert guess_mac1s(host, 5) == {0x9302: 1, LOCKED: 4}
    finally:
        card.close()
    on_disk = read_image(path)["app"]
    assert on_disk["purchase_mac_failures"] == {"1": LIMIT}
    card = open_card(path)
    try:
        host = selected(card)
        assert host.sw(host.init_purchase_apdu(1)) == LOCKED
    finally:
        card.close()


def test_every_wrong_mac_is_on_disk_before_the_answer(tmp_path: Path) -> None:
    """Cutting power right after the answer cannot undo a count: each 9302 follows its write."""
    path = tmp_path / "card.json"
    save_new_image(path, with_balance(demo_image("iep"), ep=300))
    card = open_card(path)
    try:
        host = selected(card)
        for n in range(1, 4):
            host.init_purchase(1)
            assert host.sw(host.debit_apdu(n, bytes(4))) == 0x9302
            assert read_image(path)["app"]["purchase_mac_failures"] == {"1": n}
    finally:
        card.close()


def test_the_issuer_unlocks_by_repersonalising(tmp_path: Path) -> None:
    card = card_from_image(with_balance(demo_image("iep"), ep=300))
    host = selected(card)
    guess_s2s(host, LIMIT)
    assert host.sw(host.init_load_apdu(1)) == LOCKED
    unlock_keys(card.apps[0].state)  # type: ignore[attr-defined]
    host.load(5)
    assert host.balance() == 305


def test_old_images_without_counters_load_with_none_counted(tmp_path: Path) -> None:
    image = with_balance(demo_image("iep"), ep=70)
    for name in ("mac_failure_limit", "purchase_mac_failures", "load_mac_failures"):
        del image["app"][name]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(image))
    os.chmod(path, 0o600)
    card = open_card(path)
    try:
        host = selected(card)
        assert card.apps[0].to_state()["mac_failure_limit"] == LIMIT
        host.purchase(20)
        assert host.balance() == 50
    finally:
        card.close()


def test_profile_sets_the_limit(tmp_path: Path) -> None:
    profile = tmp_path / "p.toml"
    text = fixture_path("iep-demo.toml").read_text().replace(
        'issuer = "demo-issuer.toml"', f'issuer = "{fixture_path("demo-issuer.toml")}"')
    profile.write_text("mac_failure_limit = 3\n" + text)
    image = image_from_profile(profile)
    assert image["app"]["mac_failure_limit"] == 3
    card = card_from_image(with_balance(image, ep=10))
    host = selected(card)
    assert guess_mac1s(host, 10) == {0x9302: 3, LOCKED: 7}
    profile.write_text("mac_failure_limit = 0\n" + text)
    with pytest.raises(ProfileError, match="mac_failure_limit"):
        image_from_profile(profile)
