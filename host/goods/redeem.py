"""The validator terminal (seed 000 claim 16, issue 12 point 4): a good on the card is used up
with ONE composite (CAPP) purchase, so its record and the fare move together or not at all.
(It lives beside the goods servers because host/terminal holds its 12 modules already; it uses
only the terminal's flows: host/terminal/capp.py.)

The validator reads the goods files (READ RECORD), picks the good the rider presents (by good
id, kind and issuer: :class:`Choice`), checks it against its own clock (status, validity dates,
rides left), and consumes it: INITIALIZE FOR CAPP PURCHASE of the fare, UPDATE CAPP DATA CACHE
with the good's record as it is after use (a ticket, coupon or voucher: status ``used``; a
transit token: one ride fewer), DEBIT FOR CAPP PURCHASE with the PSAM's MAC1. The card writes
the record and the debit in one image write (card/iep_commands/capp_purchase.py); the PSAM
records the redemption as a type-09 purchase, so it goes out in its batch to clearing.

The fare is 0 for a prepaid good (a ticket, a ride of a token bought beforehand): the card and
the PSAM take a 0-amount composite purchase as real ones do (a highway ETC entry station writes
its entry record with one), and it still counts the card's offline counter, logs a type-09
record and gives a TAC. A coupon takes its value off the fare (the fare must reach its minimum
spend). Every refusal comes before INITIALIZE, so nothing is written, debited or recorded:
:class:`Refused` names its reason (:data:`REASONS`).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...protocols import goods as G
from ...protocols import purse as P
from ...protocols import sw as SW
from ...reader.base import Reader
from ..terminal import apdus
from ..terminal.capp import (
    DEFAULT_GOODS_SFIS,
    CappReceipt,
    GoodsEntry,
    GoodsWrite,
    capp_purchase,
    read_goods,
)
from ..terminal.goods_key import GoodsKeyService
from ..terminal.journal import Journal
from ..terminal.money import Amount
from ..terminal.purse import (
    Declined,
    TerminalCheckFailed,
    held,
    prove,
    read_log_info,
    select_purse,
)

NO_SUCH_GOOD = "no such good"
EXPIRED = "expired"
NOT_YET_VALID = "not yet valid"
ALREADY_USED = "already used"
EMPTY_TOKEN = "empty token"
VOID = "void"
BELOW_MIN_SPEND = "fare below the coupon's minimum spend"
INSUFFICIENT = "insufficient balance for the fare"
REASONS = (NO_SUCH_GOOD, EXPIRED, NOT_YET_VALID, ALREADY_USED, EMPTY_TOKEN, VOID,
           BELOW_MIN_SPEND, INSUFFICIENT)
ID_SIZE = 8   # issuer_id and good_id


class Refused(TerminalCheckFailed):
    """The validator refused the good before anything was written: ``reason`` is one of
    :data:`REASONS`, the message names the good."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"redeem refused: {reason} ({detail})")
        self.reason = reason
        self.detail = detail

    def to_json(self) -> dict[str, Any]:
        return {"redeemed": False, "reason": self.reason, "detail": self.detail}


def parse_id(text: str, name: str) -> bytes:
    """An issuer or good id as typed: 1 to 16 hex digits, zero-padded on the left to 8 bytes
    (``--good 1`` is ``0000000000000001``); a ValueError naming ``name`` otherwise."""
    digits = text.strip()
    if not 1 <= len(digits) <= 2 * ID_SIZE or any(c not in "0123456789abcdefABCDEF"
                                                  for c in digits):
        raise ValueError(f"{name} {text[:40]!r}: 1 to {2 * ID_SIZE} hex digits")
    return bytes.fromhex(digits.rjust(2 * ID_SIZE, "0"))


@dataclass(frozen=True)
class Choice:
    """Which goods the rider presents: any of them that match every field given."""

    good_id: bytes | None = None
    kind: str | None = None
    issuer_id: bytes | None = None

    def matches(self, record: bytes) -> bool:
        return ((self.kind is None or record[0] == G.KINDS[self.kind])
                and (self.issuer_id is None or record[2:10] == self.issuer_id)
                and (self.good_id is None or record[10:18] == self.good_id))

    def text(self) -> str:
        parts = [f"kind {self.kind}" if self.kind else "",
                 f"issuer {self.issuer_id.hex().upper()}" if self.issuer_id else "",
                 f"good {self.good_id.hex().upper()}" if self.good_id else ""]
        return " ".join(p for p in parts if p) or "any good"


def _date(bcd: bytes) -> dt.date:
    return P.parse_bcd_date(bcd)


def _name(record: bytes) -> str:
    return (f"{G.KIND_OF_TAG[record[0]]} {record[10:18].hex().upper()} of issuer "
            f"{record[2:10].hex().upper()}")


def why_not(record: bytes, today: dt.date) -> str | None:
    """The reason a (well-formed) goods record cannot be used on ``today``, or None."""
    transit = record[0] == G.TAG_TRANSIT
    rides_left = int.from_bytes(record[26:28], "big") if transit else None
    status = record[1]
    if status == G.STATUS_VOID:
        return VOID
    if status == G.STATUS_USED:
        return EMPTY_TOKEN if rides_left == 0 else ALREADY_USED
    if status == G.STATUS_EXPIRED:
        return EXPIRED
    if today < _date(record[18:22]):
        return NOT_YET_VALID
    if today > _date(record[22:26]):
        return EXPIRED
    if rides_left == 0:
        return EMPTY_TOKEN
    return None


def pick(goods: Sequence[GoodsEntry], choice: Choice, today: dt.date) -> GoodsEntry:
    """The good to use: among those matching ``choice``, the usable one that expires first
    (then by file and record number). None usable: :class:`Refused`, with the reason of the
    first matching good, or ``no such good``. A damaged record never matches."""
    matching = []
    for entry in goods:
        try:
            G.check(entry.record)
        except G.GoodsRecordError:
            continue
        if choice.matches(entry.record):
            matching.append(entry)
    if not matching:
        raise Refused(NO_SUCH_GOOD, f"{choice.text()} is not on this card")
    usable = [e for e in matching if why_not(e.record, today) is None]
    if not usable:
        first = matching[0].record
        reason = why_not(first, today)
        assert reason is not None
        detail = f"{_name(first)}, valid {_date(first[18:22])}..{_date(first[22:26])}"
        if len(matching) > 1:
            detail += f"; {len(matching) - 1} other matching good(s) not usable either"
        raise Refused(reason, detail)
    return min(usable, key=lambda e: (e.record[22:26], e.sfi, e.record_number))


def used(record: bytes) -> bytes:
    """The record after one use: a transit token one ride fewer (still valid: ``rides_left``
    0 is an empty token), any other good ``used``."""
    fields = G.parse(record)
    kind = fields.pop("kind")
    for derived in ("tag", "status_name"):
        fields.pop(derived)
    if kind == "transit":
        fields["rides_left"] -= 1
    else:
        fields["status"] = G.STATUS_USED
    return G.build(kind, **fields)


def charge_for(record: bytes, fare: int) -> int:
    """What the card pays for ``fare`` with this good: a coupon takes its value off a fare
    that reaches its minimum spend; other goods are prepaid (the fare is charged as given)."""
    if record[0] != G.TAG_COUPON:
        return fare
    fields = G.parse(record)
    if fare < fields["min_spend"]:
        raise Refused(BELOW_MIN_SPEND, f"{_name(record)} needs a fare of at least "
                                       f"{fields['min_spend']} minor units, the fare is {fare}")
    return fare - min(fare, int(fields["value"]))


@dataclass(frozen=True)
class RedeemReceipt:
    sfi: int
    record_number: int
    before: bytes
    after: bytes
    fare: int
    payment: CappReceipt

    def to_json(self) -> dict[str, Any]:
        good = GoodsEntry(self.sfi, self.record_number, self.after).to_json()
        return {"redeemed": True, "good": good, "record_before": self.before.hex().upper(),
                "fare": self.fare, "charged": self.payment.amount,
                "purchase": self.payment.to_json()}

    def text(self) -> str:
        fields = G.parse(self.after)
        p = self.payment
        what = (f"ride taken, {fields['rides_left']} of {fields['rides_total']} left"
                if fields["kind"] == "transit" else "now used")
        return "\n".join([
            f"redeemed {_name(self.after)} (SFI {self.sfi:02X} record {self.record_number}): "
            f"{what}",
            f"  charged {p.money(p.amount)} (fare {p.money(self.fare)}), composite purchase "
            f"type 09", p.balance_line(),
            f"  terminal {p.terminal_id} txn {p.terminal_txn_number}, card counter "
            f"{p.offline_counter}  TAC {p.tac}"])


@dataclass(frozen=True)
class Finished:
    """A tap the validator journalled but never heard the end of (a lost answer, a power cut,
    the card pulled): the card shows the redemption went through, and nothing changed since.
    The rider passes; nothing new is charged or written."""

    sfi: int
    record_number: int
    after: bytes
    charged: int
    date: str
    time: str
    tac: str | None

    def to_json(self) -> dict[str, Any]:
        good = GoodsEntry(self.sfi, self.record_number, self.after).to_json()
        return {"redeemed": True, "finished_interrupted": True, "good": good,
                "charged": self.charged, "date": self.date, "time": self.time, "tac": self.tac}

    def text(self) -> str:
        return (f"redeemed {_name(self.after)} (SFI {self.sfi:02X} record "
                f"{self.record_number}): the interrupted tap of {self.date} {self.time} went "
                f"through; nothing new charged or written")


# a Declined at one of these steps means the card wrote nothing (its DEBIT never ran or refused)
_BEFORE_COMMIT = ("SELECT PSAM", "READ TERMINAL ID", "READ PSAM CURRENCY",
                  "INITIALIZE FOR CAPP PURCHASE", "UPDATE CAPP DATA CACHE", "INIT SAM FOR PURCHASE",
                  "DEBIT FOR CAPP PURCHASE", "SELECT purse")


def settle_interrupted(card: Reader, journal: Journal, serial: str,
                       aid: bytes = P.DEFAULT_IEP_AID) -> Finished | None:
    """Close this card's open redemptions in ``journal`` by what the card shows: one that
    landed (a type-09 log record of its amount, date and time) is ``done``, any other
    ``abandoned``. A landed one whose record is still as it left it is returned: the tap the
    rider is repeating, to be let through without a second ride."""
    entries = [e for e in journal.unfinished(serial) if e.get("flow") == "redeem"]
    if not entries:
        return None
    log = read_log_info(card, aid)[1]
    finished = None
    for e in entries:
        landed = [x for x in log if x.txn_type == P.TYPE_COMPOSITE_PURCHASE
                  and x.amount == e["charged"] and (x.date, x.time) == (e["date"], e["time"])]
        if not landed:
            journal.write(e["txn_id"], "abandoned", reason="not on the card")
            continue
        proof = prove(card, P.TYPE_COMPOSITE_PURCHASE, landed[0].counter)
        tac = proof[1].hex().upper() if proof else None
        journal.write(e["txn_id"], "done", finished_later=True, tac=tac)
        answer = card.exchange(apdus.read_goods_record(e["record_number"], e["sfi"]))
        if answer.ok and answer.data.hex().upper() == e["after"]:
            finished = Finished(e["sfi"], e["record_number"], answer.data, e["charged"],
                                e["date"], e["time"], tac)
    return finished


@held
def redeem(card: Reader, psam: Reader, choice: Choice, fare: int | Amount = 0, *,
           key_index: int = 1, when: dt.datetime | None = None,
           card_aid: bytes = P.DEFAULT_IEP_AID, psam_aid: bytes = P.DEFAULT_PSAM_AID,
           sfis: Sequence[int] = DEFAULT_GOODS_SFIS,
           journal: Journal | None = None,
           goods_keys: GoodsKeyService | None = None) -> RedeemReceipt | Finished:
    """Use one good the card holds (``choice``), paying ``fare`` (minor units or an
    :class:`Amount`, placed by the card's exponent) in the same composite purchase. Card and
    PSAM are held for the whole of it. :class:`Refused` before anything is written.

    With a ``journal``, each tap is journalled before the card is written, and the card's next
    tap first settles the open ones (:func:`settle_interrupted`): a repeated tap whose first
    one went through is :class:`Finished`, not a second ride. ``goods_keys``, the goods key
    service of the card's issuer, MACs the record (``84 DE``, what a card takes by default);
    without it the plain ``80 DC`` goes, for a card with ``capp_plain_update``."""
    when = when or dt.datetime.now()
    info = select_purse(card, card_aid)
    info.check_dates(when.date())
    fare_minor = info.minor_units(fare)
    if journal is not None:
        finished = settle_interrupted(card, journal, info.app_serial, card_aid)
        if finished is not None:
            return finished
    entry = pick(read_goods(card, card_aid, sfis), choice, when.date())
    charged = charge_for(entry.record, fare_minor)
    after = used(entry.record)
    write = GoodsWrite(entry.sfi, after, entry.record_number)
    txn = f"redeem-{info.app_serial}-{os.urandom(6).hex()}"
    if journal is not None:
        journal.write(txn, "redeem-sent", flow="redeem", card_serial=info.app_serial,
                      sfi=entry.sfi, record_number=entry.record_number,
                      before=entry.record.hex().upper(), after=after.hex().upper(),
                      fare=fare_minor, charged=charged, date=P.bcd_date(when.date()).hex(),
                      time=P.bcd_time(when).hex())
    try:
        receipt = capp_purchase(card, psam, charged, [write], key_index=key_index, when=when,
                                card_aid=card_aid, psam_aid=psam_aid, goods_keys=goods_keys)
    except (Declined, TerminalCheckFailed) as exc:
        step = getattr(exc, "step", "")
        if journal is not None and (not step or step.startswith(_BEFORE_COMMIT)):
            journal.write(txn, "abandoned", reason=str(exc))   # the card wrote nothing
        if step == "INITIALIZE FOR CAPP PURCHASE" and getattr(exc, "sw", 0) == \
                SW.INSUFFICIENT_FUNDS:
            raise Refused(INSUFFICIENT, f"{_name(entry.record)}: the card cannot pay "
                                        f"{info.money(charged)}") from None
        raise
    if journal is not None:
        journal.write(txn, "done", tac=receipt.tac, counter=receipt.offline_counter)
    return RedeemReceipt(entry.sfi, entry.record_number, entry.record, after, fare_minor,
                         receipt)
