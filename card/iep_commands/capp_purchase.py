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
from .lockout import mac_failed, mac_ok
from .records import Proof, log_record
from .session import Session

if TYPE_CHECKING:
    from ..iep import Iep

MAX_CACHED_RECORDS = 8   # distinct records one composite purchase may write


@dataclass(slots=True)
class CappSession(Session):
    """A CAPP purchase waiting for its DEBIT, with the records cached for it (volatile)."""

    cache: dict[tuple[int, int], bytes] = field(default_factory=dict)

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
    """UPDATE CAPP DATA CACHE: cache one record write for the CAPP session's DEBIT."""
    session = iep.session
    if not isinstance(session, CappSession):
        iep.session = None
        raise CardError(SW.CONDITIONS_NOT_SATISFIED)
    try:
        sfi, mode = cmd.p2 >> 3, cmd.p2 & 0x07
        if sfi == 0:
            raise CardError(SW.WRONG_P1P2)
        number = iep.state.goods.check_write(sfi, cmd.p1, mode, cmd.data, session.cache)
        if (sfi, number) not in session.cache and len(session.cache) >= MAX_CACHED_RECORDS:
            raise CardError(NOT_ENOUGH_MEMORY)
    except CardError:
        iep.session = None
        raise
    session.cache[(sfi, number)] = bytes(cmd.data)
    return b""


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

