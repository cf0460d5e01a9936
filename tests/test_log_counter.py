"""The log record's counter: "before" the transaction's increment (the default, as FMCOS 2.0's
tables say) or "after" it (as a real FM1208 trace and one applet write it), a card-profile
option kept in the image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import demo_image, with_balance
from plain import FIXTURES
from rawhost import RawHost

from svcard.card.image import ImageError, card_from_image, check_image, open_card, save_new_image
from svcard.card.personalise import ProfileError, image_from_profile


def profile(tmp_path: Path, extra: str) -> Path:
    text = (FIXTURES / "iep-demo.toml").read_text()
    issuer = f'issuer = "{(FIXTURES / "demo-issuer.toml").as_posix()}"'
    text = text.replace('issuer = "demo-issuer.toml"', issuer + "\n" + extra)  # top level
    path = tmp_path / "card.toml"
    path.write_text(text)
    return path


def log_counters(card) -> list[int]:
    return [int.from_bytes(r[0:2], "big") for r in card.apps[0].state.log]


def transactions(card) -> RawHost:
    host = RawHost(card)
    host.select()
    host.load(500)                      # online counter 0 -> 1
    host.purchase(100)                  # offline counter 0 -> 1
    host.purchase(100)                  # offline counter 1 -> 2
    return host


def test_default_writes_the_counter_before_the_increment() -> None:
    image = with_balance(demo_image("iep"))
    assert image["app"]["log_counter"] == "before"
    card = card_from_image(image)
    transactions(card)
    assert log_counters(card) == [1, 0, 0]          # newest first


def test_after_writes_the_incremented_counter_and_proofs_keep_the_initialize_one(
        tmp_path: Path) -> None:
    image = image_from_profile(profile(tmp_path, 'log_counter = "after"'))
    assert image["app"]["log_counter"] == "after"
    path = tmp_path / "card.json"
    save_new_image(path, image)
    card = open_card(path)
    try:
        host = transactions(card)
        assert log_counters(card) == [2, 1, 1]
        # GET TRANSACTION PROVE takes the counter INITIALIZE answered (1 for the last purchase)
        data, sw = host.send(bytes([0x80, 0x5A, 0x00, 0x06, 0x02, 0x00, 0x01, 0x08]))
        assert sw == 0x9000 and len(data) == 8
        assert host.sw(bytes([0x80, 0x5A, 0x00, 0x06, 0x02, 0x00, 0x02, 0x08])) == 0x9406
    finally:
        card.close()
    kept = json.loads(path.read_text())
    assert kept["app"]["log_counter"] == "after"          # kept in the image
    again = open_card(path)
    try:
        RawHost(again).select()
        assert again.apps[0].state.log_counter == "after"
    finally:
        again.close()


def test_the_option_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"card\.toml: log_counter"):
        image_from_profile(profile(tmp_path, 'log_counter = "later"'))
    image = demo_image("iep", log_counter="sometimes")
    with pytest.raises(ImageError, match=r"app\.log_counter"):
        check_image(image, "card.json")
    with pytest.raises(ImageError):
        card_from_image(image)
