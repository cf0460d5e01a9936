"""The network messages between client terminal, payment server and merchant server.

Every message is a versioned binary layout declared once here with ``construct``. On the wire a
client <-> payment server message is an :data:`Envelope`: a clear header (magic ``SV``,
version, type, merchant id, transaction id, the ETSK) and a body sealed with the TSK whose
associated data is the header, so no header field can be changed either (see
:mod:`svcard.protocols.secure`). Amounts are integer minor units.
"""

from __future__ import annotations

import hashlib
from typing import Any

from construct import (
    Bytes,
    Const,
    ConstructError,
    Default,
    GreedyBytes,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    PascalString,
    Prefixed,
    Struct,
    Terminated,
)

from . import codec, secure

VERSION = 1

# message types
DRAW_REQUEST = 1
DEBIT_COMMAND = 2
DEBIT_RESPONSE = 3
PAYMENT_RESULT = 4
DEBIT_PROOF = 5       # FIG. 7/8, after the goods: the card's MAC2 and TAC, for clearing
ERROR = 15

# confirmation variants (seed FIG. 5-8)
FIG5_PSAM_COMPARES = 5
FIG6_SERVER_COMPARES = 6
FIG7_CLIENT_COMPARES = 7
FIG8_MERCHANT_COMPARES = 8
VARIANTS = {"fig5": FIG5_PSAM_COMPARES, "fig6": FIG6_SERVER_COMPARES,
            "fig7": FIG7_CLIENT_COMPARES, "fig8": FIG8_MERCHANT_COMPARES}
VARIANT_NAMES = {v: k for k, v in VARIANTS.items()}

# purposes of an order (seed FIG. 16: a zero-amount draw only authenticates)
PURPOSE_PAYMENT = 0
PURPOSE_AUTHENTICATION = 1

# result status codes
STATUS_OK = 0
STATUS_AUTHENTICATED = 1
STATUS_CARD_REFUSED = 2
STATUS_MAC_MISMATCH = 3

Blob = Prefixed(Int16ub, GreedyBytes)

Envelope = Struct(
    "magic" / Const(b"SV"),
    "version" / Int8ub,
    "msg_type" / Int8ub,
    "merchant_id" / Bytes(8),
    "txn_id" / Bytes(16),
    "etsk" / Blob,
    "body" / GreedyBytes,
)

# what the merchant seals under DK for the payment server (carried by the client)
OrderTicket = Struct(
    "version" / Int8ub,
    "tsk" / Bytes(32),
    "amount" / Int32ub,
    "currency_code" / Int16ub,
    "currency_exponent" / Int8ub,
    "variant" / Int8ub,
    "purpose" / Int8ub,
    "expires" / Int64ub,          # unix seconds
    "terminal_id" / Bytes(6),
)

DrawRequest = Struct(
    "issuer_id" / Bytes(8),
    "card_serial" / Bytes(10),
    "algorithm_id" / Int8ub,
    "key_version" / Int8ub,
    "expiry_date" / Bytes(4),
    "balance" / Int32ub,
    "currency_code" / Int16ub,
    "currency_exponent" / Int8ub,
    "purse" / Int8ub,             # authentication mode: 01 ED (PIN verified), 02 EP
    "offline_counter" / Int16ub,  # the IEP's transaction number
    "amount" / Int32ub,
    "random" / Bytes(4),
    "txn_type" / Int8ub,
    # the card's 9-byte UID, for an issuer whose MAC scheme puts it into MAC1 (changsha-metro);
    # none for a PBOC card, whose draw keeps its old bytes (a server reads none as none)
    "uid" / Default(GreedyBytes, b""),
)

DebitCommand = Struct(
    "psam_id" / Bytes(10),
    "terminal_id" / Bytes(6),
    "terminal_txn_number" / Int32ub,
    "date" / Bytes(4),
    "time" / Bytes(3),
    "mac1" / Bytes(4),
    "amount" / Int32ub,
    "expected_mac2" / Bytes(4),    # FIG. 7 only (zeros otherwise)
    "sealed_expected_mac2" / Blob,  # FIG. 8 only: under DK, for the merchant
    "result_m" / Blob,              # FIG. 7 and 8: debit result M, issued at once
)

DebitResponse = Struct(
    "card_sw" / Int16ub,
    "tac" / Bytes(4),
    "mac2" / Bytes(4),
)

# the plaintext of both "debit result C" (under TSK) and "debit result M" (under DK)
DebitResult = Struct(
    "version" / Int8ub,
    "status" / Int8ub,
    "variant" / Int8ub,
    "merchant_id" / Bytes(8),
    "txn_id" / Bytes(16),
    "amount" / Int32ub,
    "currency_code" / Int16ub,
    "psam_id" / Bytes(10),
    "terminal_txn_number" / Int32ub,
    "card_serial" / Bytes(10),
    "card_counter" / Int16ub,
    "tac" / Bytes(4),
    "reason" / PascalString(Int16ub, "utf8"),
)

PaymentResult = Struct(
    "result_c" / Blob,
    "result_m" / Blob,
)

# what the client posts to the merchant's status URL
Confirmation = Struct(
    "magic" / Const(b"SC"),
    "version" / Int8ub,
    "variant" / Int8ub,
    "txn_id" / Bytes(16),
    "result_m" / Blob,
    "card_mac2" / Bytes(4),          # FIG. 7 and 8: the card's MAC2
    "sealed_expected_mac2" / Blob,   # FIG. 8
    "terminal_id" / Default(Bytes(8), bytes(8)),   # FIG. 7: the registered client terminal
    "tac" / Default(Bytes(4), bytes(4)),           # FIG. 7: the card's TAC
    "signature" / Default(Blob, b""),              # FIG. 7: the terminal's Ed25519 signature
    Terminated,
)

FIG7_SIGNATURE_CONTEXT = b"svcard FIG7 confirmation v1"

ErrorMessage = Struct(
    "magic" / Const(b"SE"),
    "version" / Int8ub,
    "code" / Int16ub,
    "reason" / PascalString(Int16ub, "utf8"),
)


class MessageError(ValueError):
    """Bytes that are not the message they claim to be."""


def parse(layout: Any, data: bytes, what: str) -> Any:
    """``layout`` parsed from ``data`` (through its struct twin, :mod:`.codec`, when it has
    one); :class:`MessageError` naming ``what`` if malformed."""
    twin = codec.twin(layout)
    try:
        return layout.parse(data) if twin is None else twin.parse(data)
    except (ConstructError, ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"{what} is malformed: {str(exc).splitlines()[0]}") from None


def build(layout: Any, value: dict[str, Any]) -> bytes:
    twin = codec.twin(layout)
    return bytes(layout.build(value)) if twin is None else twin.build(value)


def sizeof(layout: Any) -> int:
    """The byte size of every message of a fixed-size ``layout`` (what ``layout.sizeof()``
    answers, without walking the construct tree at each call)."""
    twin = codec.twin(layout)
    return layout.sizeof() if twin is None or twin.size is None else twin.size


# --- associated data: what each sealed blob is bound to ---------------------------------------

def ticket_aad(merchant_id: bytes, txn_id: bytes) -> bytes:
    return b"svcard ETSK v1" + merchant_id + txn_id


def result_m_aad(merchant_id: bytes, txn_id: bytes) -> bytes:
    return b"svcard result M v1" + merchant_id + txn_id


def result_c_aad(merchant_id: bytes, txn_id: bytes) -> bytes:
    return b"svcard result C v1" + merchant_id + txn_id


def expected_mac2_aad(merchant_id: bytes, txn_id: bytes) -> bytes:
    return b"svcard expected MAC2 v1" + merchant_id + txn_id


# --- the merchant's two sealed blobs, sealed and opened in one place ---------------------------
def seal_ticket(shared_key: bytes, merchant_id: bytes, txn_id: bytes,
                fields: dict[str, Any]) -> bytes:
    """The order ticket ``fields`` sealed under DK for the payment server (the ETSK)."""
    return secure.seal(secure.derive_key(shared_key, merchant_id, txn_id),
                       build(OrderTicket, fields), ticket_aad(merchant_id, txn_id))


def open_result_m(shared_key: bytes, merchant_id: bytes, txn_id: bytes, sealed: bytes) -> Any:
    """A confirmation's debit result M, opened under DK and parsed; ``secure.SealError`` if
    forged, :class:`MessageError` if malformed."""
    return parse(DebitResult, secure.open_sealed(
        secure.derive_key(shared_key, merchant_id, txn_id), sealed,
        result_m_aad(merchant_id, txn_id), "debit result M"), "debit result M")


def fig7_signed_data(merchant_id: bytes, txn_id: bytes, result_m: bytes, card_mac2: bytes,
                     tac: bytes) -> bytes:
    """What a registered client terminal signs (Ed25519) in a FIG. 7 confirmation: it vouches
    that the card answered this MAC2 and TAC to this order's debit."""
    return (FIG7_SIGNATURE_CONTEXT + merchant_id + txn_id + hashlib.sha256(result_m).digest()
            + card_mac2 + tac)


def envelope_header(msg_type: int, merchant_id: bytes, txn_id: bytes, etsk: bytes) -> bytes:
    return build(Envelope, {"version": VERSION, "msg_type": msg_type,
                            "merchant_id": merchant_id, "txn_id": txn_id, "etsk": etsk,
                            "body": b""})


def seal_envelope(msg_type: int, merchant_id: bytes, txn_id: bytes, etsk: bytes, tsk: bytes,
                  body: bytes) -> bytes:
    header = envelope_header(msg_type, merchant_id, txn_id, etsk)
    return header + secure.seal(tsk, body, header)


def split_envelope(data: bytes) -> tuple[Any, bytes]:
    """The parsed envelope and its header bytes (the associated data of its body)."""
    env = parse(Envelope, data, "envelope")
    if env.version != VERSION:
        raise MessageError(f"envelope version {env.version}; this server speaks {VERSION}")
    return env, data[: len(data) - len(env.body)]


def error_message(code: int, reason: str) -> bytes:
    return build(ErrorMessage, {"version": VERSION, "code": code, "reason": reason})


codec.register(globals())
