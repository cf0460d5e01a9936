"""The host side of secure-messaging goods writes: the key service that holds the goods key
and MACs a record write for one card, and the device's part (GET CHALLENGE, then relay).

The fulfilment server of seed 000 keeps a :class:`GoodsKeyService` (built from the issuer
file's ``[goods_key]`` master key, or from one card's own key); it diversifies the card's goods
key from the application serial exactly as personalisation did, and answers the APDU to send
for a challenge the card gave. The device only relays: :func:`write_good` asks the card for a
challenge, has the service build the write, and sends it. The card checks the MAC (see
``card/iep_commands/secure_write.py`` and docs/protocol.md, "Goods by secure messaging").

Keys never leave this object: its ``repr`` names the key's index and version only, and no
error message here contains key bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ...card.iep_commands import secure_write as SM
from ...card.keys import KeyEntry
from ...card.personalise import Issuer
from ...protocols import crypto
from ...protocols import goods as G
from ...reader import Reader
from . import apdus
from .purse import call


@dataclass(frozen=True)
class GoodsKeyService:
    """The goods key of an issuer (a master key, diversified per card) or of one card."""

    key: KeyEntry = field(repr=False)
    issuer_id: bytes | None = None   # two-level diversification: first by the issuer id
    per_card: bool = True            # False: ``key`` is already the card's own key

    def __repr__(self) -> str:
        return (f"GoodsKeyService(index={self.key.index}, version={self.key.version}, "
                f"per_card={self.per_card})")

    @classmethod
    def from_issuer(cls, issuer: Issuer) -> GoodsKeyService:
        """The service for an issuer file's ``[goods_key]`` (ValueError if it has none)."""
        if issuer.goods is None:
            raise ValueError("the issuer file has no [goods_key]")
        return cls(issuer.goods, issuer.issuer_id if issuer.two_level else None)

    @classmethod
    def for_card(cls, key: KeyEntry) -> GoodsKeyService:
        """The service for one card's own goods key (explicit card keys)."""
        return cls(key, per_card=False)

    def card_key(self, app_serial: bytes) -> bytes:
        if not self.per_card:
            return self.key.key
        return crypto.card_key(self.key.key, app_serial, self.issuer_id)

    def mac(self, app_serial: bytes, challenge: bytes, ins: int, p1: int, p2: int,
            record: bytes) -> bytes:
        """The MAC the card expects for this write after answering ``challenge``."""
        command = crypto.secure_messaging_input(SM.CLA_SM, ins, p1, p2, record)
        return crypto.secure_messaging_mac(self.card_key(app_serial), challenge, command)

    def update_record(self, app_serial: bytes, challenge: bytes, sfi: int, record: bytes, *,
                      record_no: int | None = None) -> bytes:
        """UPDATE RECORD ``04 DC`` into record ``record_no``; with None, in tag mode (P1 = the
        record's tag: the card rewrites the record of the same good, or takes the first empty
        one)."""
        p1, mode = (record_no, G.MODE_RECORD) if record_no is not None else (record[0],
                                                                              G.MODE_TAG)
        p2 = _p2(sfi, mode)
        mac = self.mac(app_serial, challenge, SM.INS_UPDATE_RECORD, p1, p2, record)
        return apdus.secure_record_write(SM.INS_UPDATE_RECORD, p1, p2, record, mac)

    def append_record(self, app_serial: bytes, challenge: bytes, sfi: int,
                      record: bytes) -> bytes:
        """APPEND RECORD ``04 E2``: into the file's first empty record."""
        p2 = _p2(sfi, 0)
        mac = self.mac(app_serial, challenge, SM.INS_APPEND_RECORD, 0, p2, record)
        return apdus.secure_record_write(SM.INS_APPEND_RECORD, 0, p2, record, mac)

    def capp_update(self, app_serial: bytes, random: bytes, counter: int, sfi: int,
                    record: bytes, *, record_no: int | None = None) -> bytes:
        """UPDATE CAPP DATA CACHE with secure messaging ``84 DE`` for the CAPP session that
        INITIALIZE FOR CAPP PURCHASE opened with ``random`` and offline ``counter``: into
        record ``record_no``, or by the record's tag with None. The card caches it only in
        that session and only if the MAC is this card's goods key's."""
        p1, mode = (record_no, G.MODE_RECORD) if record_no is not None else (record[0],
                                                                              G.MODE_TAG)
        mac = crypto.capp_update_mac(self.card_key(app_serial), random, counter, p1,
                                     _p2(sfi, mode), record)
        return apdus.update_capp_data_cache_sm(sfi, p1, record, mac, mode)


def _p2(sfi: int, mode: int) -> int:
    if not 1 <= sfi <= 30:
        raise ValueError(f"an SFI is 1..30, got {sfi}")
    return sfi << 3 | mode


WriteBuilder = Callable[[bytes], bytes]   # the card's challenge -> the APDU to send


def write_good(card: Reader, build: WriteBuilder, *, challenge_size: int = 4) -> None:
    """The device's part: GET CHALLENGE, then the write ``build`` makes for that challenge
    (e.g. ``lambda c: service.append_record(serial, c, 0x11, record)``, or a server's answer).
    The card must be selected on the purse; nothing may come between the two commands.
    Raises :class:`~svcard.host.terminal.purse.Declined` with the card's status word."""
    challenge = call(card, apdus.get_challenge(challenge_size), "GET CHALLENGE")
    apdu = build(challenge)
    call(card, apdu, "UPDATE RECORD" if apdu[1] == SM.INS_UPDATE_RECORD else "APPEND RECORD")
