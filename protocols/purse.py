"""Every PBOC ED/EP purse byte layout, declared once with ``construct``.

Each layout parses and builds. At import every declaration is given a ``struct``-module codec
derived from it (:class:`FastLayout`): the same fields, about ten times faster than walking the
construct tree; ``tests/test_layouts.py`` proves the two agree byte for byte. Amounts are
unsigned 4-byte big-endian minor units; dates are BCD YYYYMMDD (4 bytes) and times BCD hhmmss
(3 bytes).
"""

from __future__ import annotations

import calendar
import datetime as _dt
import struct
from collections import namedtuple
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from construct import (
    Bytes,
    BytesInteger,
    FormatField,
    Int8ub,
    Int16ub,
    Int24ub,
    Int32ub,
    Int64ub,
    Struct,
)

from . import tlv


class Layout(Protocol):
    """What every declared layout offers: its field names, parse and build, a fixed size."""

    names: tuple[str, ...]

    def parse(self, data: bytes) -> Any: ...

    def build(self, obj: Mapping[str, Any]) -> bytes: ...

    def sizeof(self) -> int: ...


# --- instruction bytes ------------------------------------------------------------------------
CLA_ISO = 0x00
CLA_PBOC = 0x80
INS_VERIFY = 0x20
INS_INITIALIZE = 0x50
INS_CREDIT_FOR_LOAD = 0x52
INS_DEBIT = 0x54
INS_GET_TRANSACTION_PROVE = 0x5A
INS_GET_BALANCE = 0x5C
INS_CHANGE_PIN = 0x5E
INS_SELECT = 0xA4
INS_READ_BINARY = 0xB0
INS_READ_RECORD = 0xB2
INS_GET_DATA = 0xCA
INS_GET_RESPONSE = 0xC0
# PSAM (PBOC) and svcard's PSAM extensions
INS_INIT_SAM_FOR_PURCHASE = 0x70
INS_CREDIT_SAM_FOR_PURCHASE = 0x72
INS_SAM_BLOCKED_LIST = 0x76
INS_SAM_PREVIOUS_SIGNATURE = 0x78
INS_SAM_GET_TOTALS = 0x7A
INS_SAM_READ_BATCH_RECORD = 0x7C
INS_SAM_CLOSE_BATCH = 0x7E
# load HSM (svcard's own commands)
INS_HSM_AUTHORIZE_LOAD = 0xE2
INS_HSM_VERIFY_LOAD_TAC = 0xE6

# P1 of INITIALIZE
INIT_LOAD = 0x00
INIT_PURCHASE = 0x01
INIT_CASH_WITHDRAWAL = 0x02
# P2: which purse
PURSE_ED = 0x01
PURSE_EP = 0x02

# transaction types (log records, MAC inputs, GET TRANSACTION PROVE P2)
TYPE_ED_LOAD = 0x01
TYPE_EP_LOAD = 0x02
TYPE_UNLOAD = 0x03
TYPE_ED_CASH_WITHDRAWAL = 0x04
TYPE_ED_PURCHASE = 0x05
TYPE_EP_PURCHASE = 0x06
TYPE_OVERDRAFT_UPDATE = 0x07
TYPE_COMPOSITE_PURCHASE = 0x09

TYPE_NAMES: dict[int, str] = {
    TYPE_ED_LOAD: "ED load",
    TYPE_EP_LOAD: "EP load",
    TYPE_UNLOAD: "unload",
    TYPE_ED_CASH_WITHDRAWAL: "ED cash withdrawal",
    TYPE_ED_PURCHASE: "ED purchase",
    TYPE_EP_PURCHASE: "EP purchase",
    TYPE_OVERDRAFT_UPDATE: "overdraft limit update",
    TYPE_COMPOSITE_PURCHASE: "composite purchase",
}

# svcard's default application identifiers (F0 = proprietary, unregistered RID range)
DEFAULT_IEP_AID = bytes.fromhex("F05356434152440101")
DEFAULT_PSAM_AID = bytes.fromhex("F05356434152440201")
DEFAULT_HSM_AID = bytes.fromhex("F05356434152440301")

SFI_PUBLIC_DATA = 0x15
SFI_HOLDER_DATA = 0x16
SFI_LOG = 0x18
SFI_PSAM_TERMINAL_ID = 0x16
SFI_PSAM_CURRENCY = 0x17
LOG_RECORD_SIZE = 23
LOG_RECORDS = 10
TAG_BALANCE_LIMIT = 0x9F77   # GET DATA: the purse balance limit (4 bytes, minor units)

# --- IEP command data and answers ------------------------------------------------------------
InitializeData: Layout = Struct("key_index" / Int8ub, "amount" / Int32ub, "terminal_id" / Bytes(6))
InitForLoadAnswer: Layout = Struct(
    "balance" / Int32ub, "online_counter" / Int16ub, "key_version" / Int8ub,
    "algorithm_id" / Int8ub, "random" / Bytes(4), "mac1" / Bytes(4),
)
CreditForLoadData: Layout = Struct("date" / Bytes(4), "time" / Bytes(3), "mac2" / Bytes(4))
CreditForLoadAnswer: Layout = Struct("tac" / Bytes(4))
InitForPurchaseAnswer: Layout = Struct(
    "balance" / Int32ub, "offline_counter" / Int16ub, "overdraft_limit" / Int24ub,
    "key_version" / Int8ub, "algorithm_id" / Int8ub, "random" / Bytes(4),
)
DebitForPurchaseData: Layout = Struct(
    "terminal_txn_number" / Int32ub, "date" / Bytes(4), "time" / Bytes(3), "mac1" / Bytes(4),
)
DebitForPurchaseAnswer: Layout = Struct("tac" / Bytes(4), "mac2" / Bytes(4))
TransactionProveAnswer: Layout = Struct("mac" / Bytes(4), "tac" / Bytes(4))
Balance: Layout = Struct("balance" / Int32ub)
LogRecord: Layout = Struct(
    "counter" / Int16ub, "overdraft_limit" / Int24ub, "amount" / Int32ub,
    "txn_type" / Int8ub, "terminal_id" / Bytes(6), "date" / Bytes(4), "time" / Bytes(3),
)
# EF 0x15: public application basic data (30 bytes)
PublicAppData: Layout = Struct(
    "issuer_id" / Bytes(8), "app_type" / Int8ub, "app_version" / Int8ub,
    "app_serial" / Bytes(10), "start_date" / Bytes(4), "expiry_date" / Bytes(4),
    "reserved" / Bytes(2),
)
# EF 0x16: cardholder data (55 bytes)
HolderData: Layout = Struct(
    "card_type" / Int8ub, "staff_flag" / Int8ub, "name" / Bytes(20), "id_number" / Bytes(32),
    "id_type" / Int8ub,
)

# --- PSAM ------------------------------------------------------------------------------------
InitSamForPurchaseData: Layout = Struct(
    "random" / Bytes(4), "offline_counter" / Int16ub, "amount" / Int32ub, "txn_type" / Int8ub,
    "date" / Bytes(4), "time" / Bytes(3), "key_version" / Int8ub, "algorithm_id" / Int8ub,
    "card_serial" / Bytes(8),
)
InitSamForPurchaseData24: Layout = Struct(
    "random" / Bytes(4), "offline_counter" / Int16ub, "amount" / Int32ub, "txn_type" / Int8ub,
    "date" / Bytes(4), "time" / Bytes(3), "key_version" / Int8ub, "algorithm_id" / Int8ub,
    "card_serial" / Bytes(8), "issuer_id" / Bytes(8),
)
InitSamAnswer: Layout = Struct("terminal_txn_number" / Int32ub, "mac1" / Bytes(4))
InitSamAnswerEarly: Layout = Struct(
    "terminal_txn_number" / Int32ub, "mac1" / Bytes(4), "expected_mac2" / Bytes(4),
)
CreditSamData: Layout = Struct("mac2" / Bytes(4))
CreditSamDataWithTac: Layout = Struct("mac2" / Bytes(4), "tac" / Bytes(4))
PsamCurrency: Layout = Struct("currency_code" / Int16ub, "exponent" / Int8ub)
PsamTotal: Layout = Struct("issuer_id" / Bytes(8), "count" / Int32ub, "amount" / Int64ub)
# one purchase as the PSAM keeps it for collection (status 0 = credited, 1 = released early)
PsamRecord: Layout = Struct(
    "terminal_txn_number" / Int32ub, "issuer_id" / Bytes(8), "card_serial" / Bytes(8),
    "card_counter" / Int16ub, "amount" / Int32ub, "txn_type" / Int8ub,
    "terminal_id" / Bytes(6), "date" / Bytes(4), "time" / Bytes(3), "tac" / Bytes(4),
    "status" / Int8ub,
)
PSAM_RECORD_SIZE = 45
ReadBatchRecordData: Layout = Struct("batch" / Int8ub, "index" / Int32ub)
BatchHeader: Layout = Struct(
    "terminal_id" / Bytes(6), "batch_number" / Int32ub, "record_count" / Int32ub,
    "total_amount" / Int64ub,
)
BatchCloseAnswer: Layout = Struct(
    "terminal_id" / Bytes(6), "batch_number" / Int32ub, "record_count" / Int32ub,
    "total_amount" / Int64ub, "mac" / Bytes(4),
)
PreviousSignature: Layout = Struct(
    "terminal_txn_number" / Int32ub, "mac1" / Bytes(4), "expected_mac2" / Bytes(4),
    "state" / Int8ub,
)
SIGNATURE_NONE = 0
SIGNATURE_PENDING = 1
SIGNATURE_CREDITED = 2
SIGNATURE_RELEASED = 3
BlockedListData: Layout = Struct("card_serial" / Bytes(8))

# --- load HSM --------------------------------------------------------------------------------
HsmAuthorizeLoadData: Layout = Struct(
    "issuer_id" / Bytes(8), "card_serial" / Bytes(8), "key_version" / Int8ub,
    "algorithm_id" / Int8ub, "balance" / Int32ub, "amount" / Int32ub, "txn_type" / Int8ub,
    "terminal_id" / Bytes(6), "online_counter" / Int16ub, "random" / Bytes(4),
    "s1" / Bytes(4), "date" / Bytes(4), "time" / Bytes(3),
)
HsmAuthorizeLoadAnswer: Layout = Struct("s2" / Bytes(4))
HsmVerifyLoadTacData: Layout = Struct(
    "issuer_id" / Bytes(8), "card_serial" / Bytes(8), "balance_after" / Int32ub,
    "online_counter" / Int16ub, "amount" / Int32ub, "txn_type" / Int8ub,
    "terminal_id" / Bytes(6), "date" / Bytes(4), "time" / Bytes(3), "s3" / Bytes(4),
)


# --- unload and overdraft-limit update (PBOC ED only; H4, issue 11) ---------------------------
INIT_UPDATE = 0x04                  # P1 of INITIALIZE FOR UPDATE (the overdraft limit)
INIT_UNLOAD = 0x05                  # P1 of INITIALIZE FOR UNLOAD
DEBIT_FOR_UNLOAD = 0x03             # P1 of DEBIT (80 54) for an unload
DEBIT_FOR_PURCHASE = 0x01           # P1 of DEBIT (80 54) for a purchase / cash withdrawal
INS_UPDATE_OVERDRAFT_LIMIT = 0x58
MAX_OVERDRAFT_LIMIT = 0xFFFFFF      # 3 bytes, as in the log record
InitForUnloadAnswer: Layout = Struct(
    "balance" / Int32ub, "online_counter" / Int16ub, "key_version" / Int8ub,
    "algorithm_id" / Int8ub, "random" / Bytes(4), "mac1" / Bytes(4),
)
DebitForUnloadData: Layout = Struct("date" / Bytes(4), "time" / Bytes(3), "mac2" / Bytes(4))
DebitForUnloadAnswer: Layout = Struct("mac3" / Bytes(4))
InitForUpdateData: Layout = Struct("key_index" / Int8ub, "terminal_id" / Bytes(6))
InitForUpdateAnswer: Layout = Struct(
    "balance" / Int32ub, "online_counter" / Int16ub, "overdraft_limit" / Int24ub,
    "key_version" / Int8ub, "algorithm_id" / Int8ub, "random" / Bytes(4), "mac1" / Bytes(4),
)
UpdateOverdraftData: Layout = Struct(
    "new_limit" / Int24ub, "date" / Bytes(4), "time" / Bytes(3), "mac2" / Bytes(4),
)
UpdateOverdraftAnswer: Layout = Struct("tac" / Bytes(4))
# load HSM: P1 00 checks MAC1 and answers MAC2; P1 01 checks the card's proof (unload MAC3,
# update TAC) in ``mac``
INS_HSM_UNLOAD = 0xE8
INS_HSM_UPDATE = 0xEA
HsmUnloadData: Layout = Struct(
    "issuer_id" / Bytes(8), "card_serial" / Bytes(8), "key_version" / Int8ub,
    "algorithm_id" / Int8ub, "balance" / Int32ub, "amount" / Int32ub,
    "terminal_id" / Bytes(6), "online_counter" / Int16ub, "random" / Bytes(4),
    "date" / Bytes(4), "time" / Bytes(3), "mac" / Bytes(4),
)
HsmUpdateData: Layout = Struct(
    "issuer_id" / Bytes(8), "card_serial" / Bytes(8), "key_version" / Int8ub,
    "algorithm_id" / Int8ub, "balance" / Int32ub, "old_limit" / Int24ub,
    "new_limit" / Int24ub, "terminal_id" / Bytes(6), "online_counter" / Int16ub,
    "random" / Bytes(4), "date" / Bytes(4), "time" / Bytes(3), "mac" / Bytes(4),
)

# --- BCD dates and times ---------------------------------------------------------------------

_BCD_BYTES = bytes(hi * 16 + lo for hi in range(10) for lo in range(10))
_DAYS = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def is_bcd(data: bytes) -> bool:
    """True when every nibble is a decimal digit."""
    return not data.translate(None, _BCD_BYTES)


_TO_BCD = bytes((n // 10) * 16 + n % 10 for n in range(100))   # 0..99 -> one BCD byte


def bcd_date(day: _dt.date) -> bytes:
    year = day.year
    if year < 1000:   # strftime does not pad such a year: keep its (refused) text
        return bytes.fromhex(day.strftime("%Y%m%d"))
    return bytes((_TO_BCD[year // 100], _TO_BCD[year % 100], _TO_BCD[day.month],
                  _TO_BCD[day.day]))


def bcd_time(moment: _dt.time | _dt.datetime) -> bytes:
    return bytes((_TO_BCD[moment.hour], _TO_BCD[moment.minute], _TO_BCD[moment.second]))


def _bcd_value(byte: int) -> int:
    return (byte >> 4) * 10 + (byte & 15)


def valid_date(data: bytes) -> bool:
    """A real calendar date in BCD YYYYMMDD."""
    if len(data) != 4 or not is_bcd(data):
        return False
    year = (data[0] >> 4) * 1000 + (data[0] & 15) * 100 + (data[1] >> 4) * 10 + (data[1] & 15)
    month = (data[2] >> 4) * 10 + (data[2] & 15)
    day = (data[3] >> 4) * 10 + (data[3] & 15)
    if not 1 <= month <= 12 or not 1 <= day <= _DAYS[month]:
        return False
    return month != 2 or day < 29 or calendar.isleap(year)


def valid_time(data: bytes) -> bool:
    if len(data) != 3 or not is_bcd(data):
        return False
    return _bcd_value(data[0]) < 24 and _bcd_value(data[1]) < 60 and _bcd_value(data[2]) < 60


def parse_bcd_date(data: bytes) -> _dt.date:
    if not valid_date(data) or data[:2] == b"\x00\x00":
        raise ValueError(f"not a BCD date YYYYMMDD: {data.hex()}")
    return _dt.date(_bcd_value(data[0]) * 100 + _bcd_value(data[1]), _bcd_value(data[2]),
                    _bcd_value(data[3]))


# --- FCI (SELECT answer) ---------------------------------------------------------------------
TAG_FCI = 0x6F
TAG_DF_NAME = 0x84
TAG_FCI_PROPRIETARY = 0xA5
TAG_APP_LABEL = 0x50
TAG_CURRENCY_CODE = 0x5F2A
TAG_CURRENCY_EXPONENT = 0x5F36
TAG_ISSUER_DISCRETIONARY = 0x9F0C


@dataclass(frozen=True, slots=True)
class Fci:
    """The SELECT answer of a purse: DF name and proprietary data (currency, EF 0x15 copy)."""

    df_name: bytes
    label: str = ""
    currency_code: int | None = None
    currency_exponent: int | None = None
    issuer_discretionary: bytes = b""

    def build(self) -> bytes:
        inner: list[tlv.TLV] = []
        if self.label:
            inner.append(tlv.TLV(TAG_APP_LABEL, self.label.encode("ascii")))
        if self.currency_code is not None:
            inner.append(tlv.TLV(TAG_CURRENCY_CODE, bcd_currency(self.currency_code)))
        if self.currency_exponent is not None:
            inner.append(tlv.TLV(TAG_CURRENCY_EXPONENT, bytes((self.currency_exponent,))))
        if self.issuer_discretionary:
            inner.append(tlv.TLV(TAG_ISSUER_DISCRETIONARY, self.issuer_discretionary))
        body = [tlv.TLV(TAG_DF_NAME, self.df_name),
                tlv.TLV(TAG_FCI_PROPRIETARY, b"".join(bytes(i) for i in inner))]
        return tlv.build(TAG_FCI, body)

    @classmethod
    def parse(cls, data: bytes) -> Fci:
        items = tlv.parse(data)
        if not items or items[0].tag != TAG_FCI:
            raise tlv.TLVError("an FCI starts with tag 6F")
        fields: dict[int, bytes] = {}
        for item in items[0].children():
            if item.tag == TAG_FCI_PROPRIETARY:
                fields.update((c.tag, c.value) for c in item.children())
            else:
                fields[item.tag] = item.value
        if TAG_DF_NAME not in fields:
            raise tlv.TLVError("the FCI has no DF name (84)")
        cur = fields.get(TAG_CURRENCY_CODE)
        exp = fields.get(TAG_CURRENCY_EXPONENT)
        return cls(
            df_name=fields[TAG_DF_NAME],
            label=fields.get(TAG_APP_LABEL, b"").decode("ascii", "replace"),
            currency_code=parse_bcd_currency(cur) if cur is not None else None,
            currency_exponent=exp[0] if exp else None,
            issuer_discretionary=fields.get(TAG_ISSUER_DISCRETIONARY, b""),
        )


def bcd_currency(code: int) -> bytes:
    """ISO 4217 numeric code as EMV's n3 in two bytes: 156 -> 01 56."""
    if not 0 <= code <= 999:
        raise ValueError(f"a currency code is 0..999, got {code}")
    return bytes.fromhex(f"{code:04d}")


def parse_bcd_currency(data: bytes) -> int:
    if len(data) != 2 or not is_bcd(data):
        raise ValueError(f"not an n3 currency code: {data.hex()}")
    return int(data.hex())


class LayoutError(ValueError):
    """Bytes of the wrong size for a layout, or a value that does not fit its field."""


class FastLayout:
    """A fixed-size ``construct`` Struct of big-endian integers and byte strings, run through
    the ``struct`` module: the same declaration, parsed and built without construct's stream
    and container machinery. ``parse`` needs exactly ``sizeof()`` bytes and returns a named
    tuple; ``build`` checks every field's size."""

    def __init__(self, name: str, declaration: Any) -> None:
        self.declaration = declaration
        fmt = ">"
        names: list[str] = []
        self._widen: list[tuple[int, int]] = []   # (field index, width) of 3-byte integers
        self._sized: list[tuple[int, int]] = []   # (field index, length) of byte strings
        for i, sub in enumerate(declaration.subcons):
            inner = sub.subcon
            names.append(sub.name)
            if isinstance(inner, FormatField) and inner.fmtstr in (">B", ">H", ">L", ">Q"):
                fmt += inner.fmtstr[1]
            elif isinstance(inner, BytesInteger) and not inner.signed and not inner.swapped:
                fmt += f"{inner.length}s"
                self._widen.append((i, int(inner.length)))
            elif isinstance(inner, Bytes) and isinstance(inner.length, int):
                fmt += f"{inner.length}s"
                self._sized.append((i, inner.length))
            else:
                raise TypeError(f"{name}.{sub.name}: no fixed struct form")
        self.name = name
        self.names = tuple(names)
        self._codec = struct.Struct(fmt)
        self._tuple: Any = namedtuple(name, names)  # type: ignore[misc]

    def sizeof(self) -> int:
        return self._codec.size

    def parse(self, data: bytes) -> Any:
        if len(data) != self._codec.size:
            raise LayoutError(f"{self.name} has {self._codec.size} bytes, got {len(data)}")
        values = list(self._codec.unpack(data))
        for i, _ in self._widen:
            values[i] = int.from_bytes(values[i], "big")
        return self._tuple._make(values)

    def build(self, obj: Mapping[str, Any]) -> bytes:
        try:
            values = [obj[n] for n in self.names]
        except KeyError as exc:
            raise LayoutError(f"{self.name}: missing field {exc}") from None
        for i, width in self._widen:
            try:
                values[i] = int(values[i]).to_bytes(width, "big")
            except OverflowError:
                raise LayoutError(f"{self.name}.{self.names[i]} does not fit {width} bytes")\
                    from None
        for i, length in self._sized:
            if len(values[i]) != length:
                raise LayoutError(f"{self.name}.{self.names[i]} has {length} bytes, "
                                  f"got {len(values[i])}")
        try:
            return self._codec.pack(*values)
        except struct.error as exc:
            raise LayoutError(f"{self.name}: {exc}") from None


def _fast_all() -> None:
    """Give every layout above its fast codec (the construct declaration stays reachable as
    ``LAYOUT.declaration``)."""
    space = globals()
    for name, value in list(space.items()):
        if isinstance(value, Struct):
            space[name] = FastLayout(name, value)


_fast_all()
