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
from pathlib import Path
from typing import Any

import click

from ...protocols import purse as P
from ...reader import Reader
from ..kit.command_line import EXIT_USAGE, F, emit, fail, json_option
from . import apdus
from . import purse as T
from .card_commands import AID_BYTES, at_option, handled, readers, trace_option
from .money import POINTS

PROGRAMME_AID_PREFIX = bytes.fromhex("F053564341524404")   # svcard's examples: prefix + NN
MAX_POINTS = 0xFFFFFFFF


@dataclass(frozen=True)
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
    try:
        info = T.select_purse(card, aid)
    except T.NoPurse as exc:
        raise T.Declined(exc.step, exc.sw, f"no loyalty programme {aid.hex().upper()} on this "
                         f"card (SELECT answered {exc.sw:04X}): nothing was written") from None
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


# --- ``svcard terminal points``: the local terminal's commands for points ---------------------

def _programme_option(f: F) -> F:
    with_aid = click.option(
        "--programme", "aid", required=True, metavar="AID", callback=_aid,
        help="AID of the loyalty programme's application on the card (5 to 16 bytes of hex), "
             "e.g. F05356434152440401.")(f)
    return click.option("--card", "card_spec", required=True, metavar="SPEC",
                        help="Reader spec of the purse card, e.g. virtual:card.json.")(with_aid)


def _aid(ctx: click.Context, param: click.Parameter, value: str) -> bytes:
    """``--programme AID``: 5 to 16 bytes of hex, else a one-line usage error (exit 2)."""
    try:
        aid = bytes.fromhex(value.replace(" ", "").replace(":", ""))
    except ValueError:
        aid = b""
    if not AID_BYTES[0] <= len(aid) <= AID_BYTES[1]:
        fail(f"--programme {value[:40]!r}: an AID is {AID_BYTES[0]} to {AID_BYTES[1]} bytes "
             "of hex, e.g. F05356434152440401", EXIT_USAGE)
    return aid


_count_option = click.option("--points", "count", required=True, metavar="N",
                             type=click.IntRange(1, MAX_POINTS),
                             help="How many points (a whole number).")
_key_index_option = click.option("--key-index", default=1, show_default=True,
                                 type=click.IntRange(0, 255))


@click.group("points")
def points_commands() -> None:
    """Loyalty points (seed 002 FIG. 16): a programme's application on the card, beside a
    load HSM or PSAM that holds the programme's keys."""


@points_commands.command("balance")
@_programme_option
@json_option
@trace_option
def points_balance_command(card_spec: str, aid: bytes, as_json: bool,
                           trace_out: Path | None) -> None:
    """The programme's points (GET BALANCE)."""
    with handled(), readers(("card", card_spec), trace_out=trace_out) as (card_r,):
        info, points = points_balance(card_r, aid)
    emit(as_json, {"programme": info.programme, "label": info.label, "aid": aid.hex().upper(),
                   "points": points.count, "card_serial": info.card.app_serial},
         f"{info.label}: {points} (programme {info.programme}, card {info.card.app_serial})")


@points_commands.command("log")
@_programme_option
@json_option
@trace_option
def points_log_command(card_spec: str, aid: bytes, as_json: bool,
                       trace_out: Path | None) -> None:
    """The programme's log (READ RECORD, newest first)."""
    with handled(), readers(("card", card_spec), trace_out=trace_out) as (card_r,):
        _, entries = points_log(card_r, aid)
    lines = [f"{e.date} {e.time}  {e.type_name:<14} {e.amount:>10} pts  counter {e.counter:<5} "
             f"terminal {e.terminal_id}" for e in entries] or ["(empty log)"]
    emit(as_json, [e.__dict__ for e in entries], "\n".join(lines))


@points_commands.command("load")
@_programme_option
@click.option("--hsm", "hsm_spec", required=True, metavar="SPEC",
              help="Reader spec of a load HSM holding the programme's keys.")
@_count_option
@click.option("--terminal-id", default="000000000001", show_default=True,
              help="The loading terminal's 6-byte id, hex.")
@_key_index_option
@json_option
@trace_option
@at_option
def points_load_command(card_spec: str, aid: bytes, hsm_spec: str, count: int,
                        terminal_id: str, key_index: int, as_json: bool,
                        trace_out: Path | None, at: dt.datetime | None) -> None:
    """Load points onto the programme: S1 from the card, S2 from the HSM, S3 checked."""
    try:
        tid = bytes.fromhex(terminal_id)
    except ValueError:
        fail("--terminal-id must be hex", EXIT_USAGE)
    with handled(), readers(("card", card_spec), ("hsm", hsm_spec),
                            trace_out=trace_out) as (card_r, hsm_r):
        r = load_points(card_r, hsm_r, count, aid, terminal_id=tid, key_index=key_index,
                        when=at)
    emit(as_json, r.to_json(), r.text())


@points_commands.command("redeem")
@_programme_option
@click.option("--psam", "psam_spec", required=True, metavar="SPEC",
              help="Reader spec of a points PSAM holding the programme's purchase keys.")
@_count_option
@_key_index_option
@json_option
@trace_option
@at_option
def points_redeem_command(card_spec: str, aid: bytes, psam_spec: str, count: int,
                          key_index: int, as_json: bool, trace_out: Path | None,
                          at: dt.datetime | None) -> None:
    """Redeem points from the programme: MAC1 from the PSAM, MAC2 checked by it, the PSAM
    records the redemption for clearing."""
    with handled(), readers(("card", card_spec), ("psam", psam_spec),
                            trace_out=trace_out) as (card_r, psam_r):
        r = redeem_points(card_r, psam_r, count, aid, key_index=key_index, when=at)
    emit(as_json, r.to_json(), r.text())
