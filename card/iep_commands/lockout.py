"""MAC failures and the key lock of the IEP purse.

Every purse key (purchase, load, unload and overdraft-update keys, each by key index) and the
goods key has a counter of CONSECUTIVE wrong MACs (MAC1 of DEBIT, S2 of CREDIT FOR LOAD, the
issuer's MAC2 of an unload or an update, the MAC of a secure-messaging goods write). A wrong MAC
adds one and is written to the image before the card answers ``9302`` (``6988`` for a goods
write); a right MAC sets it back to 0 in the same image write as
the value it moves. At ``mac_failure_limit`` the key is locked: INITIALIZE with it answers
``6983`` (authentication method blocked) until the issuer re-personalises the card
(:func:`unlock_keys`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...protocols import purse as P
from ...protocols import sw as SW
from ..runtime import CardError

if TYPE_CHECKING:
    from ..iep import Iep, IepState
    from ..keys import KeyEntry
    from .session import Session

DEFAULT_MAC_FAILURE_LIMIT = 15   # a 4-bit key error counter, as on common card OSes
KEY_LOCKED = SW.PIN_BLOCKED      # 6983: authentication method blocked (ISO 7816-4)
KIND_GOODS = 0x100               # not an INITIALIZE P1: the goods key's secure-messaging writes


def unlock_keys(state: IepState) -> None:
    """The issuer's unlock, at re-personalisation: every key's MAC-failure counter to 0."""
    for counts in (state.purchase_mac_failures, state.load_mac_failures,
                   state.unload_mac_failures, state.update_mac_failures,
                   state.goods_mac_failures):
        counts.clear()


def failures_of(state: IepState, kind: int) -> dict[int, int]:
    """The failure counters of the keys an INITIALIZE of this kind (its P1) uses, or the goods
    key's (:data:`KIND_GOODS`)."""
    if kind == KIND_GOODS:
        return state.goods_mac_failures
    if kind == P.INIT_LOAD:
        return state.load_mac_failures
    if kind == P.INIT_UNLOAD:
        return state.unload_mac_failures
    if kind == P.INIT_UPDATE:
        return state.update_mac_failures
    return state.purchase_mac_failures


def check_not_locked(state: IepState, kind: int, key: KeyEntry) -> None:
    if failures_of(state, kind).get(key.index, 0) >= state.mac_failure_limit:
        raise CardError(KEY_LOCKED)


def count_failure(iep: Iep, kind: int, key: KeyEntry) -> None:
    """Count a wrong MAC against ``key``, persisted before the card answers."""
    failures = failures_of(iep.state, kind)
    failures[key.index] = min(failures.get(key.index, 0) + 1, iep.state.mac_failure_limit)
    iep.persist()


def mac_failed(iep: Iep, session: Session) -> CardError:
    """Count a wrong MAC against the session's key, persisted before the card answers."""
    count_failure(iep, session.kind, session.key)
    return CardError(SW.MAC_INVALID)


def mac_ok(state: IepState, session: Session) -> None:
    """A right MAC: the key's count of consecutive failures restarts (written together with
    the value the MAC moves, write 1 of :meth:`~svcard.card.iep.Iep.commit_value`)."""
    failures_of(state, session.kind).pop(session.key.index, None)
