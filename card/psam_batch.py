"""The PSAM's batch group (svcard extensions, CLA 80): per-issuer totals of the open batch
(``80 7A``), reading a batch record (``80 7C``) and closing the batch (``80 7E``), whose MAC
under the PSAM's batch key lets clearing check it. Kept beside card/psam.py, which mixes
:class:`BatchCommands` into the :class:`~svcard.card.psam.Psam`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..protocols import crypto
from ..protocols import purse as P
from ..protocols import sw as SW
from ..protocols.apdu import CommandAPDU
from .runtime import CardError

if TYPE_CHECKING:
    from .psam import PsamState, Records


def batch_mac(batch_key: bytes, header: bytes, records: Iterable[bytes]) -> bytes:
    """The MAC that closes a batch: 3DES CBC-MAC over the header and every record."""
    return crypto.cbc_mac(batch_key, header + b"".join(records))


class BatchCommands:
    """The batch commands, for a class holding a PSAM ``state`` and its ``persist``."""

    state: PsamState
    persist: Callable[[], None]

    def totals(self) -> dict[bytes, tuple[int, int]]:
        out: dict[bytes, tuple[int, int]] = {}
        for raw in self.state.records:
            rec = P.PsamRecord.parse(raw)
            count, amount = out.get(rec.issuer_id, (0, 0))
            out[rec.issuer_id] = (count + 1, amount + rec.amount)
        return out

    def _totals(self, cmd: CommandAPDU) -> bytes:
        if cmd.p1 or cmd.p2:
            raise CardError(SW.WRONG_P1P2)
        if cmd.data:
            raise CardError(SW.WRONG_LENGTH)
        return b"".join(P.PsamTotal.build({"issuer_id": i, "count": c, "amount": a})
                        for i, (c, a) in sorted(self.totals().items()))

    def _read_batch_record(self, cmd: CommandAPDU) -> bytes:
        if cmd.p1 or cmd.p2:
            raise CardError(SW.WRONG_P1P2)
        if len(cmd.data) != 5:
            raise CardError(SW.WRONG_LENGTH)
        req = P.ReadBatchRecordData.parse(cmd.data)
        if req.batch not in (0, 1):
            raise CardError(SW.INCORRECT_DATA)
        records = self.state.records if req.batch == 0 else self.state.closed_records
        if req.index >= len(records):
            raise CardError(SW.RECORD_NOT_FOUND)
        return records[int(req.index)]

    def _batch_answer(self, number: int, records: Records) -> bytes:
        s = self.state
        total = sum(P.PsamRecord.parse(r).amount for r in records)
        header = P.BatchHeader.build({"terminal_id": s.terminal_id, "batch_number": number,
                                      "record_count": len(records), "total_amount": total})
        return header + batch_mac(s.batch_key, header, records)

    def _close_batch(self, cmd: CommandAPDU) -> bytes:
        if cmd.p1 not in (0, 1) or cmd.p2:
            raise CardError(SW.WRONG_P1P2)
        if cmd.data:
            raise CardError(SW.WRONG_LENGTH)
        s = self.state
        if cmd.p1 == 1:  # answer the last closed batch again (its answer may have been lost)
            if s.batch_number == 1:
                raise CardError(SW.RECORD_NOT_FOUND)
            return self._batch_answer(s.batch_number - 1, s.closed_records)
        answer = self._batch_answer(s.batch_number, s.records)
        s.closed_records = s.records
        s.records = type(s.records)()
        s.batch_number += 1
        self.persist()
        return answer
