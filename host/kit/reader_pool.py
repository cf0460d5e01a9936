"""A pool of security modules behind readers (PSAMs, load HSMs): one command sequence per
module at a time.

Idle modules wait in an ``asyncio.Queue``; a transaction takes one (or gives up after a
timeout: the server then answers 503 with Retry-After). Each module has its own thread
(:class:`Worker`), so its blocking reader calls never run concurrently and never block the event
loop.

Hand-offs between the loop and a thread are a server's dearest small cost when it is pinned to
one CPU (each wakes a thread, each answer wakes the loop): :class:`Worker` is a one-thread
executor without the pool's bookkeeping, and :func:`handed_back` brings a thread's results to
the loop through one inbox per loop, so results finished together wake the loop once.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

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
    executor: Worker = field(repr=False)


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
        return await handed_back(member.executor.submit(fn, member.reader))

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


def executor(name: str) -> Worker:
    return Worker(name)


_Item = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]
_workers: weakref.WeakKeyDictionary[threading.Thread, queue.SimpleQueue[_Item | None]] = \
    weakref.WeakKeyDictionary()


def _at_exit() -> None:
    """As for a ThreadPoolExecutor: at interpreter exit each worker finishes what it was given
    (a PSAM's write is never cut off by the exit), then ends."""
    live = list(_workers.items())
    for _, calls in live:
        calls.put(None)
    for thread, _ in live:
        thread.join()


getattr(threading, "_register_atexit", lambda fn: None)(_at_exit)


class Worker(Executor):
    """One thread running the calls given to it in turn (a ``ThreadPoolExecutor(1)`` without
    its locks and thread accounting: ~11 us less a round trip on a busy pinned CPU)."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._shut = False
        self._thread = threading.Thread(target=_work, args=(self._calls,), name=name)
        self._thread.start()
        _workers[self._thread] = self._calls
        weakref.finalize(self, self._calls.put, None)   # the thread ends with its worker

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if self._shut:
            raise RuntimeError("cannot schedule new futures after shutdown")
        future: Future[T] = Future()
        self._calls.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if not self._shut:
            self._shut = True
            self._calls.put(None)
        if wait and self._thread is not threading.current_thread():
            self._thread.join()


def _work(calls: queue.SimpleQueue[_Item | None]) -> None:
    while (item := calls.get()) is not None:
        future, fn, args, kwargs = item
        if not future.set_running_or_notify_cancel():
            continue
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)
        del item, future, fn, args, kwargs   # nothing of a call outlives it here
    with contextlib.suppress(queue.Empty):   # given after shutdown began: refused
        while (item := calls.get_nowait()) is not None:
            if item[0].set_running_or_notify_cancel():
                item[0].set_exception(RuntimeError("the worker has been shut down"))


class _Inbox:
    """Results finished in threads, waiting for the loop: only the first of a batch wakes it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.waiting: list[tuple[asyncio.Future[Any], Future[Any]]] = []

    def put(self, mine: asyncio.Future[Any], done: Future[Any]) -> None:
        with self.lock:
            self.waiting.append((mine, done))
            first = len(self.waiting) == 1
        if first:
            held = getattr(_held, "inboxes", None)
            if held is None:
                self.wake()
            else:   # inside one_wake(): woken at its end
                held[self] = None

    def wake(self) -> None:
        with contextlib.suppress(RuntimeError):   # the loop closed: nobody waits
            self.loop.call_soon_threadsafe(self.deliver)

    def deliver(self) -> None:
        with self.lock:
            ready, self.waiting = self.waiting, []
        for mine, done in ready:
            if mine.done():
                continue
            if done.cancelled():
                mine.cancel()
            elif (exc := done.exception()) is not None:
                if isinstance(exc, StopIteration):   # no Future takes it: the rest would hang
                    exc = RuntimeError(f"a thread's call raised StopIteration: {exc}")
                mine.set_exception(exc)
            else:
                mine.set_result(done.result())


_held = threading.local()   # .inboxes: those to wake when this thread's one_wake() ends


@contextlib.contextmanager
def one_wake() -> Iterator[None]:
    """Results handed back in this thread inside the block wake each loop once, at its end
    (not once each: every wake of a loop pinned with this thread to one CPU costs switches)."""
    if getattr(_held, "inboxes", None) is not None:
        yield
        return
    held: dict[_Inbox, None] = {}
    _held.inboxes = held
    try:
        yield
    finally:
        _held.inboxes = None
        for inbox in held:
            inbox.wake()


_inboxes: dict[asyncio.AbstractEventLoop, _Inbox] = {}
_inboxes_lock = threading.Lock()


def handed_back(done: Future[T]) -> asyncio.Future[T]:
    """``done`` (a thread's future) as an awaitable of the running loop, its result brought
    back through the loop's inbox; cancelling the awaitable cancels ``done`` if not begun."""
    loop = asyncio.get_running_loop()
    inbox = _inboxes.get(loop)
    if inbox is None:
        with _inboxes_lock:
            for old in [old for old in _inboxes if old.is_closed()]:
                del _inboxes[old]
            inbox = _inboxes.setdefault(loop, _Inbox(loop))
    mine: asyncio.Future[T] = loop.create_future()
    mine.add_done_callback(lambda f: done.cancel() if f.cancelled() else None)
    done.add_done_callback(lambda f: inbox.put(mine, f))
    return mine
