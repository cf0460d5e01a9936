"""Loyalty points at the local terminal (seed 002 FIG. 16): a programme's ADF on the card beside
a PSAM or load HSM holding the programme's keys.

A programme is a purse of points at its own AID (card/loyalty.py); the terminal flows are the
purse's own (:func:`~.purse.load`, :func:`~.purse.purchase`) aimed at that AID, after checks
that keep points and money apart: the selected application must state currency 999 (ISO 4217
``XXX``, "no currency") with exponent 0, and the PSAM redeeming points must be a points PSAM
(:func:`~.purse.purchase` compares the two currencies). Amounts are :class:`Points`: a count
of one programme's points, never added to money nor to another programme's points.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from ...protocols import purse as P
from ...reader import Reader
from . import apdus
from . import purse as T
from .money import POINTS

PROGRAMME_AID_PREFIX = bytes.fromhex("F053564341524404")   # svcard's examples: prefix + NN
MAX_POINTS = 0xFFFFFFFF


@dataclass(frozen=True, order=True)
class Points:
    """A count of one programme's points; the programme is its issuer id (EF 0x15), as the
    PSAM records, clearing and the audit see it."""

    programme: str
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.count <= MAX_POINTS:
            raise ValueError(f"points are 0..{MAX_POINTS}, got {self.count}")

    def _same(self, other: object) -> Points:
        if not isinstance(other, Points):
            raise TypeError("points are added only to points (never to money)")
        if other.programme != self.programme:
            raise TypeError(f"points of programme {self.programme} and {other.programme} "
                            "are never mixed")
        return other

    def __add__(self, other: object) -> Points:
        return Points(self.programme, self.count + self._same(other).count)

    def __sub__(self, other: object) -> Points:
        return Points(self.programme, self.count - self._same(other).count)

    def __str__(self) -> str:
        return f"{self.count} pts"


@dataclass(frozen=True)
class ProgrammeInfo:
    """A programme as the terminal reads it from its ADF."""

    card: T.CardInfo

    @property
    def programme(self) -> str:
        return self.card.issuer_id

    @property
    def label(self) -> str:
        return self.card.label

    def points(self, count: int) -> Points:
        return Points(self.programme, count)


def select_programme(card: Reader, aid: bytes) -> ProgrammeInfo:
    """SELECT the programme at ``aid``: :class:`~.purse.NoPurse` if the card lacks it,
    :class:`~.purse.TerminalCheckFailed` if the application there is not one of points."""
    info = T.select_purse(card, aid)
    if info.currency_code != POINTS or info.currency_exponent not in (None, 0):
        raise T.TerminalCheckFailed(
            f"{aid.hex().upper()} is not a loyalty programme (it states currency "
            f"{info.currency_code}, not {POINTS} = points): points and money are never mixed")
    return ProgrammeInfo(info)


def points_balance(card: Reader, aid: bytes) -> tuple[ProgrammeInfo, Points]:
    with card.transaction():
        info = select_programme(card, aid)
        raw = T.call(card, apdus.get_balance(P.PURSE_EP), "GET BALANCE")
    return info, info.points(int.from_bytes(raw, "big"))


def points_log(card: Reader, aid: bytes) -> tuple[ProgrammeInfo, list[T.LogEntry]]:
    with card.transaction():
        info = select_programme(card, aid)
        return info, T.read_log_info(card, aid)[1]


def load_points(card: Reader, hsm: Reader, count: int, aid: bytes, *, terminal_id: bytes,
                key_index: int = 1, when: dt.datetime | None = None,
                hsm_aid: bytes = P.DEFAULT_HSM_AID) -> T.LoadReceipt:
    """Load ``count`` points onto the programme at ``aid`` with a load HSM that holds the
    programme's keys (the purse's load flow, unchanged)."""
    with card.transaction():
        select_programme(card, aid)
        return T.load(card, hsm, count, terminal_id=terminal_id, purse=P.PURSE_EP,
                      key_index=key_index, when=when, card_aid=aid, hsm_aid=hsm_aid)


def redeem_points(card: Reader, psam: Reader, count: int, aid: bytes, *, key_index: int = 1,
                  when: dt.datetime | None = None,
                  psam_aid: bytes = P.DEFAULT_PSAM_AID) -> T.PurchaseReceipt:
    """Redeem ``count`` points from the programme at ``aid`` with a points PSAM holding the
    programme's purchase keys (the purse's purchase flow, unchanged)."""
    with card.transaction():
        select_programme(card, aid)
        return T.purchase(card, psam, count, purse=P.PURSE_EP, key_index=key_index, when=when,
                          card_aid=aid, psam_aid=psam_aid)


# --- a card image's programmes, for ``svcard card show`` ------------------------------------

def describe_programmes(image: dict[str, Any]) -> list[dict[str, Any]]:
    """The programmes a purse card image holds: id, AID, label, issuer id, points, limit,
    counters and the decoded log (never a key)."""
    out = []
    for entry in image.get("loyalty") or []:
        public = P.PublicAppData.parse(bytes.fromhex(entry["public_data"]))
        ep = entry["ep"]
        out.append({
            "programme": entry["programme"], "aid": entry["aid"], "label": entry["label"],
            "issuer_id": public.issuer_id.hex().upper(), "points": ep["balance"],
            "balance_limit": entry["balance_limit"], "online_counter": ep["online_counter"],
            "offline_counter": ep["offline_counter"],
            "log": [T.LogEntry.from_record(bytes.fromhex(r)).__dict__
                    for r in entry.get("log", [])]})
    return out


def programme_lines(programmes: list[dict[str, Any]]) -> list[str]:
    lines = [f"  loyalty programmes ({len(programmes)}):"]
    for p in programmes:
        lines.append(f"    {p['programme']} ({p['label']}) AID {p['aid']} issuer "
                     f"{p['issuer_id']}: {p['points']} pts (limit {p['balance_limit']}), "
                     f"online counter {p['online_counter']}, offline counter "
                     f"{p['offline_counter']}")
        lines += [f"      {e['date']} {e['time']}  {e['type_name']:<14} {e['amount']:>10} pts"
                  f"  counter {e['counter']}  terminal {e['terminal_id']}" for e in p["log"]]
    return lines
