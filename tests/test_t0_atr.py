"""A T=0 card's ATR offers T=0 only (so a reader speaks T=0 to it and the 61xx answers are what
it expects); an ATR that contradicts ``t0`` is refused, in a profile and in an image. The last
test serves a T=0 image through a real pcscd + vpcd and checks the protocol negotiated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import demo_image, with_balance
from plain import FIXTURES

from svcard.card.image import ImageError, card_from_image, save_new_image
from svcard.card.personalise import ProfileError, image_from_profile
from svcard.card.runtime import DEFAULT_ATR, atr_protocols, check_atr

T0_ATR = bytes.fromhex("3B085356434152443031")   # TS, T0 = 08 (no TD1: T=0), "SVCARD01"


def profile(tmp_path: Path, *lines: str) -> Path:
    issuer = f'issuer = "{(FIXTURES / "demo-issuer.toml").as_posix()}"'
    text = (FIXTURES / "iep-demo.toml").read_text()
    path = tmp_path / "card.toml"
    path.write_text(text.replace('issuer = "demo-issuer.toml"', "\n".join((issuer, *lines))))
    return path


def test_atr_protocols() -> None:
    assert atr_protocols(DEFAULT_ATR) == (0, 1)           # TD1 says T=0, TD2 T=1
    assert atr_protocols(T0_ATR) == (0,)
    assert atr_protocols(bytes.fromhex("3B02 1450")) == (0,)
    assert atr_protocols(bytes.fromhex("3B810053")) == (0,)        # TD1 announcing T=0 only
    assert atr_protocols(bytes.fromhex("3BF81300008131FE45")[:9]) == (1,)
    with pytest.raises(ValueError, match="TS"):
        atr_protocols(bytes.fromhex("3A00"))
    with pytest.raises(ValueError, match="interface bytes"):
        atr_protocols(bytes.fromhex("3B80"))


def test_a_t0_profile_gets_an_atr_offering_t0_only(tmp_path: Path) -> None:
    image = image_from_profile(profile(tmp_path, "t0 = true"))
    assert bytes.fromhex(image["atr"]) == T0_ATR and image["t0"] is True
    card = card_from_image(image)
    assert card.reset() == T0_ATR
    # the T=0 card answers a case 4 command with 61xx, as a T=0 reader expects
    out = card.transmit(bytes.fromhex("00A4040009F0535643415244010100"))
    assert out[:1] == b"\x61"
    # a T=1 profile keeps svcard's T=1 ATR
    assert bytes.fromhex(image_from_profile(profile(tmp_path))["atr"]) == DEFAULT_ATR


def test_a_user_atr_that_contradicts_t0_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"card\.toml: atr: t0 = true needs an ATR that "
                                           r"offers T=0 only, this one offers T=0, T=1"):
        image_from_profile(profile(tmp_path, "t0 = true", f'atr = "{DEFAULT_ATR.hex()}"'))
    with pytest.raises(ProfileError, match=r"atr: this ATR offers T=0 only: set t0 = true"):
        image_from_profile(profile(tmp_path, f'atr = "{T0_ATR.hex()}"'))
    ok = image_from_profile(profile(tmp_path, "t0 = true", 'atr = "3B021450"'))
    assert ok["atr"] == "3B021450"
    check_atr(bytes.fromhex("3B021450"), True)


def test_images_old_and_contradicting() -> None:
    # a T=0 image written when svcard's ATR offered T=1 too loads with the T=0 ATR
    old = demo_image("iep")
    old["t0"], old["atr"] = True, DEFAULT_ATR.hex().upper()
    assert card_from_image(old).atr == T0_ATR
    # an image with a user's ATR that contradicts its t0 is refused, naming the field
    bad = demo_image("iep")
    bad["t0"], bad["atr"] = True, "3B8180015300"             # offers T=0 and T=1
    with pytest.raises(ImageError, match=r"card image: atr: t0 = true needs"):
        card_from_image(bad)


@pytest.fixture(scope="module")
def pcscd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from pcsc_env import start_session_pcscd
    daemon = start_session_pcscd(tmp_path_factory.mktemp("pcscd"))
    yield daemon
    daemon.stop()


def test_pcscd_speaks_t0_to_a_t0_image(pcscd: object, tmp_path: Path) -> None:
    from pcsc_env import READER_0, Served
    from smartcard.scard import SCARD_PROTOCOL_T0

    from svcard.reader.pcsc import PcscReader

    image = with_balance(image_from_profile(profile(tmp_path, "t0 = true")), ep=1234)
    path = tmp_path / "t0.json"
    save_new_image(path, image)
    server = Served([path], pcscd.port)  # type: ignore[attr-defined]
    try:
        server.wait_present((READER_0,))
        reader = PcscReader(READER_0)
        assert reader.connect() == T0_ATR
        try:
            assert reader._protocol == SCARD_PROTOCOL_T0
            raw = reader._raw(bytes.fromhex("00A4040009F0535643415244010100"))
            assert raw[:1] == b"\x61"              # what a T=0 client expects
            assert reader.transmit(bytes.fromhex("00A4040009F05356434152440101"))[-2:] \
                == b"\x90\x00"
            assert reader.transmit(bytes.fromhex("805C000204")) == (1234).to_bytes(4, "big") \
                + b"\x90\x00"
        finally:
            reader.disconnect()
    finally:
        server.kill()
