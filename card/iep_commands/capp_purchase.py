"""The composite (CAPP) purchase: goods records written onto the card in one atomic step with a
debit of the EP purse (PBOC's 复合消费, transaction type 09).

1. INITIALIZE FOR CAPP PURCHASE ``80 50 03 02 0B`` (EP only): checked and answered exactly as
   INITIALIZE FOR PURCHASE (balance, offline counter, overdraft limit, key version, algorithm,
   random); the session it opens has transaction type 09 and an empty *cache*.
2. UPDATE CAPP DATA CACHE ``80 DC P1 P2 Lc record`` (any number, none at all too): P2 =
   SFI << 3 | mode, P1 a record number (mode ``100``) or a tag (mode ``000``), the data one
   record of the goods file (:mod:`svcard.card.goods`). A write the goods files accept
   (:meth:`~svcard.card.goods.GoodsFiles.check_write`) goes into the cache, in volatile memory
   only; the card answers ``9000`` and writes nothing. At most :data:`MAX_CACHED_RECORDS`
   records (``6A84`` past them). Outside a CAPP session: ``6985``. A refused write (its status
   word as ``check_write`` gives it) ends the session and drops the cache: the purchase is all
   or nothing, and the terminal starts again.
3. DEBIT FOR CAPP PURCHASE ``80 54 01 00 0F``: the same data and answer as DEBIT FOR PURCHASE
   (terminal transaction number, date, time, MAC1 in; TAC, MAC2 out), with type 09 in MAC1, the
   TAC and the log record. A right MAC1 writes the cached records together with the balance,
   counter, proof and pending log record in ONE image write (write 1 of
   :meth:`~svcard.card.iep.Iep.commit_value`), then the log (write 2).

2'. UPDATE CAPP DATA CACHE with secure messaging ``84 DE P1 P2 Lc record || MAC``: the same P1,
   P2 and record, followed by a 4-byte MAC under the card's goods key over ``84 DE P1 P2 Lc``
   and the record, whose ICV is the session's random and offline counter
   (:func:`svcard.protocols.crypto.capp_update_mac`): the record is bound to its issuer's key
   and to THIS session. A wrong MAC answers ``6988``, is counted against the goods key (as the
   secure record writes count it) and ends the session. Goods files take only this form unless
   the card's ``capp_plain_update`` lets the plain ``80 DC`` in (``6982`` otherwise).

The cache lives in the session, so whatever ends the session drops it unwritten: any command
other than 80 DC and the DEBIT, a wrong MAC1 (``9302``), a refused DEBIT, a reselection, a reset
or a power cut. Nothing of the cache reaches the image without a DEBIT whose MAC1 is right.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...protocols import crypto
from ...protocols import mac_schemes as M
from ...protocols import purse as P
from ...protocols import sw as SW
from ...protocols.apdu import CommandAPDU
from ..goods import NOT_ENOUGH_MEMORY, Write
from ..runtime import CardError, need_data
from . import purchase
from .lockout import KEY_LOCKED, KIND_GOODS, count_failure, mac_failed, mac_ok
from .records import Proof, log_record
from .session import Session

if TYPE_CHECKING:
    from ..iep import Iep

MAX_CACHED_RECORDS = 8   # distinct records one composite purchase may write
CLA_SM_CAPP = 0x84       # PBOC: proprietary class with secure messaging
INS_UPDATE_CAPP_DATA_CACHE_SM = 0xDE
SM_DATA_INCORRECT = 0x6988


@dataclass(slots=True)
class CappSession(Session):
    """A CAPP purchase waiting for its DEBIT, with the records cached for it (volatile)."""

    cache: dict[tuple[int, int], bytes] = field(default_factory=dict)
    goods_mac_ok: bool = False   # a record's MAC verified under the goods key (84 DE)

    def writes(self) -> tuple[Write, ...]:
        return tuple((sfi, n, data) for (sfi, n), data in self.cache.items())


def initialize_for_capp_purchase(iep: Iep, cmd: CommandAPDU) -> bytes:
    """INITIALIZE FOR CAPP PURCHASE: INITIALIZE FOR PURCHASE's checks and answer; the session
    becomes a :class:`CappSession` of type 09."""
    answer = purchase.initialize_for_purchase(iep, cmd)
    o = iep.session
    assert o is not None
    iep.session = CappSession(o.kind, o.purse_id, P.TYPE_COMPOSITE_PURCHASE, o.key, o.amount,
                              o.terminal_id, o.random, o.counter, o.balance)
    return answer


def update_capp_data_cache(iep: Iep, cmd: CommandAPDU) -> bytes:
    """UPDATE CAPP DATA CACHE ``80 DC``: cache one record write for the CAPP session's DEBIT,
    if the card takes goods records without a MAC (``capp_plain_update``; else ``6982``)."""
    session = _capp_session(iep)
    if not iep.state.capp_plain_update:
        iep.session = None
        raise CardError(SW.SECURITY_STATUS)
    _cache(iep, session, cmd.p1, cmd.p2, bytes(cmd.data))
    return b""


def update_capp_data_cache_sm(iep: Iep, cmd: CommandAPDU) -> bytes:
    """UPDATE CAPP DATA CACHE with secure messaging ``84 DE``: the record is cached only if
    its MAC, under the goods key and chained from this session, is right."""
    session = _capp_session(iep)
    try:
        if cmd.extended or len(cmd.data) <= crypto.SM_MAC_SIZE:
            raise CardError(SW.WRONG_LENGTH)
        state = iep.state
        key = state.goods_key
        if key is None:
            raise CardError(SW.SECURITY_STATUS)
        if state.goods_mac_failures.get(key.index, 0) >= state.mac_failure_limit:
            raise CardError(KEY_LOCKED)
        record, mac = bytes(cmd.data[:-crypto.SM_MAC_SIZE]), cmd.data[-crypto.SM_MAC_SIZE:]
        expected = crypto.capp_update_mac(key.key, session.random, session.counter, cmd.p1,
                                          cmd.p2, record)
        if not hmac.compare_digest(expected, mac):
            count_failure(iep, KIND_GOODS, key)
            raise CardError(SM_DATA_INCORRECT)
    except CardError:
        iep.session = None
        raise
    _cache(iep, session, cmd.p1, cmd.p2, record)
    session.goods_mac_ok = True
    return b""


def _capp_session(iep: Iep) -> CappSession:
    session = iep.session
    if not isinstance(session, CappSession):
        iep.session = None
        raise CardError(SW.CONDITIONS_NOT_SATISFIED)
    return session


def _cache(iep: Iep, session: CappSession, p1: int, p2: int, record: bytes) -> None:
    """The goods files' checks of one write, then into the cache; a refusal ends the
    session."""
    try:
        sfi, mode = p2 >> 3, p2 & 0x07
        if sfi == 0:
            raise CardError(SW.WRONG_P1P2)
        number = iep.state.goods.check_write(sfi, p1, mode, record, session.cache)
        if (sfi, number) not in session.cache and len(session.cache) >= MAX_CACHED_RECORDS:
            raise CardError(NOT_ENOUGH_MEMORY)
    except CardError:
        iep.session = None
        raise
    session.cache[(sfi, number)] = record


def debit_for_capp_purchase(iep: Iep, cmd: CommandAPDU) -> bytes:
    """DEBIT FOR CAPP PURCHASE: MAC1 checked; the cached records, the debit, the proof and
    the pending log record in one image write; TAC and MAC2 answered."""
    session = iep.take_session()
    if cmd.p1 != P.DEBIT_FOR_PURCHASE or cmd.p2 != 0x00:
        raise CardError(SW.WRONG_P1P2)
    if not isinstance(session, CappSession):
        raise CardError(SW.CONDITIONS_NOT_SATISFIED)
    need_data(cmd, 15)
    req = P.DebitForPurchaseData.parse(cmd.data)
    if not (P.valid_date(req.date) and P.valid_time(req.time)):
        raise CardError(SW.INCORRECT_DATA)
    s = iep.state
    scheme = M.scheme(s.mac_scheme)
    sk = M.purchase_session_key(scheme, session.key.key, session.random, session.counter,
                                req.terminal_txn_number)
    mac1 = M.purchase_mac1(scheme, sk, session.amount, session.txn_type, session.terminal_id,
                           req.date, req.time, s.uid if scheme.uid_size else None)
    if not hmac.compare_digest(mac1, req.mac1):
        raise mac_failed(iep, session)
    mac_ok(s, session)
    if session.goods_mac_ok and s.goods_key is not None:   # written with the records
        s.goods_mac_failures.pop(s.goods_key.index, None)
    purse = s.ep
    mac2 = M.purchase_mac2(scheme, sk, session.amount)
    tac = crypto.tac(s.tac_key, crypto.purchase_tac_input(
        session.amount, session.txn_type, session.terminal_id, req.terminal_txn_number,
        req.date, req.time))
    record = log_record(session, purse, req.date, req.time)
    proof = Proof(session.txn_type, session.counter, mac2, tac)
    iep.commit_value(purse, session.balance - session.amount, "offline_counter", proof,
                     record, session.writes())
    return tac + mac2


def is_capp(session: Session | None) -> bool:
    return isinstance(session, CappSession)

