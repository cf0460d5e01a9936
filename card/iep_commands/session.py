"""The IEP's value session: an INITIALIZE waiting for its CREDIT or DEBIT, and what every
INITIALIZE reads before its own checks.

The session is volatile: the next command other than its completion, a reselection or a reset
ends it (see :class:`~svcard.card.runtime.TableApplication`), and its completion takes it
whatever the answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...protocols import purse as P
from ...protocols import sw as SW
from ...protocols.apdu import CommandAPDU
from ..keys import KeyEntry
from ..runtime import CardError, need_data
from .lockout import check_not_locked

if TYPE_CHECKING:
    from ..iep import Iep, Purse

MAX_COUNTER = 0xFFFF   # a purse whose counter is here takes no more transactions of that kind


@dataclass(slots=True)
class Session:
    """An INITIALIZE waiting for its CREDIT or DEBIT (volatile)."""

    kind: int              # P1 of INITIALIZE
    purse_id: int          # P2
    txn_type: int
    key: KeyEntry
    amount: int
    terminal_id: bytes
    random: bytes
    counter: int
    balance: int
    session_key: bytes = field(default=b"", repr=False)   # a key: never in a repr


def read_initialize(iep: Iep, cmd: CommandAPDU) -> tuple[Any, Purse, bytes]:
    """The INITIALIZE data (key index, amount, terminal id), the purse P2 names (the ED only
    after VERIFY) and the card's random for the session, in that order of checks."""
    need_data(cmd, 11)
    req = P.InitializeData.parse(cmd.data)
    purse = iep.purse_for(cmd.p2)
    return req, purse, iep.new_random()


def online_key(iep: Iep, cmd: CommandAPDU, keys: dict[int, KeyEntry], key_index: int,
               purse: Purse) -> KeyEntry:
    """The key an online INITIALIZE (load, unload, overdraft update) names, checked in the
    card's order: known (else 9403), not locked (6983), and the purse's online counter not at
    its end (9402)."""
    key = keys.get(key_index)
    if key is None:
        raise CardError(SW.KEY_INDEX_NOT_SUPPORTED)
    check_not_locked(iep.state, cmd.p1, key)
    if purse.online_counter >= MAX_COUNTER:
        raise CardError(SW.COUNTER_AT_MAXIMUM)
    return key
