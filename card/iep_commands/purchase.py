"""Paying with the IEP purse: INITIALIZE FOR PURCHASE (``80 50 01 P2``) or FOR CASH WITHDRAWAL
(``80 50 02 01``, the ED only), then DEBIT FOR PURCHASE / CASH WITHDRAWAL (``80 54 01 00``).

INITIALIZE answers the balance, the offline counter and the card's random; DEBIT takes the
PSAM's terminal transaction number and MAC1, debits the purse and answers TAC and MAC2. The
composite (CAPP) purchase, when it comes, gets its own module beside this one
(``capp_purchase.py``) and its own route in the Iep's INITIALIZE table.
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
from . import queries
from .lockout import check_not_locked, mac_failed, mac_ok
from .records import Proof, log_record
from .session import MAX_COUNTER, Session, read_initialize

if TYPE_CHECKING:
    from ..iep import Iep

PURCHASE_TYPES = {P.PURSE_ED: P.TYPE_ED_PURCHASE, P.PURSE_EP: P.TYPE_EP_PURCHASE}


def initialize_for_purchase(iep: Iep, cmd: CommandAPDU) -> bytes:
    """INITIALIZE FOR PURCHASE or CASH WITHDRAWAL (P1): open a debit session on the purse P2
    names."""
    req, purse, random = read_initialize(iep, cmd)
    s = iep.state
    key = s.purchase_keys.get(req.key_index)
    if key is None:
        raise CardError(SW.KEY_INDEX_NOT_SUPPORTED)
    check_not_locked(s, cmd.p1, key)
    if purse.offline_counter >= MAX_COUNTER:
        raise CardError(SW.COUNTER_AT_MAXIMUM)
    if req.amount > purse.balance:
        raise CardError(SW.INSUFFICIENT_FUNDS)
    txn_type = (P.TYPE_ED_CASH_WITHDRAWAL if cmd.p1 == P.INIT_CASH_WITHDRAWAL
                else PURCHASE_TYPES[cmd.p2])
    iep.session = Session(cmd.p1, cmd.p2, txn_type, key, req.amount, req.terminal_id, random,
                          purse.offline_counter, purse.balance)
    return P.InitForPurchaseAnswer.build({
        "balance": purse.balance, "offline_counter": purse.offline_counter,
        "overdraft_limit": purse.overdraft_limit, "key_version": key.version,
        "algorithm_id": key.algorithm, "random": random})


def debit(iep: Iep, cmd: CommandAPDU) -> bytes:
    """DEBIT FOR PURCHASE / CASH WITHDRAWAL: terminal transaction number, date, time and MAC1;
    a right MAC1 debits the purse (both writes of :meth:`~svcard.card.iep.Iep.commit_value`)
    and answers TAC and MAC2."""
    session = iep.take_session()
    if cmd.p1 != 0x01 or cmd.p2 != 0x00:
        raise CardError(SW.WRONG_P1P2)
    if session is None or session.kind == P.INIT_LOAD:
        raise CardError(SW.CONDITIONS_NOT_SATISFIED)
    need_data(cmd, 15)
    req = P.DebitForPurchaseData.parse(cmd.data)
    if not (P.valid_date(req.date) and P.valid_time(req.time)):
        raise CardError(SW.INCORRECT_DATA)
    scheme = M.scheme(iep.state.mac_scheme)
    sk = M.purchase_session_key(scheme, session.key.key, session.random, session.counter,
                                req.terminal_txn_number)
    mac1 = M.purchase_mac1(scheme, sk, session.amount, session.txn_type, session.terminal_id,
                           req.date, req.time, iep.state.uid if scheme.uid_size else None)
    if not hmac.compare_digest(mac1, req.mac1):
        raise mac_failed(iep, session)
    mac_ok(iep.state, session)
    purse = iep.state.ed if session.purse_id == P.PURSE_ED else iep.state.ep
    mac2 = M.purchase_mac2(scheme, sk, session.amount)
    tac = crypto.tac(iep.state.tac_key, crypto.purchase_tac_input(
        session.amount, session.txn_type, session.terminal_id, req.terminal_txn_number,
        req.date, req.time))
    record = log_record(session, purse, req.date, req.time)
    proof = Proof(session.txn_type, session.counter, mac2, tac)
    iep.commit_value(purse, session.balance - session.amount, "offline_counter", proof,
                     record)
    return tac + mac2


def get_data(iep: Iep, cmd: CommandAPDU) -> bytes:
    """GET DATA ``80 CA``: with P1 P2 ``00 00``, the card's UID (the "security authentication
    code" a MAC-scheme profile such as ``changsha-metro`` puts into MAC1; the terminal reads
    it before INITIALIZE and hands it to the PSAM); any other tag as
    :func:`~svcard.card.iep_commands.queries.get_data`. A card without a UID answers
    ``6A88`` to ``00 00``."""
    if cmd.p1 or cmd.p2:
        return queries.get_data(iep, cmd)
    uid = iep.state.uid
    if uid is None:
        raise CardError(SW.DATA_NOT_FOUND)
    if cmd.data:
        raise CardError(SW.WRONG_LENGTH)
    if cmd.le not in (None, 256, len(uid)):
        raise CardError(0x6C00 | len(uid))
    return uid
