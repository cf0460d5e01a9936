"""The terminal's composite (CAPP) purchase: goods records written onto the card together with
a debit of its EP, in one session (PBOC 复合消费, transaction type 09), and reading the goods a
card holds.

The flow is a purchase (:func:`svcard.host.terminal.purse.purchase`) with two differences:
INITIALIZE FOR CAPP PURCHASE (``80 50 03 02``) opens the session, and one UPDATE CAPP DATA
CACHE per record comes between it and DEBIT (``84 DE`` with a MAC under the card's goods key
bound to the session, from the issuer's :class:`GoodsKeyService`; the plain ``80 DC`` only for
a card whose profile still takes it); the PSAM makes MAC1 for type 09 and
records the purchase as it does any other. The card writes the records and the debit in one
image write, or neither (card/iep_commands/capp_purchase.py). A record is given as
``SFI:HEX`` (written by its tag: the record of the same good, else the first empty record) or
``SFI:N:HEX`` (record number N); layouts in protocols/goods.py and docs/protocol.md.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from ...protocols import goods as G
from ...protocols import purse as P
from ...protocols import sw as SW
from ...reader.base import Reader
from . import apdus
from .goods_key import GoodsKeyService
from .money import Amount
from .purse import (
    Declined,
    PurchaseReceipt,
    TerminalCheckFailed,
    call,
    card_uid,
    held,
    select_purse,
)

DEFAULT_GOODS_SFIS = (0x11, 0x12, 0x13, 0x14)


@dataclass(frozen=True)
class GoodsWrite:
    """One record for the CAPP cache: by tag (``number`` None) or by record number."""

    sfi: int
    record: bytes
    number: int | None = None

    @classmethod
    def parse(cls, text: str) -> GoodsWrite:
        """``SFI:HEX`` or ``SFI:N:HEX`` (SFI in hex, N decimal); a bad one is a
        :class:`TerminalCheckFailed` naming the part that is wrong."""
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise TerminalCheckFailed(f"--record {text!r}: expected SFI:HEX or SFI:N:HEX")
        try:
            sfi = int(parts[0], 16)
        except ValueError:
            raise TerminalCheckFailed(f"--record: SFI {parts[0]!r} is not hex") from None
        if not 1 <= sfi <= 30:
            raise TerminalCheckFailed(f"--record: SFI {sfi:02X} is not 01..1E")
        number = None
        if len(parts) == 3:
            if not parts[1].isdigit() or not 1 <= int(parts[1]) <= 254:
                raise TerminalCheckFailed(f"--record: record number {parts[1]!r} is not "
                                          "1..254")
            number = int(parts[1])
        try:
            record = bytes.fromhex(parts[-1])
        except ValueError:
            raise TerminalCheckFailed("--record: the record is not hex") from None
        try:
            G.check(record)
        except G.GoodsRecordError as exc:
            raise TerminalCheckFailed(f"--record: {exc}") from None
        return cls(sfi, record, number)

    def apdu(self, keys: GoodsKeyService | None = None, app_serial: bytes = b"",
             random: bytes = b"", counter: int = 0) -> bytes:
        """``84 DE`` with the MAC ``keys`` make for this card's CAPP session (its serial, the
        random and counter INITIALIZE answered); without keys, the plain ``80 DC``."""
        if keys is not None:
            return keys.capp_update(app_serial, random, counter, self.sfi, self.record,
                                    record_no=self.number)
        if self.number is None:
            return apdus.update_capp_data_cache(self.sfi, self.record[0], self.record,
                                                G.MODE_TAG)
        return apdus.update_capp_data_cache(self.sfi, self.number, self.record)

    def to_json(self) -> dict[str, Any]:
        return {"sfi": self.sfi, "record_number": self.number,
                "record": self.record.hex().upper(), **_good_fields(self.record)}


@dataclass(frozen=True, kw_only=True)
class CappReceipt(PurchaseReceipt):
    goods: tuple[GoodsWrite, ...]   # decoded only when shown

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "goods"}
        return {**out, "goods": [w.to_json() for w in self.goods]}

    def text(self) -> str:
        goods = [w.to_json() for w in self.goods]
        lines = [f"composite purchase of {self.money(self.amount)} approved, "
                 f"{len(goods)} goods record(s) written with it",
                 self.balance_line()]
        lines += [f"  SFI {g['sfi']:02X} "
                  f"{'record ' + str(g['record_number']) if g['record_number'] else 'by tag'}: "
                  f"{good_line(g)}" for g in goods]
        lines.append(f"  terminal {self.terminal_id} txn {self.terminal_txn_number}, card "
                     f"counter {self.offline_counter}\n  MAC1 {self.mac1}  MAC2 {self.mac2}  "
                     f"TAC {self.tac}")
        return "\n".join(lines)


@held
def capp_purchase(card: Reader, psam: Reader, amount: int | Amount,
                  records: Sequence[GoodsWrite], *, key_index: int = 1,
                  when: dt.datetime | None = None, card_aid: bytes = P.DEFAULT_IEP_AID,
                  psam_aid: bytes = P.DEFAULT_PSAM_AID,
                  issuer_factor: bool = False,
                  goods_keys: GoodsKeyService | None = None) -> CappReceipt:
    """Pay ``amount`` from the EP and write ``records`` onto the card in the same step. With
    ``goods_keys`` (the goods key service of the card's issuer) each record goes as the MAC'd
    ``84 DE``, which a card takes by default; without, as the plain ``80 DC``, which only a
    card with ``capp_plain_update`` takes."""
    if isinstance(amount, int) and not 0 <= amount <= 0xFFFFFFFF:
        raise TerminalCheckFailed("an amount is 0..4294967295 minor units")
    when = when or dt.datetime.now()
    date, time = P.bcd_date(when.date()), P.bcd_time(when)
    info = select_purse(card, card_aid)          # 1. the card, checked
    minor = info.minor_units(amount)
    info.check_dates(when.date())
    psam_fci = P.Fci.parse(call(psam, apdus.select(psam_aid), "SELECT PSAM"))   # 2. the PSAM
    terminal_id = call(psam, apdus.read_binary(P.SFI_PSAM_TERMINAL_ID, 6), "READ TERMINAL ID")
    currency = psam_fci.currency_code
    if currency is None:
        currency = P.PsamCurrency.parse(call(psam, apdus.read_binary(P.SFI_PSAM_CURRENCY, 3),
                                             "READ PSAM CURRENCY")).currency_code
    if info.currency_code not in (None, currency):
        raise TerminalCheckFailed(f"card currency {info.currency_code} is not the terminal's "
                                  f"{currency}")
    uid = card_uid(card)   # before INITIALIZE: any other command would end its session
    # 3. INITIALIZE FOR CAPP PURCHASE, then the records into the card's cache
    init = P.InitForPurchaseAnswer.parse(call(
        card, apdus.initialize(G.INIT_CAPP_PURCHASE, P.PURSE_EP, key_index, minor,
                               terminal_id), "INITIALIZE FOR CAPP PURCHASE"))
    for n, write in enumerate(records):
        step = f"UPDATE CAPP DATA CACHE ({n + 1} of {len(records)})"
        answer = card.exchange(write.apdu(goods_keys, info.serial_bytes, init.random,
                                          init.offline_counter))
        if answer.sw == SW.SECURITY_STATUS and goods_keys is None:
            raise Declined(step, answer.sw, f"{step}: {answer.sw:04X} (the card takes goods "
                           "records only MAC'd under its goods key: give the issuer's goods "
                           "key, --goods-issuer FILE)")
        if not answer.ok:
            raise Declined(step, answer.sw)
    # 4. the PSAM: MAC1 for type 09
    sam = P.InitSamAnswer.parse(call(psam, apdus.init_sam_for_purchase({
        "random": init.random, "offline_counter": init.offline_counter, "amount": minor,
        "txn_type": P.TYPE_COMPOSITE_PURCHASE, "date": date, "time": time,
        "key_version": init.key_version, "algorithm_id": init.algorithm_id,
        "card_serial": info.serial_bytes[-8:]},
        issuer_id=bytes.fromhex(info.issuer_id) if issuer_factor else None, uid=uid),
        "INIT SAM FOR PURCHASE"))
    # 5. DEBIT FOR CAPP PURCHASE: records and debit together; TAC and MAC2
    debit = P.DebitForPurchaseAnswer.parse(call(
        card, apdus.debit_for_purchase(sam.terminal_txn_number, date, time, sam.mac1),
        "DEBIT FOR CAPP PURCHASE"))
    # 6. the PSAM checks MAC2 and records the purchase for clearing
    call(psam, apdus.credit_sam_for_purchase(debit.mac2, debit.tac), "CREDIT SAM FOR PURCHASE")
    return CappReceipt(
        card_serial=info.app_serial, issuer_id=info.issuer_id, purse="EP",
        txn_type=P.TYPE_COMPOSITE_PURCHASE, amount=minor, balance_before=init.balance,
        balance_after=init.balance - minor, offline_counter=init.offline_counter,
        terminal_id=terminal_id.hex().upper(), terminal_txn_number=sam.terminal_txn_number,
        date=date.hex(), time=time.hex(), mac1=sam.mac1.hex().upper(),
        mac2=debit.mac2.hex().upper(), tac=debit.tac.hex().upper(),
        currency_code=info.currency_code, currency_exponent=info.currency_exponent,
        goods=tuple(records))


# --- reading and showing goods ----------------------------------------------------------------
@dataclass(frozen=True)
class GoodsEntry:
    sfi: int
    record_number: int
    record: bytes

    def to_json(self) -> dict[str, Any]:
        return {"sfi": self.sfi, "record_number": self.record_number,
                "record": self.record.hex().upper(), **_good_fields(self.record)}


def read_goods(card: Reader, aid: bytes = P.DEFAULT_IEP_AID,
               sfis: Sequence[int] = DEFAULT_GOODS_SFIS) -> list[GoodsEntry]:
    """Every goods record the card holds in files ``sfis`` (READ RECORD 1.. until 6A83; a file
    the card lacks, 6A82, is skipped; empty records are left out)."""
    select_purse(card, aid)
    out: list[GoodsEntry] = []
    for sfi in sfis:
        for number in range(1, 255):
            answer = card.exchange(apdus.read_goods_record(number, sfi))
            if answer.sw in (SW.RECORD_NOT_FOUND, SW.FILE_NOT_FOUND):
                break
            if not answer.ok:
                raise TerminalCheckFailed(f"READ RECORD {number} of SFI {sfi:02X}: "
                                          f"{answer.sw:04X} ({SW.meaning(answer.sw)})")
            if answer.data and not G.is_empty(answer.data):
                out.append(GoodsEntry(sfi, number, answer.data))
    return out


def _good_fields(record: bytes) -> dict[str, Any]:
    """A goods record's fields as JSON (bytes as hex); a record off its layout: ``error``."""
    try:
        fields = G.parse(record)
    except G.GoodsRecordError as exc:
        return {"error": str(exc)}
    return {k: v.hex().upper() if isinstance(v, bytes) else v for k, v in fields.items()}


def describe_goods(app: dict[str, Any]) -> list[dict[str, Any]]:
    """The goods a card image's ``app`` holds (``app.goods``), as JSON: sfi, record number and
    the record's fields."""
    out = []
    for f in (app.get("goods") or {}).get("files", []):
        for n, raw in sorted((f.get("data") or {}).items(), key=lambda item: int(item[0])):
            out.append(GoodsEntry(int(f["sfi"]), int(n), bytes.fromhex(raw)).to_json())
    return out


def good_line(g: dict[str, Any]) -> str:
    """One good for a person: kind, status, issuer and id, validity, value or rides."""
    if "error" in g:
        return f"damaged record ({g['error']})"
    what = (f"{g['rides_left']}/{g['rides_total']} rides" if g["kind"] == "transit"
            else f"value {g['value']}")
    return (f"{g['kind']} {g['status_name']}  issuer {g['issuer_id']} good {g['good_id']}  "
            f"valid {g['valid_from']}..{g['valid_to']}  {what}")


def goods_lines(goods: list[dict[str, Any]]) -> list[str]:
    lines = [f"  goods ({len(goods)}):"]
    lines += [f"    SFI {g['sfi']:02X} record {g['record_number']}: {good_line(g)}"
              for g in goods]
    return lines
