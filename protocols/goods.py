"""Digital goods kept on the IEP card: the byte layout of one goods record (seed 000, claim 16).

A goods record is a fixed-length record (:data:`RECORD_SIZE` bytes, 40) in a record file of the
purse application. Its first byte is its *tag*, the kind of good (PBOC's record identifier, which
UPDATE CAPP DATA CACHE can address a record by); an all-zero record (tag ``00``) is an empty
slot. Every kind shares a 26-byte head and has a 14-byte body of its own:

==========  =====  =====================================================================
field       bytes  meaning
==========  =====  =====================================================================
tag         1      the kind: ``01`` ticket, ``02`` coupon, ``03`` transit token,
                   ``04`` voucher code (``00`` = empty record)
status      1      ``01`` valid, ``02`` used, ``03`` expired, ``04`` void
issuer_id   8      the merchant / issuer of the good
good_id     8      the good's id, unique per issuer
valid_from  4      BCD YYYYMMDD, first day of validity
valid_to    4      BCD YYYYMMDD, last day of validity
body        14     by kind, below
==========  =====  =====================================================================

Bodies (amounts are unsigned big-endian minor units of the purse's currency):

- ticket: ``value`` 4 (the price paid), ``reference`` 8 (seat, event, booking), 2 reserved;
- coupon: ``value`` 4 (the discount), ``min_spend`` 4, 6 reserved;
- transit token: ``rides_left`` 2, ``rides_total`` 2, ``fare`` 4 (the value of one ride),
  6 reserved;
- voucher code: ``value`` 4 (prepaid airtime / utility credit / gift certificate), ``code``
  10 (the code to redeem, BCD or binary as its issuer says).

Reserved bytes are zero. This module imports nothing of svcard but :mod:`.purse` (its fast
layout codec and BCD date check).
"""

from __future__ import annotations

from typing import Any

from construct import Bytes, Int8ub, Int16ub, Int32ub, Struct

from .purse import FastLayout, valid_date

RECORD_SIZE = 40
HEAD_SIZE = 26
EMPTY = bytes(RECORD_SIZE)
GOOD_KEY = slice(2, 18)   # issuer_id and good_id: which good a record holds

TAG_EMPTY = 0x00
TAG_TICKET = 0x01
TAG_COUPON = 0x02
TAG_TRANSIT = 0x03
TAG_VOUCHER = 0x04

KINDS: dict[str, int] = {"ticket": TAG_TICKET, "coupon": TAG_COUPON,
                         "transit": TAG_TRANSIT, "voucher": TAG_VOUCHER}
KIND_OF_TAG: dict[int, str] = {tag: kind for kind, tag in KINDS.items()}

STATUS_VALID = 0x01
STATUS_USED = 0x02
STATUS_EXPIRED = 0x03
STATUS_VOID = 0x04
STATUS_NAMES: dict[int, str] = {STATUS_VALID: "valid", STATUS_USED: "used",
                                STATUS_EXPIRED: "expired", STATUS_VOID: "void"}

# the composite (CAPP) purchase: INITIALIZE FOR CAPP PURCHASE is 80 50 03 02, UPDATE CAPP DATA
# CACHE 80 DC P1 P2, DEBIT FOR CAPP PURCHASE 80 54 01 00 (transaction type 09)
INIT_CAPP_PURCHASE = 0x03
INS_UPDATE_CAPP_DATA_CACHE = 0xDC

# UPDATE CAPP DATA CACHE (80 DC) and the secure record writes: the low 3 bits of P2
MODE_TAG = 0b000      # P1 is a tag: the record of the same good, or the first empty one
MODE_RECORD = 0b100   # P1 is a record number, 1 the first


def _head() -> Any:
    return ("tag" / Int8ub, "status" / Int8ub, "issuer_id" / Bytes(8), "good_id" / Bytes(8),
            "valid_from" / Bytes(4), "valid_to" / Bytes(4))


TicketRecord = FastLayout("TicketRecord", Struct(
    *_head(), "value" / Int32ub, "reference" / Bytes(8), "reserved" / Bytes(2)))
CouponRecord = FastLayout("CouponRecord", Struct(
    *_head(), "value" / Int32ub, "min_spend" / Int32ub, "reserved" / Bytes(6)))
TransitRecord = FastLayout("TransitRecord", Struct(
    *_head(), "rides_left" / Int16ub, "rides_total" / Int16ub, "fare" / Int32ub,
    "reserved" / Bytes(6)))
VoucherRecord = FastLayout("VoucherRecord", Struct(
    *_head(), "value" / Int32ub, "code" / Bytes(10)))

LAYOUTS: dict[int, FastLayout] = {TAG_TICKET: TicketRecord, TAG_COUPON: CouponRecord,
                                  TAG_TRANSIT: TransitRecord, TAG_VOUCHER: VoucherRecord}
_RESERVED = {TAG_TICKET: 2, TAG_COUPON: 6, TAG_TRANSIT: 6}   # reserved bytes per kind


class GoodsRecordError(ValueError):
    """A goods record that does not follow its layout."""


def build(kind: str, **fields: Any) -> bytes:
    """A goods record of ``kind`` (``ticket``, ``coupon``, ``transit``, ``voucher``); the tag
    and the reserved bytes are filled in, ``status`` defaults to valid."""
    if kind not in KINDS:
        raise GoodsRecordError(f"unknown kind of good {kind!r} (known: {', '.join(KINDS)})")
    tag = KINDS[kind]
    layout = LAYOUTS[tag]
    values = {"status": STATUS_VALID, **fields, "tag": tag}
    if tag in _RESERVED:
        values["reserved"] = bytes(_RESERVED[tag])
    record = layout.build(values)
    check(record)
    return record


def parse(record: bytes) -> dict[str, Any]:
    """The fields of a goods record, with ``kind`` and ``status_name`` added (reserved bytes
    left out); refuses a record that :func:`check` refuses."""
    check(record)
    fields: dict[str, Any] = dict(LAYOUTS[record[0]].parse(record)._asdict())
    fields.pop("reserved", None)
    fields["kind"] = KIND_OF_TAG[record[0]]
    fields["status_name"] = STATUS_NAMES[record[1]]
    return fields


def check(record: bytes) -> None:
    """Refuse (:class:`GoodsRecordError`) a record of the wrong size, an unknown tag or status,
    or validity dates that are not real dates in order."""
    if len(record) != RECORD_SIZE:
        raise GoodsRecordError(f"a goods record has {RECORD_SIZE} bytes, got {len(record)}")
    if record[0] not in LAYOUTS:
        raise GoodsRecordError(f"unknown goods tag {record[0]:02X}")
    if record[1] not in STATUS_NAMES:
        raise GoodsRecordError(f"unknown goods status {record[1]:02X}")
    start, end = record[18:22], record[22:26]
    if not (valid_date(start) and valid_date(end)) or start > end:
        raise GoodsRecordError("valid_from and valid_to are BCD dates, from <= to")


def is_empty(record: bytes) -> bool:
    return record[0] == TAG_EMPTY
