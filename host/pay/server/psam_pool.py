"""A pool of PSAMs for the payment server: one transaction per PSAM at a time (see
:mod:`svcard.host.kit.reader_pool`).

All PSAMs of a pool share the terminal id (the card's INITIALIZE names it before a PSAM is
chosen) and each has its own serial (batches, TTNs and clearing's records are per PSAM); a
shared POS (seed 001 FIG. 4B) has one terminal id per merchant, named in the configuration,
and a PSAM of the terminal the order names serves each draw. A pool that breaks a rule is
refused with a :class:`~svcard.host.kit.reader_pool.PoolError` naming the readers: when the
pool starts, and before that by :func:`check_psams`, which the command line runs before the
server is started."""

from __future__ import annotations

import asyncio
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


def check_pool(psams: list[PsamIdentity], terminals: frozenset[bytes] = frozenset()) -> None:
    """Refuse (:class:`PoolError`) PSAMs that share a serial, or differ in terminal id. With
    ``terminals`` (a shared POS, seed 001 FIG. 4B: the terminal each merchant's payments are
    made on), every PSAM must be of one of them and each of them needs a PSAM."""
    if not psams:
        return
    if terminals:
        for psam in psams:
            if psam.terminal_id not in terminals:
                raise PoolError(f"PSAM {psam.reader} has terminal id "
                                f"{psam.terminal_id.hex().upper()}, which no merchant names")
        for missing in sorted(terminals - {p.terminal_id for p in psams}):
            raise PoolError(f"no PSAM has the terminal id {missing.hex().upper()} a merchant "
                            "names")
    first = psams[0]
    for other in psams[1:] if not terminals else ():
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


def check_psams(readers: Iterable[Reader], psam_aid: bytes = P.DEFAULT_PSAM_AID,
                terminals: frozenset[bytes] = frozenset()) -> None:
    """Before a server starts: connect each reader in turn (``readers`` may be a generator
    that opens them one at a time), read its PSAM's identity, disconnect; then
    :func:`check_pool`."""
    found = []
    for reader in readers:
        with reader:
            found.append(identify(reader, psam_aid))
    check_pool(found, terminals)


@dataclass
class PooledPsam(Pooled):
    psam_id: bytes = b""
    terminal_id: bytes = b""
    currency_code: int | None = None


class PsamPool(ReaderPool[PooledPsam]):
    """With ``terminals`` (several: a shared POS, seed 001 FIG. 4B), the PSAMs of each
    terminal id wait in a queue of their own, and :meth:`acquire_for` takes one of the
    terminal a merchant's order names."""

    def __init__(self, readers: list[Reader], *, psam_aid: bytes = P.DEFAULT_PSAM_AID,
                 terminals: frozenset[bytes] = frozenset()) -> None:
        super().__init__([PooledPsam(i, r, executor(f"psam{i}"))
                          for i, r in enumerate(readers)])
        self.psam_aid = psam_aid
        self.terminals = terminals
        self._queues: dict[bytes, asyncio.Queue[PooledPsam]] = {}
        self._turn = 0   # the terminal queue :meth:`acquire` tries first

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
                    for p in self.psams], self.terminals)
        if len(self.terminals) > 1:
            self._queues = {t: asyncio.Queue() for t in self.terminals}
            for m in self.psams:
                self._queues[m.terminal_id].put_nowait(m)
            self._idle = asyncio.Queue()     # every PSAM waits in its terminal's queue

    @property
    def terminal_id(self) -> bytes:
        return self.psams[0].terminal_id

    @property
    def terminal_ids(self) -> frozenset[bytes]:
        return frozenset(p.terminal_id for p in self.psams)

    @property
    def idle(self) -> int:
        return super().idle + sum(q.qsize() for q in self._queues.values())

    async def acquire(self, timeout: float) -> PooledPsam:
        """A free PSAM of any terminal (the health check's probe); on a shared POS the
        terminals' queues are tried in turn, so successive takes see every free PSAM, and
        none waits: :class:`PoolExhausted` at once."""
        queues = list(self._queues.values())
        if not queues:
            return await super().acquire(timeout)
        for i in range(len(queues)):
            queue = queues[(self._turn + i) % len(queues)]
            if not queue.empty():
                self._turn = (self._turn + i + 1) % len(queues)
                return queue.get_nowait()
        raise PoolExhausted("no PSAM of any terminal is free")

    async def acquire_for(self, terminal_id: bytes, timeout: float) -> PooledPsam:
        """A free PSAM of ``terminal_id`` (the pool's only terminal: :meth:`acquire`)."""
        if not self._queues:   # (self: a node's pool checks its leases there)
            return await self.acquire(timeout)
        queue = self._queues.get(terminal_id)
        if queue is None:   # never another terminal's PSAM
            raise PoolExhausted(f"no PSAM of terminal {terminal_id.hex().upper()}")
        try:
            return await asyncio.wait_for(queue.get(), timeout)
        except TimeoutError:
            raise PoolExhausted(f"none of terminal {terminal_id.hex().upper()} free within "
                                f"{timeout:g} s") from None

    def release(self, member: PooledPsam) -> None:
        queue = self._queues.get(member.terminal_id)
        if queue is None:
            super().release(member)
        else:
            queue.put_nowait(member)
