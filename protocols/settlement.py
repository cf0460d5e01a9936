"""The settlement file clearing writes (seed FIG. 3): a fixed layout, closed by a MAC.

``header || line * line_count || HMAC-SHA256(settlement key, header || lines)``. Each line moves
``amount`` minor units (``count`` transactions) from ``payer`` to ``payee``:

* kind 1 LOADED FUNDS: a bank pays the issuer's float pool for the loads it confirmed;
* kind 2 ACQUIRER TOTAL: the float pays an acquirer the lump sum of its merchants' purchases;
* kind 3 MERCHANT PAYOUT: the acquirer pays one merchant.
"""

from __future__ import annotations

from construct import Bytes, Const, Int8ub, Int32ub, Int64ub, Struct

KIND_LOADED_FUNDS = 1
KIND_ACQUIRER_TOTAL = 2
KIND_MERCHANT_PAYOUT = 3
KIND_NAMES = {KIND_LOADED_FUNDS: "loaded funds", KIND_ACQUIRER_TOTAL: "acquirer total",
              KIND_MERCHANT_PAYOUT: "merchant payout"}

SettlementHeader = Struct(
    "magic" / Const(b"SVST"),
    "version" / Int8ub,
    "run_number" / Int32ub,
    "created" / Int64ub,          # unix seconds
    "line_count" / Int32ub,
    "records_cleared" / Int32ub,
    "total_paid" / Int64ub,       # to merchants
    "total_loaded" / Int64ub,     # into the float
)
HEADER_SIZE = 41

SettlementLine = Struct(
    "kind" / Int8ub,
    "payer" / Bytes(8),
    "payee" / Bytes(8),
    "count" / Int32ub,
    "amount" / Int64ub,
)
LINE_SIZE = 29
MAC_SIZE = 32
