"""A pool of PSAMs for the payment server: one transaction per PSAM at a time (see
:mod:`svcard.host.kit.reader_pool`). All PSAMs of a pool share the terminal id."""

from __future__ import annotations

from dataclasses import dataclass

from ....protocols import purse as P
from ....reader import Reader
from ...kit.reader_pool import Pooled, PoolExhausted, ReaderPool, executor
from ...terminal import apdus
from ...terminal.purse import call

__all__ = ["PoolExhausted", "PooledPsam", "PsamPool"]


@dataclass
class PooledPsam(Pooled):
    psam_id: bytes = b""
    terminal_id: bytes = b""
    currency_code: int | None = None


class PsamPool(ReaderPool[PooledPsam]):
    def __init__(self, readers: list[Reader], *, psam_aid: bytes = P.DEFAULT_PSAM_AID) -> None:
        super().__init__([PooledPsam(i, r, executor(f"psam{i}"))
                          for i, r in enumerate(readers)])
        self.psam_aid = psam_aid

    @property
    def psams(self) -> list[PooledPsam]:
        return self.members

    def open_member(self, psam: PooledPsam) -> None:
        psam.reader.connect()
        fci = P.Fci.parse(call(psam.reader, apdus.select(self.psam_aid), "SELECT PSAM"))
        psam.currency_code = fci.currency_code
        psam.terminal_id = call(psam.reader, apdus.read_binary(P.SFI_PSAM_TERMINAL_ID, 6),
                                "READ TERMINAL ID")
        psam.psam_id = call(psam.reader, apdus.read_binary(P.SFI_PUBLIC_DATA, 10),
                            "READ PSAM SERIAL")

    async def start(self) -> None:
        await super().start()
        ids = {p.terminal_id for p in self.psams}
        if len(ids) != 1:
            raise ValueError("every PSAM of a pool must have the same terminal id (the card's "
                             "INITIALIZE names it before the PSAM is chosen); found "
                             + ", ".join(sorted(i.hex() for i in ids)))
        serials = [p.psam_id for p in self.psams]
        if len(set(serials)) != len(serials):
            raise ValueError("two PSAMs of the pool have the same serial")

    @property
    def terminal_id(self) -> bytes:
        return self.psams[0].terminal_id
