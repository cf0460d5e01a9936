"""A load client's message in its envelope (seed FIG. 17-18; protocol ``loadmsg``): opening it
with the bank's sealed ticket, and sealing the answer under the ticket's TSK.

The bank named in the envelope must be one this server serves; the body must have its
message's fixed size and parse. Anything else is refused (400, 401 for a seal that does not
open, 403 for an unknown bank) before the log is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from ....protocols import loadmsg as L
from ....protocols import messages as M
from ...kit.http import Refused, open_client_envelope, request_digest, seal_answer

if TYPE_CHECKING:
    from .app import BankAccount


@dataclass
class OpenedLoad:
    """One opened client message: envelope, the bank it names, the transaction key DK, the
    bank's ticket, the parsed body and the SHA-256 of the body (how a repeat is recognized)."""

    env: Any
    bank: BankAccount
    dk: bytes
    ticket: Any
    body: Any
    digest: str




def open_message(banks: Mapping[bytes, BankAccount], data: bytes, msg_type: int, layout: Any,
                 what: str) -> OpenedLoad:
    """Open a ``msg_type`` envelope sent through one of ``banks`` and parse its ``layout``."""
    env, dk, ticket, plain = open_client_envelope(
        data, msg_type, {b: a.shared_key for b, a in banks.items()}, "bank",
        L.LoadTicket, L.ticket_aad)
    size = M.sizeof(layout)  # every client message has a fixed size (the twin's, ~0 us)
    if len(plain) != size:
        raise Refused(400, 400, f"{what} is malformed: {len(plain)} bytes, not {size}")
    try:
        body = M.parse(layout, plain, what)
    except M.MessageError as exc:
        raise Refused(400, 400, str(exc)) from None
    return OpenedLoad(env, banks[env.merchant_id], dk, ticket, body, request_digest(plain))


def sealed(o: OpenedLoad, msg_type: int, body: bytes) -> Response:
    """The answer ``body`` as a ``msg_type`` envelope for the client that sent ``o``."""
    return seal_answer(o.env, o.ticket.tsk, msg_type, body)
