"""FIG. 5 holds: a PSAM kept for one payment, between INIT SAM FOR PURCHASE (the draw) and
CREDIT SAM FOR PURCHASE (the card's MAC2 in the debit response), for ``hold_timeout`` at most.

Holds are bounded per merchant and per client address (429 beyond): a draw counts its hold
before it takes any PSAM, so draws on their way to a hold count too. On a shared POS (seed 001
FIG. 4B: a PSAM terminal per merchant) the bounds count the PSAMs of the merchant's own
terminal: at most half of them held, by the merchant's payments and by one client's on that
terminal, so one client never holds all of a merchant's PSAMs (a terminal with one PSAM takes
no FIG. 5 hold: 409). Every step here is synchronous (no ``await`` between a check and what it
guards), so one request only takes a held PSAM."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...kit.http import Refused
from .psam_pool import PooledPsam, PsamPool

if TYPE_CHECKING:
    from .app import PaymentConfig


@dataclass
class Hold:
    """FIG. 5: a PSAM kept for one payment until the card's MAC2 comes (or the timer ends)."""

    psam: PooledPsam
    merchant: bytes
    client: str
    deadline: float
    timer: asyncio.TimerHandle | None = None


class Holds:
    """The payment server's FIG. 5 holds (by payment row id) and their count per merchant and
    per client address (reservations for draws on their way to a hold included)."""

    def __init__(self, config: PaymentConfig, pool: PsamPool) -> None:
        self.config = config
        self.pool = pool
        self.held: dict[int, Hold] = {}
        self.count: Counter[tuple[str, str]] = Counter()   # (kind, who): holds
        half = max(1, len(pool.psams) // 2)
        self.max_per_merchant = config.max_holds_per_merchant or half
        self.max_per_client = config.max_holds_per_client or half

    def _terminal(self, merchant: bytes) -> bytes | None:
        """The PSAM terminal of ``merchant``'s payments on a shared POS; None: one terminal
        (its caps count every PSAM, as when no merchant names a terminal)."""
        account = self.config.merchants.get(merchant)
        shared = len(self.pool.terminals) > 1
        return account.terminal_id if shared and account is not None else None

    def _keys(self, merchant: bytes, client: str) -> list[tuple[str, str]]:
        keys = [("merchant", merchant.hex()), ("client", client)]
        terminal = self._terminal(merchant)
        if terminal is not None:   # one client's holds on this terminal
            keys.append(("client on this terminal", f"{client} {terminal.hex()}"))
        return keys

    def _limits(self, merchant: bytes) -> list[int]:
        terminal = self._terminal(merchant)
        if terminal is None:
            return [self.max_per_merchant, self.max_per_client]
        half = sum(p.terminal_id == terminal for p in self.pool.psams) // 2
        if half == 0:
            raise Refused(409, 409, "this merchant's PSAM terminal has one PSAM: FIG. 5 (which "
                                    "holds it for the card's answer) is not offered; pay "
                                    "with another variant")
        c = self.config
        return [min(c.max_holds_per_merchant or half, half), self.max_per_client,
                min(c.max_holds_per_client or half, half)]

    def reserve(self, merchant: bytes, client: str) -> None:
        """Count a FIG. 5 hold against its merchant and client before any PSAM is taken, in
        one synchronous step (no ``await`` between the check and the count); 429 beyond."""
        keys = self._keys(merchant, client)
        for key, limit in zip(keys, self._limits(merchant), strict=True):
            if self.count[key] >= limit:
                loop = asyncio.get_running_loop()
                ends = [h.deadline for h in self.held.values()
                        if key in self._keys(h.merchant, h.client)]
                wait = min(ends, default=loop.time() + self.config.hold_timeout) - loop.time()
                raise Refused(429, 429, f"too many FIG. 5 payments waiting for a card at once "
                                        f"for this {key[0]} (at most {limit}); retry later",
                              {"Retry-After": str(max(1, math.ceil(wait)))})
        for key in keys:
            self.count[key] += 1

    def unreserve(self, merchant: bytes, client: str) -> None:
        for key in self._keys(merchant, client):
            self.count[key] -= 1
            if self.count[key] <= 0:
                del self.count[key]

    def hold(self, row_id: int, psam: PooledPsam, merchant: bytes, client: str) -> None:
        """FIG. 5: the PSAM waits for the card's MAC2, but not for ever."""
        loop = asyncio.get_running_loop()
        hold = Hold(psam, merchant, client, loop.time() + self.config.hold_timeout)
        hold.timer = loop.call_later(self.config.hold_timeout, self.release, row_id)
        self.held[row_id] = hold

    def take(self, row_id: int) -> Hold | None:
        """Take a held PSAM for this request alone (synchronous: no other request can take it
        too); the caller gives it back with :meth:`end`."""
        hold = self.held.pop(row_id, None)
        if hold is not None and hold.timer is not None:
            hold.timer.cancel()
        return hold

    def end(self, hold: Hold) -> None:
        """Give a taken hold's PSAM back to the pool and uncount the hold."""
        self.pool.release(hold.psam)
        self.unreserve(hold.merchant, hold.client)

    def release(self, row_id: int) -> None:
        """End a payment's hold, if it still has one (its timer, an early card refusal)."""
        hold = self.take(row_id)
        if hold is not None:
            self.end(hold)

    def release_all(self) -> None:
        """End every hold (the server stops)."""
        for row_id in list(self.held):
            self.release(row_id)
