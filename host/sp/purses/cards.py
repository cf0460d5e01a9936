"""Reading a pool purse's state from the card itself: serial, currency, EP balance, balance
limit and both 2-byte counters.

A PBOC purse shows its offline counter only in the answer to INITIALIZE FOR PURCHASE and its
online counter only in the answer to INITIALIZE FOR LOAD; both are asked for zero value, and the
session each opens is ended unused by the next SELECT (it moves no counter and no money). A
counter already at 65535 makes the card answer 9402 (counter at its maximum): read as 65535.
"""

from __future__ import annotations

from dataclasses import dataclass

from ....protocols import purse as P
from ....protocols import sw as SW
from ....reader import Reader
from ...terminal import apdus
from ...terminal.purse import Declined, call, read_balance_limit, select_purse

MAX_COUNTER = 0xFFFF
NO_LIMIT = 0xFFFFFFFF
# the terminal id the zero-value INITIALIZEs name (no transaction is ever completed with it)
READ_TERMINAL = bytes(6)


@dataclass(frozen=True)
class PurseState:
    serial: str
    currency_code: int
    balance: int
    limit: int
    offline_counter: int
    online_counter: int


def _counter(card: Reader, kind: int, aid: bytes) -> tuple[int, int]:
    """(balance, counter) from a zero-value INITIALIZE of ``kind``; the purse is selected
    again afterwards, which ends the session unused."""
    answer = card.exchange(apdus.initialize(kind, P.PURSE_EP, 1, 0, READ_TERMINAL))
    try:
        if answer.sw == SW.COUNTER_AT_MAXIMUM:
            return -1, MAX_COUNTER
        if not answer.ok:
            step = "INITIALIZE FOR LOAD" if kind == P.INIT_LOAD else "INITIALIZE FOR PURCHASE"
            raise Declined(f"{step} (zero value, to read the counter)", answer.sw)
        if kind == P.INIT_LOAD:
            load = P.InitForLoadAnswer.parse(answer.data)
            return int(load.balance), int(load.online_counter)
        buy = P.InitForPurchaseAnswer.parse(answer.data)
        return int(buy.balance), int(buy.offline_counter)
    finally:
        call(card, apdus.select(aid), "SELECT purse")


def read_state(card: Reader, aid: bytes = P.DEFAULT_IEP_AID) -> PurseState:
    """The purse's state now (the card connected)."""
    info = select_purse(card, aid)
    balance = int.from_bytes(call(card, apdus.get_balance(P.PURSE_EP), "GET BALANCE"), "big")
    limit = read_balance_limit(card)
    if limit is None:   # a card that keeps no balance limit: the 4-byte balance's own end
        limit = NO_LIMIT
    _, offline = _counter(card, P.INIT_PURCHASE, aid)
    _, online = _counter(card, P.INIT_LOAD, aid)
    return PurseState(serial=info.app_serial, currency_code=info.currency_code or 0,
                      balance=balance, limit=limit, offline_counter=offline,
                      online_counter=online)
