"""The merchant's envelopes at the payment server (seed FIG. 9): opening a client envelope
(checking its ETSK, the order's expiry and variant), sealing the answer for the client, and the
debit result M sealed for the merchant. Every payment step opens its request here."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from ....protocols import messages as M
from ....protocols import secure
from ...kit.http import Refused, open_client_envelope, seal_answer

if TYPE_CHECKING:
    from .app import MerchantAccount




@dataclass
class Opened:
    """A client envelope, checked and opened."""

    env: Any
    merchant: MerchantAccount
    dk: bytes
    ticket: Any
    plaintext: bytes


def open_envelope(merchants: dict[bytes, MerchantAccount], data: bytes,
                  msg_type: int) -> Opened:
    """Open a client envelope sealed for one of ``merchants``; an expired order (400, code 410)
    or a variant the merchant has not enabled (403) is refused."""
    env, dk, ticket, plaintext = open_client_envelope(
        data, msg_type, {m: a.shared_key for m, a in merchants.items()},
        "merchant", M.OrderTicket, M.ticket_aad)
    merchant = merchants[env.merchant_id]
    if ticket.expires < time.time():
        raise Refused(400, 410, "the merchant's order has expired")
    if ticket.variant not in merchant.variants:
        raise Refused(403, 403, f"variant {M.VARIANT_NAMES.get(ticket.variant, '?')} is "
                                "not enabled for this merchant")
    return Opened(env, merchant, dk, ticket, plaintext)


def open_message(merchants: dict[bytes, MerchantAccount], data: bytes, msg_type: int,
                 layout: Any, what: str) -> tuple[Opened, Any]:
    """Open a client envelope and parse its body as ``layout``."""
    o = open_envelope(merchants, data, msg_type)
    try:
        return o, M.parse(layout, o.plaintext, what)
    except M.MessageError as exc:
        raise Refused(400, 400, str(exc)) from None


def sealed(o: Opened, msg_type: int, body: bytes) -> Response:
    """The answer to an opened envelope: ``body`` sealed under the order's TSK."""
    return seal_answer(o.env, o.ticket.tsk, msg_type, body)


def debit_result(o: Opened, row: dict[str, Any], status: int, reason: str,
                 tac: bytes = bytes(4)) -> dict[str, Any]:
    """The fields of a DebitResult (the plaintext of results C and M) for a payment's row."""
    return {"version": M.VERSION, "status": status, "variant": o.ticket.variant,
            "merchant_id": o.env.merchant_id, "txn_id": o.env.txn_id,
            "amount": o.ticket.amount, "currency_code": o.ticket.currency_code,
            "psam_id": bytes.fromhex(row["psam_id"]) if row.get("psam_id") else bytes(10),
            "terminal_txn_number": row.get("ttn") or 0,
            "card_serial": bytes.fromhex(row["card_serial"]),
            "card_counter": row["card_counter"], "tac": tac, "reason": reason}


def result_m(o: Opened, result: dict[str, Any]) -> bytes:
    """Debit result M: the result sealed under DK, for the merchant."""
    return secure.seal(o.dk, M.build(M.DebitResult, result),
                       M.result_m_aad(o.env.merchant_id, o.env.txn_id))
