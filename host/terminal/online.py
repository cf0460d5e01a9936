"""What every client that goes online shares: a server's refusal and the reason it gave."""

from __future__ import annotations

import httpx

from ...protocols import messages as M
from .purse import TerminalError


class PaymentRefused(TerminalError):
    """A server (payment, merchant, bank or load server) refused; the reason is theirs."""

    def __init__(self, who: str, status: int, reason: str) -> None:
        super().__init__(f"{who} refused ({status}): {reason}")
        self.who, self.status, self.reason = who, status, reason


def server_reason(response: httpx.Response) -> str:
    reason = response.headers.get("X-Svcard-Reason")
    if reason:
        return str(reason)
    try:
        return str(M.parse(M.ErrorMessage, response.content, "error").reason)
    except M.MessageError:
        try:
            return str(response.json().get("reason", response.text))
        except ValueError:
            return response.text[:200]
