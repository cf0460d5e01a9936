"""Unloading the ED passbook back to the cardholder's account: INITIALIZE FOR UNLOAD
(``80 50 05 01``) and DEBIT FOR UNLOAD (``80 54 03 00``).

Only the ED (PIN verified) unloads. INITIALIZE checks the unload key (DULK, by key index) and
that the holder's own value (the balance less the overdraft limit: the overdraft credit is never
unloaded) covers the amount, and answers balance, online counter, key version,
algorithm, random and MAC1 under the unload session key (built as a load's:
``3DES_DULK(random || online counter || 80 00)``). DEBIT takes the issuer's MAC2, debits the
purse (both writes of :meth:`~svcard.card.iep.Iep.commit_value`, the online counter goes up)
and answers MAC3 under the same session key, which the issuer checks.

The unload and update keys have MAC-failure counters of their own (``unload_mac_failures``,
``update_mac_failures``), counted and locked as the load keys' are
(:mod:`~svcard.card.iep_commands.lockout`).
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from ...protocols import crypto
from ...protocols import purse as P
from ...protocols import sw as SW
from ...protocols.apdu import CommandAPDU
from ..runtime import CardError, need_data
from .lockout import mac_failed, mac_ok
from .records import Proof, log_record
from .session import Session, online_key, read_initialize

if TYPE_CHECKING:
    from ..iep import Iep


# --- the commands -----------------------------------------------------------------------------
def initialize_for_unload(iep: Iep, cmd: CommandAPDU) -> bytes:
    """INITIALIZE FOR UNLOAD: open an unload session on the ED (the route allows P2 01 only)."""
    req, purse, random = read_initialize(iep, cmd)
    s = iep.state
    key = online_key(iep, cmd, s.unload_keys, req.key_index, purse)
    if req.amount > purse.balance - purse.overdraft_limit:   # the holder's own value only:
        raise CardError(SW.INSUFFICIENT_FUNDS)                # the overdraft credit stays
    counter = purse.online_counter
    sk = crypto.load_session_key(key.key, random, counter)
    mac1 = crypto.mac(sk, crypto.unload_mac1_input(purse.balance, req.amount, P.TYPE_UNLOAD,
                                                    req.terminal_id))
    iep.session = Session(cmd.p1, cmd.p2, P.TYPE_UNLOAD, key, req.amount, req.terminal_id,
                          random, counter, purse.balance, sk)
    return P.InitForUnloadAnswer.build({
        "balance": purse.balance, "online_counter": counter, "key_version": key.version,
        "algorithm_id": key.algorithm, "random": random, "mac1": mac1})


def debit_for_unload(iep: Iep, cmd: CommandAPDU) -> bytes:
    """DEBIT FOR UNLOAD: date, time and the issuer's MAC2; a right MAC2 debits the ED and
    answers MAC3."""
    session = iep.take_session()
    if cmd.p2 != 0:
        raise CardError(SW.WRONG_P1P2)
    if session is None or session.kind != P.INIT_UNLOAD:
        raise CardError(SW.CONDITIONS_NOT_SATISFIED)
    need_data(cmd, P.DebitForUnloadData.sizeof())
    req = P.DebitForUnloadData.parse(cmd.data)
    if not (P.valid_date(req.date) and P.valid_time(req.time)):
        raise CardError(SW.INCORRECT_DATA)
    mac2 = crypto.mac(session.session_key, crypto.unload_mac2_input(
        session.amount, session.txn_type, session.terminal_id, req.date, req.time))
    if not hmac.compare_digest(mac2, req.mac2):
        raise mac_failed(iep, session)
    mac_ok(iep.state, session)
    purse = iep.state.ed
    new_balance = session.balance - session.amount
    mac3 = crypto.mac(session.session_key, crypto.unload_mac3_input(
        new_balance, session.counter, session.amount, session.txn_type, session.terminal_id,
        req.date, req.time))
    record = log_record(session, purse, req.date, req.time)
    proof = Proof(session.txn_type, session.counter, req.mac2, mac3)
    iep.commit_value(purse, new_balance, "online_counter", proof, record)
    return mac3
