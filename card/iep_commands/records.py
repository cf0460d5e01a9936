"""What the IEP purse keeps of its value transactions, and the commands that read it back.

The cyclic log (EF 0x18, newest first, :data:`~svcard.protocols.purse.LOG_RECORDS` records kept)
answers READ RECORD; the proof of the last value transaction answers GET TRANSACTION PROVE. Both
are written by :meth:`~svcard.card.iep.Iep.commit_value`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...protocols import purse as P
from ...protocols import sw as SW
from ...protocols.apdu import CommandAPDU
from ..runtime import CardError, need_data

if TYPE_CHECKING:
    from ..iep import Iep, IepState, Purse
    from .session import Session


LOG_COUNTER_BEFORE = "before"   # the counter INITIALIZE answered (FMCOS 2.0's tables): default
LOG_COUNTER_AFTER = "after"     # the counter after the transaction's increment (seen on an FM1208)
LOG_COUNTER_CHOICES = (LOG_COUNTER_BEFORE, LOG_COUNTER_AFTER)


def log_counter_as(value: object) -> str:
    """The card profile's ``log_counter`` option, checked: ``"before"`` or ``"after"``."""
    if value not in LOG_COUNTER_CHOICES:
        raise ValueError('log_counter is "before" or "after"')
    return str(value)


@dataclass(frozen=True, slots=True)
class Proof:
    """What GET TRANSACTION PROVE answers for the last value transaction."""

    txn_type: int
    counter: int
    mac: bytes
    tac: bytes

    def to_json(self) -> dict[str, Any]:
        return {"txn_type": self.txn_type, "counter": self.counter, "mac": self.mac.hex(),
                "tac": self.tac.hex()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Proof:
        return cls(int(d["txn_type"]), int(d["counter"]), bytes.fromhex(d["mac"]),
                   bytes.fromhex(d["tac"]))


def log_record(session: Session, purse: Purse, date: bytes, time: bytes) -> bytes:
    """The log record of the session's transaction, completed at ``date`` ``time``. Its
    counter is the one INITIALIZE answered; a card whose ``log_counter`` is ``"after"`` writes
    the incremented one instead (:meth:`~svcard.card.iep.Iep.commit_value`)."""
    return P.LogRecord.build({
        "counter": session.counter, "overdraft_limit": purse.overdraft_limit,
        "amount": session.amount, "txn_type": session.txn_type,
        "terminal_id": session.terminal_id, "date": date, "time": time})


def append_log(state: IepState, record: bytes) -> None:
    """Put ``record`` first in the cyclic log; the oldest beyond the log's size go."""
    state.log.insert(0, record)
    del state.log[P.LOG_RECORDS:]


def get_transaction_prove(iep: Iep, cmd: CommandAPDU) -> bytes:
    """GET TRANSACTION PROVE ``80 5A 00 type 02 counter``: MAC and TAC of the last value
    transaction, if it has that type and counter (the counter INITIALIZE answered). For an
    unload the pair is the MAC2 accepted and MAC3; for an overdraft-limit update, MAC2 and TAC."""
    if cmd.p1 != 0 or cmd.p2 not in P.TYPE_NAMES:
        raise CardError(SW.WRONG_P1P2)
    need_data(cmd, 2)
    counter = int.from_bytes(cmd.data, "big")
    proof = iep.state.proof
    if proof is None or proof.txn_type != cmd.p2 or proof.counter != counter:
        raise CardError(SW.NO_SUCH_PROOF)
    return proof.mac + proof.tac


def read_record(iep: Iep, cmd: CommandAPDU) -> bytes:
    """READ RECORD ``00 B2 n P2``: with P2 ``C4`` record n of the log, 1 the newest; with P2
    ``SFI << 3 | 4`` record n of that goods file (:mod:`svcard.card.goods`)."""
    if cmd.p2 & 0x07 != 0x04 or cmd.p1 == 0:
        raise CardError(SW.WRONG_P1P2)
    if cmd.data:
        raise CardError(SW.WRONG_LENGTH)
    if cmd.p2 >> 3 != P.SFI_LOG:
        record = iep.state.goods.read(cmd.p2 >> 3, cmd.p1)
        if cmd.le is not None and cmd.le not in (len(record), 256):
            raise CardError(0x6C00 | len(record))
        return record
    if cmd.le is not None and cmd.le not in (P.LOG_RECORD_SIZE, 256):
        raise CardError(0x6C00 | P.LOG_RECORD_SIZE)
    log = iep.state.log
    if cmd.p1 > len(log):
        raise CardError(SW.RECORD_NOT_FOUND)
    return log[cmd.p1 - 1]
