"""A pool of PSAMs for the payment server: one transaction per PSAM at a time (see
:mod:`svcard.host.kit.reader_pool`).

All PSAMs of a pool share the terminal id (the card's INITIALIZE names it before a PSAM is
chosen) and each has its own serial (batches, TTNs and clearing's records are per PSAM). A pool
that breaks either rule is refused with a :class:`~svcard.host.kit.reader_pool.PoolError` naming
both readers: when the pool starts, and before that by :func:`check_psams`, which the command
line runs before the server is started."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ....protocols import purse as P
from ....reader import Reader
from ...kit.reader_pool import Pooled, PoolError, PoolExhausted, ReaderPool, executor
from ...terminal import apdus
from ...terminal.purse import call

__all__ = ["PoolError", "PoolExhausted", "PooledPsam", "PsamIdentity", "PsamPool",
           "check_psams"]


@dataclass(frozen=True)
class PsamIdentity:
    """What a PSAM says of itself, and the reader it is in (its spec, e.g. virtual:FILE)."""

    reader: str
    terminal_id: bytes
    psam_id: bytes
    currency_code: int | None


def identify(reader: Reader, psam_aid: bytes = P.DEFAULT_PSAM_AID) -> PsamIdentity:
    """Select the PSAM in the connected ``reader`` and read its terminal id and serial."""
    fci = P.Fci.parse(call(reader, apdus.select(psam_aid), "SELECT PSAM"))
    terminal_id = call(reader, apdus.read_binary(P.SFI_PSAM_TERMINAL_ID, 6), "READ TERMINAL ID")
    psam_id = call(reader, apdus.read_binary(P.SFI_PUBLIC_DATA, 10), "READ PSAM SERIAL")
    return PsamIdentity(reader.name, terminal_id, psam_id, fci.currency_code)


def check_pool(psams: list[PsamIdentity]) -> None:
    """Refuse (:class:`PoolError`) PSAMs that differ in terminal id or share a serial."""
    if not psams:
        return
    first = psams[0]
    for other in psams[1:]:
        if other.terminal_id != first.terminal_id:
            raise PoolError(
                f"PSAMs {first.reader} (terminal id {first.terminal_id.hex().upper()}) and "
                f"{other.reader} (terminal id {other.terminal_id.hex().upper()}) differ in "
                "terminal id: every PSAM of a pool must have the same one (the card's "
                "INITIALIZE names it before a PSAM is chosen)")
    seen: dict[bytes, PsamIdentity] = {}
    for psam in psams:
        if psam.psam_id in seen:
            raise PoolError(
                f"PSAMs {seen[psam.psam_id].reader} and {psam.reader} have the same serial "
                f"{psam.psam_id.hex().upper()}: each PSAM of a pool needs its own (make them "
                "with svcard card new PROFILE --set psam_serial=...)")
        seen[psam.psam_id] = psam


def check_psams(readers: Iterable[Reader], psam_aid: bytes = P.DEFAULT_PSAM_AID) -> None:
    """Before a server starts: connect each reader in turn (``readers`` may be a generator
    that opens them one at a time), read its PSAM's identity, disconnect; then
    :func:`check_pool`."""
    found = []
    for reader in readers:
        with reader:
            found.append(identify(reader, psam_aid))
    check_pool(found)


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
        found = identify(psam.reader, self.psam_aid)
        psam.currency_code = found.currency_code
        psam.terminal_id = found.terminal_id
        psam.psam_id = found.psam_id

    async def start(self) -> None:
        await super().start()
        check_pool([PsamIdentity(p.reader.name, p.terminal_id, p.psam_id, p.currency_code)
                    for p in self.psams])

    @property
    def terminal_id(self) -> bytes:
        return self.psams[0].terminal_id
