"""A pool of security modules behind readers (PSAMs, load HSMs): one command sequence per
module at a time.

Idle modules wait in an ``asyncio.Queue``; a transaction takes one (or gives up after a
timeout: the server then answers 503 with Retry-After). Each module has its own single-thread
executor, so its blocking reader calls never run concurrently and never block the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ...reader import Reader

T = TypeVar("T")


class PoolExhausted(Exception):
    """No module became free in time."""


class PoolError(ValueError):
    """The modules given do not make a pool (e.g. two PSAMs with one serial); the message is
    one line naming the readers and what they share or differ in. The command line maps it to
    exit 3."""


@dataclass
class Pooled:
    index: int
    reader: Reader
    executor: ThreadPoolExecutor = field(repr=False)


M = TypeVar("M", bound=Pooled)


class ReaderPool(Generic[M]):
    """Subclasses say how a module is opened (:meth:`open_member`, run on its own thread)."""

    def __init__(self, members: list[M]) -> None:
        if not members:
            raise ValueError("a pool needs at least one module")
        self.members = members
        self._idle: asyncio.Queue[M] | None = None

    def open_member(self, member: M) -> None:
        member.reader.connect()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(m.executor, self.open_member, m)
                               for m in self.members))
        self._idle = asyncio.Queue()
        for m in self.members:
            self._idle.put_nowait(m)

    @property
    def idle(self) -> int:
        return self._idle.qsize() if self._idle else 0

    async def acquire(self, timeout: float) -> M:
        assert self._idle is not None, "start the pool first"
        try:
            return await asyncio.wait_for(self._idle.get(), timeout)
        except TimeoutError:
            raise PoolExhausted(f"none free within {timeout:g} s") from None

    def release(self, member: M) -> None:
        assert self._idle is not None
        self._idle.put_nowait(member)

    async def run(self, member: M, fn: Callable[[Reader], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(member.executor, fn, member.reader)

    async def run_any(self, fn: Callable[[Reader], T], timeout: float) -> T:
        """Take a free module, run ``fn`` on its reader, give it back."""
        member = await self.acquire(timeout)
        try:
            return await self.run(member, fn)
        finally:
            self.release(member)

    def close(self) -> None:
        for m in self.members:
            try:
                m.executor.submit(m.reader.disconnect).result(timeout=10)
            finally:
                m.executor.shutdown(wait=False)


def executor(name: str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix=name)
