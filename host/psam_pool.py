"""A pool of PSAMs for the payment server: one transaction per PSAM at a time.

Idle PSAMs wait in an ``asyncio.Queue``; a transaction takes one (or gives up after a timeout:
the server then answers 503 with Retry-After). Each PSAM has its own single-thread executor, so
its blocking reader calls never run concurrently and never block the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from svcard.host import apdus
from svcard.host.terminal import call
from svcard.protocols import purse as P
from svcard.reader import Reader

T = TypeVar("T")


class PoolExhausted(Exception):
    """No PSAM became free in time."""


@dataclass
class PooledPsam:
    index: int
    reader: Reader
    executor: ThreadPoolExecutor = field(repr=False)
    psam_id: bytes = b""
    terminal_id: bytes = b""
    currency_code: int | None = None


class PsamPool:
    def __init__(self, readers: list[Reader], *, psam_aid: bytes = P.DEFAULT_PSAM_AID) -> None:
        if not readers:
            raise ValueError("a payment server needs at least one PSAM")
        self.psams = [PooledPsam(i, r, ThreadPoolExecutor(1, thread_name_prefix=f"psam{i}"))
                      for i, r in enumerate(readers)]
        self.psam_aid = psam_aid
        self._idle: asyncio.Queue[PooledPsam] | None = None

    def _open(self, psam: PooledPsam) -> None:
        psam.reader.connect()
        fci = P.Fci.parse(call(psam.reader, apdus.select(self.psam_aid), "SELECT PSAM"))
        psam.currency_code = fci.currency_code
        psam.terminal_id = call(psam.reader, apdus.read_binary(P.SFI_PSAM_TERMINAL_ID, 6),
                                "READ TERMINAL ID")
        psam.psam_id = call(psam.reader, apdus.read_binary(P.SFI_PUBLIC_DATA, 10),
                            "READ PSAM SERIAL")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(p.executor, self._open, p)
                               for p in self.psams))
        ids = {p.terminal_id for p in self.psams}
        if len(ids) != 1:
            raise ValueError("every PSAM of a pool must have the same terminal id (the card's "
                             "INITIALIZE names it before the PSAM is chosen); found "
                             + ", ".join(sorted(i.hex() for i in ids)))
        serials = [p.psam_id for p in self.psams]
        if len(set(serials)) != len(serials):
            raise ValueError("two PSAMs of the pool have the same serial")
        self._idle = asyncio.Queue()
        for p in self.psams:
            self._idle.put_nowait(p)

    @property
    def terminal_id(self) -> bytes:
        return self.psams[0].terminal_id

    @property
    def idle(self) -> int:
        return self._idle.qsize() if self._idle else 0

    async def acquire(self, timeout: float) -> PooledPsam:
        assert self._idle is not None, "start the pool first"
        try:
            return await asyncio.wait_for(self._idle.get(), timeout)
        except TimeoutError:
            raise PoolExhausted(f"no PSAM free within {timeout:g} s") from None

    async def acquire_this(self, psam: PooledPsam, timeout: float) -> None:
        """Take one given PSAM out of the pool (waiting for its transaction to end)."""
        assert self._idle is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            taken = await self.acquire(max(deadline - asyncio.get_running_loop().time(), 0.01))
            if taken is psam:
                return
            self.release(taken)
            await asyncio.sleep(0.005)

    def release(self, psam: PooledPsam) -> None:
        assert self._idle is not None
        self._idle.put_nowait(psam)

    async def run(self, psam: PooledPsam, fn: Callable[[Reader], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(psam.executor, fn, psam.reader)

    def close(self) -> None:
        for p in self.psams:
            try:
                p.executor.submit(p.reader.disconnect).result(timeout=10)
            finally:
                p.executor.shutdown(wait=False)
