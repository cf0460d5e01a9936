"""Changing the ED's overdraft limit: INITIALIZE FOR UPDATE (``80 50 04 01``) and UPDATE
OVERDRAFT LIMIT (``80 58 00 00``).

Only the ED (PIN verified) has an overdraft. The ED balance the card keeps is what may be
spent, overdraft included: a new limit moves the balance by (new limit - old limit). A lower
limit that would take the balance below 0 is refused (``9401``) and changes nothing.

INITIALIZE FOR UPDATE (key index 1, terminal id 6) checks the update key (DUK) and answers
balance, online counter, the current limit, key version, algorithm, random and MAC1 under the
update session key (``3DES_DUK(random || online counter || 80 00)``). UPDATE OVERDRAFT LIMIT
(new limit 3, date 4, time 3, MAC2 4) checks the issuer's MAC2, writes the new limit, the
balance and the online counter + 1 with the proof and the log record (type 07, amount 0, the
new limit in the record's overdraft field) in write 1 of
:meth:`~svcard.card.iep.Iep.commit_value`, and answers the TAC.
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
from .session import Session, online_key

if TYPE_CHECKING:
    from ..iep import Iep


def initialize_for_update(iep: Iep, cmd: CommandAPDU) -> bytes:
    """INITIALIZE FOR UPDATE: open an overdraft-limit session on the ED."""
    need_data(cmd, P.InitForUpdateData.sizeof())
    req = P.InitForUpdateData.parse(cmd.data)
    purse = iep.purse_for(cmd.p2)
    random = iep.new_random()
    s = iep.state
    key = online_key(iep, cmd, s.update_keys, req.key_index, purse)
    counter = purse.online_counter
    sk = crypto.load_session_key(key.key, random, counter)
    mac1 = crypto.mac(sk, crypto.update_mac1_input(
        purse.balance, purse.overdraft_limit, P.TYPE_OVERDRAFT_UPDATE, req.terminal_id))
    iep.session = Session(cmd.p1, cmd.p2, P.TYPE_OVERDRAFT_UPDATE, key, 0, req.terminal_id,
                          random, counter, purse.balance, sk)
    return P.InitForUpdateAnswer.build({
        "balance": purse.balance, "online_counter": counter,
        "overdraft_limit": purse.overdraft_limit, "key_version": key.version,
        "algorithm_id": key.algorithm, "random": random, "mac1": mac1})


def update_overdraft_limit(iep: Iep, cmd: CommandAPDU) -> bytes:
    """UPDATE OVERDRAFT LIMIT: a right MAC2 sets the new limit and answers the TAC."""
    session = iep.take_session()
    if cmd.p1 != 0 or cmd.p2 != 0:
        raise CardError(SW.WRONG_P1P2)
    if session is None or session.kind != P.INIT_UPDATE:
        raise CardError(SW.CONDITIONS_NOT_SATISFIED)
    need_data(cmd, P.UpdateOverdraftData.sizeof())
    req = P.UpdateOverdraftData.parse(cmd.data)
    if not (P.valid_date(req.date) and P.valid_time(req.time)):
        raise CardError(SW.INCORRECT_DATA)
    mac2 = crypto.mac(session.session_key, crypto.update_mac2_input(
        req.new_limit, session.txn_type, session.terminal_id, req.date, req.time))
    if not hmac.compare_digest(mac2, req.mac2):
        raise mac_failed(iep, session)
    purse = iep.state.ed
    new_balance = session.balance + req.new_limit - purse.overdraft_limit
    if new_balance < 0:
        raise CardError(SW.INSUFFICIENT_FUNDS)
    if new_balance > 0xFFFFFFFF:
        raise CardError(SW.INCORRECT_DATA)
    mac_ok(iep.state, session)
    tac = crypto.tac(iep.state.tac_key, crypto.update_tac_input(
        new_balance, session.counter, req.new_limit, session.txn_type, session.terminal_id,
        req.date, req.time))
    purse.overdraft_limit = req.new_limit      # persisted in write 1, with the balance
    record = log_record(session, purse, req.date, req.time)
    proof = Proof(session.txn_type, session.counter, req.mac2, tac)
    iep.commit_value(purse, new_balance, "online_counter", proof, record)
    return tac
