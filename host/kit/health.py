"""``GET /v1/health``: whether a server can do its work, checked for real.

Each server names its dependencies as checks: its database (:func:`database_check`: one real
query on one of its tables) and, for the payment and load servers, the chips in their reader
pool (:func:`pool_check`: every idle chip answers a harmless command; a chip in use counts as
working). The answer is 200 with ``"status": "ok"`` (or ``"degraded"`` when some chips failed
but others work), or 503 with ``"status": "down"`` when a dependency is down, or
``"draining"`` when the server is shutting down; ``checks`` says what each check found, in
words safe to show anyone (never a driver's message, which can quote SQL parameters or a
database URL's password).

Every check has a deadline (``timeout``), concurrent health requests share one run, and a result
is reused for ``reuse`` seconds, so polling the endpoint cannot load the server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future
from typing import Any

from sqlalchemy import Engine, Table, select
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ...reader import Reader
from .db import storage_reason
from .reader_pool import PoolExhausted, ReaderPool

CHECK_TIMEOUT = 2.0      # seconds a dependency has to answer
REUSE_SECONDS = 1.0      # a result this young answers the next health request
Check = Callable[[], Awaitable[dict[str, Any]]]


class HealthCheck:
    """A server's health: its ``checks`` (name -> coroutine giving ``{"ok": bool, ...}``),
    ``info`` (fields every answer carries) and ``draining`` (the server is shutting down)."""

    def __init__(self, server: str, checks: Mapping[str, Check],
                 info: Callable[[], dict[str, Any]] = dict,
                 draining: Callable[[], bool] = lambda: False, *,
                 timeout: float = CHECK_TIMEOUT, reuse: float = REUSE_SECONDS) -> None:
        self.server, self.checks, self.info, self.draining = server, checks, info, draining
        self.timeout, self.reuse = timeout, reuse
        self._lock = asyncio.Lock()
        self._last: tuple[float, dict[str, Any]] | None = None

    async def _run(self, name: str, check: Check) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(check(), self.timeout)
        except TimeoutError:
            return {"ok": False, "reason": f"no answer within {self.timeout:g} s"}

    async def results(self) -> dict[str, Any]:
        async with self._lock:  # one run at a time; a fresh result is shared
            now = time.monotonic()
            if self._last is not None and now - self._last[0] < self.reuse:
                return self._last[1]
            names = list(self.checks)
            found = await asyncio.gather(*(self._run(n, self.checks[n]) for n in names))
            checks = dict(zip(names, found, strict=True))
            self._last = (time.monotonic(), checks)
            return checks

    async def answer(self, request: Request) -> Response:
        checks = await self.results()
        if self.draining():
            status = "draining"
        elif not all(c.get("ok") for c in checks.values()):
            status = "down"
        else:
            status = "degraded" if any(c.get("failed") for c in checks.values()) else "ok"
        body = {"status": status, "server": self.server, "checks": checks, **self.info()}
        return JSONResponse(body, status_code=200 if status in ("ok", "degraded") else 503,
                            headers={"Cache-Control": "no-store"})


def database_check(engine: Engine, table: Table, busy_ms: int = 1000) -> Check:
    """A check that reads one row of ``table`` (a real query through the server's engine, on
    a thread of its own, so a stuck database never holds up the server's database thread);
    on SQLite it also takes the write lock and lets it go at once (``BEGIN IMMEDIATE``,
    rolled back), waiting at most ``busy_ms``: a database another process keeps locked
    cannot record a payment. A query still running from an earlier check is not doubled:
    the check fails until it ends."""
    running: list[Future[float]] = []

    def query() -> float:
        started = time.perf_counter()
        with engine.connect() as conn:
            sqlite = engine.dialect.name == "sqlite"
            if sqlite:
                before = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
                conn.exec_driver_sql(f"PRAGMA busy_timeout={int(busy_ms)}")
            try:
                conn.execute(select(table).limit(1)).first()
                if sqlite:  # and the write lock a payment needs can be had (then let go)
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
            finally:
                if sqlite:
                    conn.exec_driver_sql(f"PRAGMA busy_timeout={int(before or 0)}")
                conn.rollback()
        return (time.perf_counter() - started) * 1000

    async def check() -> dict[str, Any]:
        if running and not running[0].done():
            return {"ok": False, "reason": "the last check's query has not ended yet"}
        running.clear()
        loop = asyncio.get_running_loop()
        future: Future[float] = Future()

        def run() -> None:
            try:
                future.set_result(query())
            except BaseException as exc:
                future.set_exception(exc)

        running.append(future)
        loop.run_in_executor(None, run)
        try:
            ms = await asyncio.wrap_future(future)
        except Exception as exc:
            return {"ok": False, "reason": storage_reason(exc).removesuffix(
                "; try again later")}
        return {"ok": True, "ms": round(ms, 2)}

    return check


def pool_check(pool: ReaderPool[Any], probe: Callable[[Reader], object],
               name: Callable[[Any], str] = lambda m: str(m.index)) -> Check:
    """A check of a reader pool: each idle chip (taken from the pool as a request would take
    it, then given back) runs ``probe``, a harmless command that raises if the chip does not
    answer as it should; chips in use count as working. Down when none works; ``failed``
    names the chips that did not answer (by ``name``)."""

    async def check() -> dict[str, Any]:
        total, idle = len(pool.members), pool.idle
        answered = 0
        failed: list[dict[str, str]] = []
        for _ in range(idle):
            try:
                member = await pool.acquire(0.05)
            except PoolExhausted:
                break  # a request took it meanwhile: it is in use
            try:
                await pool.run(member, probe)
                answered += 1
            except Exception as exc:  # a reader error or a wrong answer
                failed.append({"chip": name(member), "reason": _one_line(exc)})
            finally:
                pool.release(member)
        in_use = total - answered - len(failed)
        return {"ok": answered + in_use > 0, "total": total, "answered": answered,
                "in_use": in_use, "failed": failed}

    return check


def _one_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]
