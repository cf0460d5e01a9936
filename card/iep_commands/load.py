"""Loading the IEP purse: INITIALIZE FOR LOAD (``80 50 00 P2``) and CREDIT FOR LOAD
(``80 52 00 00``).

INITIALIZE FOR LOAD answers the balance, the online counter and MAC1 under the load session key
(the bank's S1); CREDIT FOR LOAD takes the bank's MAC2 (S2), credits the purse and answers the
TAC. Unload, when it comes, gets its own module beside this one (``unload.py``).
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from ...protocols import crypto
from ...protocols import mac_schemes as M
from ...protocols import purse as P
from ...protocols import sw as SW
from ...protocols.apdu import CommandAPDU
from ..runtime import CardError, need_data
from .lockout import mac_failed, mac_ok
from .records import Proof, log_record
from .session import Session, online_key, read_initialize

if TYPE_CHECKING:
    from ..iep import Iep

LOAD_TYPES = {P.PURSE_ED: P.TYPE_ED_LOAD, P.PURSE_EP: P.TYPE_EP_LOAD}


def initialize_for_load(iep: Iep, cmd: CommandAPDU) -> bytes:
    """INITIALIZE FOR LOAD: open a load session on the purse P2 names."""
    req, purse, random = read_initialize(iep, cmd)
    s = iep.state
    key = online_key(iep, cmd, s.load_keys, req.key_index, purse)
    if purse.balance + req.amount > s.balance_limit:
        raise CardError(SW.CONDITIONS_NOT_SATISFIED)
    txn_type = LOAD_TYPES[cmd.p2]
    counter = purse.online_counter
    scheme = M.scheme(s.mac_scheme)
    sk = M.load_session_key(scheme, key.key, random, counter)
    mac1 = M.load_mac1(scheme, sk, purse.balance, req.amount, txn_type, req.terminal_id)
    iep.session = Session(cmd.p1, cmd.p2, txn_type, key, req.amount, req.terminal_id, random,
                          counter, purse.balance, sk)
    return P.InitForLoadAnswer.build({
        "balance": purse.balance, "online_counter": purse.online_counter,
        "key_version": key.version, "algorithm_id": key.algorithm,
        "random": random, "mac1": mac1})


def credit_for_load(iep: Iep, cmd: CommandAPDU) -> bytes:
    """CREDIT FOR LOAD: date, time and MAC2; a right MAC2 credits the purse (both writes of
    :meth:`~svcard.card.iep.Iep.commit_value`) and answers the TAC."""
    session = iep.take_session()
    if cmd.p1 != 0 or cmd.p2 != 0:
        raise CardError(SW.WRONG_P1P2)
    if session is None or session.kind != P.INIT_LOAD:
        raise CardError(SW.CONDITIONS_NOT_SATISFIED)
    need_data(cmd, 11)
    req = P.CreditForLoadData.parse(cmd.data)
    if not (P.valid_date(req.date) and P.valid_time(req.time)):
        raise CardError(SW.INCORRECT_DATA)
    mac2 = M.load_mac2(M.scheme(iep.state.mac_scheme), session.session_key, session.amount,
                       session.txn_type, session.terminal_id, req.date, req.time)
    if not hmac.compare_digest(mac2, req.mac2):
        raise mac_failed(iep, session)
    mac_ok(iep.state, session)
    purse = iep.state.ed if session.purse_id == P.PURSE_ED else iep.state.ep
    new_balance = session.balance + session.amount
    tac = crypto.tac(iep.state.tac_key, crypto.load_tac_input(
        new_balance, session.counter, session.amount, session.txn_type,
        session.terminal_id, req.date, req.time))
    record = log_record(session, purse, req.date, req.time)
    proof = Proof(session.txn_type, session.counter, req.mac2, tac)
    iep.commit_value(purse, new_balance, "online_counter", proof, record)
    return tac
