"""Review R-12 of issue 12 (goods files, composite purchase, secure-messaging writes, loyalty
points), as an attacker and as a card engineer: each test here failed on the code before its
fix (see the commit that adds it)."""

from __future__ import annotations

from pathlib import Path

from rawhost import DEMO_SERIAL
from test_capp import CappHost, update_cache
from test_secure_write import challenge, goods_of, image, service  # noqa: F401 (fixture)

from svcard.card.image import card_from_image
from svcard.host.terminal.goods_key import GoodsKeyService
from svcard.protocols import goods as G

TICKETS, TRANSIT = 0x11, 0x13
ISSUER = bytes.fromhex("2000000000000002")


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
    the good as it is after use, by record number."""
    host.capp(0, [update_cache(sfi, number, after)])


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
