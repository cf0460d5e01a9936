"""The network messages of a load (seed FIG. 17-18): client terminal <-> load server, and the
load confirmation the client carries to the bank.

They travel in the same :data:`~svcard.protocols.messages.Envelope` as payments: its 8-byte
``merchant_id`` field holds the bank id, its ETSK is the bank's :data:`LoadTicket` sealed under
the key the bank and the load server derive from their shared key (the load server learns the
amount the bank debited, and the TSK, from it), and its body is sealed with the TSK. The load
server's :data:`LoadConfirmation` is sealed under that derived key, so the bank can open it and
the client, who carries it, can neither read nor forge it. Amounts are integer minor units.

A negative result is proven by a zero-value *probe load*, done for real: the client reports
"not loaded" with a new zero-value S1 (:data:`LoadResult`), the load server answers a
:data:`LOAD_PROBE` (a :data:`LoadCommand` for amount 0 with an S2 the HSM makes only now), the
card credits 0 and moves its online counter, and the client posts the card's TAC as a
:data:`LoadProbeResult`. Only then does the load server decide, and seal its confirmation.
"""

from __future__ import annotations

from typing import Any

from construct import (
    Bytes,
    Const,
    GreedyBytes,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    PascalString,
    Prefixed,
    Struct,
)

from . import codec, secure
from .messages import Blob, build, parse

# message types (the payment messages use 1..15)
LOAD_REQUEST = 16
LOAD_COMMAND = 17
LOAD_RESULT = 18
LOAD_ANSWER = 19
LOAD_PROBE = 20          # the load server's zero-value load command (LoadCommand, amount 0)
LOAD_PROBE_RESULT = 21   # the card's answer to the probe (LoadProbeResult)

# what the card said, as the client reports it
RESULT_LOADED = 0
RESULT_NOT_LOADED = 1

# the load server's decision, in its confirmation
OUTCOME_LOADED = 0
OUTCOME_NOT_LOADED = 1

# what the bank seals under DK for the load server (seed step 874: amount, currency, txn id...).
# Version 2 adds the card's issuer id as the bank priced the load for it (its configured balance
# limit is per issuer): the load server loads only a card whose request names that issuer, and
# its HSM checks S1 under that issuer's keys. Empty: the bank went by no issuer (it has no
# issuer limits and the client named none).
LOAD_TICKET_VERSION = 2
LoadTicket = Struct(
    "version" / Int8ub,
    "tsk" / Bytes(32),
    "amount" / Int32ub,
    "currency_code" / Int16ub,
    "currency_exponent" / Int8ub,
    "card_serial" / Bytes(10),
    "bank_time" / Int64ub,        # unix seconds when the bank debited the account
    "expires" / Int64ub,          # unix seconds
    "terminal_id" / Bytes(6),     # the load server's terminal id (in S1 and S2)
    "issuer_id" / Prefixed(Int8ub, GreedyBytes),   # version 2: 8 bytes, or none
)

# seed step 876: the card's answers packed into one message
LoadRequest = Struct(
    "issuer_id" / Bytes(8),
    "card_serial" / Bytes(10),
    "expiry_date" / Bytes(4),
    "currency_code" / Int16ub,
    "amount" / Int32ub,
    "txn_type" / Int8ub,
    "algorithm_id" / Int8ub,
    "key_version" / Int8ub,
    "online_counter" / Int16ub,
    "balance" / Int32ub,
    "random" / Bytes(4),
    "s1" / Bytes(4),
    "bank_time" / Int64ub,
)

# seed step 880: the load command with the HSM's S2
LoadCommand = Struct(
    "amount" / Int32ub,
    "date" / Bytes(4),
    "time" / Bytes(3),
    "s2" / Bytes(4),
)

# seed steps 882-883: the card's answer. Loaded: S3. Not loaded: the card's status word and a
# new zero-value INITIALIZE FOR LOAD (new counter, balance, random and S1): the load server
# answers a probe (LOAD_PROBE) for it, or, when no S2 was ever issued, its decision at once.
LoadResult = Struct(
    "result" / Int8ub,
    "card_sw" / Int16ub,
    "s3" / Bytes(4),
    "online_counter" / Int16ub,
    "balance" / Int32ub,
    "random" / Bytes(4),
    "s1" / Bytes(4),
)

# the card's answer to the probe's CREDIT FOR LOAD: its status word and its TAC (S3) over
# (balance after, counter, amount 0, type, terminal, the probe's date and time)
LoadProbeResult = Struct(
    "card_sw" / Int16ub,
    "s3" / Bytes(4),
)

# seed step 890: sealed under DK for the bank (associated data: confirmation_aad)
LoadConfirmation = Struct(
    "version" / Int8ub,
    "outcome" / Int8ub,
    "bank_id" / Bytes(8),
    "txn_id" / Bytes(16),
    "amount" / Int32ub,
    "card_serial" / Bytes(10),
    "online_counter" / Int16ub,
    "s3" / Bytes(4),
    "reason" / PascalString(Int16ub, "utf8"),
)

# the load server's answer to a result, for the client (inside the TSK-sealed envelope)
LoadAnswer = Struct(
    "outcome" / Int8ub,
    "reason" / PascalString(Int16ub, "utf8"),
    "confirmation" / Blob,
)

# what the client posts to the bank's status URL (seed step 891)
BankConfirmation = Struct(
    "magic" / Const(b"SL"),
    "version" / Int8ub,
    "txn_id" / Bytes(16),
    "confirmation" / Blob,
)


def ticket_aad(bank_id: bytes, txn_id: bytes) -> bytes:
    return b"svcard load ticket v1" + bank_id + txn_id


def confirmation_aad(bank_id: bytes, txn_id: bytes) -> bytes:
    return b"svcard load confirmation v1" + bank_id + txn_id


def seal_ticket(bank_key: bytes, bank_id: bytes, txn_id: bytes, fields: dict[str, Any]) -> bytes:
    """The bank's load ticket ``fields`` sealed under DK for the load server (the ETSK)."""
    return secure.seal(secure.derive_key(bank_key, bank_id, txn_id),
                       build(LoadTicket, fields), ticket_aad(bank_id, txn_id))


def open_confirmation(bank_key: bytes, bank_id: bytes, txn_id: bytes, sealed: bytes) -> Any:
    """The load server's confirmation for the bank, opened under DK and parsed;
    ``secure.SealError`` if forged, ``MessageError`` if malformed."""
    return parse(LoadConfirmation, secure.open_sealed(
        secure.derive_key(bank_key, bank_id, txn_id), sealed,
        confirmation_aad(bank_id, txn_id), "load confirmation"), "load confirmation")


codec.register(globals())
