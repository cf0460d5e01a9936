"""The load server (seed FIG. 17-18, steps 877-892 and 895-899): its configuration, and the
server that wires the routes to the protocol steps, the HSM pool and the load log.

``POST /v1/load/request`` takes the client's packed load request (S1, card, expiry, amount,
algorithm, counter, balance, bank time stamp), checks it against the bank's sealed ticket, logs
it, has the HSM verify S1 and make S2, logs S2 and answers the load command (:mod:`.request`).
``POST /v1/load/result`` takes the card's answer: S3, which the HSM verifies for this load's
own fields (the only way to "loaded"), or "not loaded" with a new zero-value S1
(:mod:`.result`).

"Not loaded" is decided only on evidence the card made after this load's S2 was issued. The
card completes at most one load per online-counter value, so a zero-value *probe load* is done
for real: the HSM verifies the zero-value S1 and makes S2 for amount 0 with a fresh date and
time (``LOAD_PROBE``); the card credits 0 and moves its counter; ``POST /v1/load/probe`` takes
its TAC, which the HSM verifies (:mod:`.probe`). A probe at the load's own counter proves the
load never happened; a probe past it proves it only when another load of the card is proven
``loaded`` at that counter; otherwise the load stays open (409, undecided) and nothing is
refunded. A load for which no S2 ever left the server is closed "not loaded" at once. Every
decision is one compare-and-set in the database; the answer carries a confirmation sealed for
the bank (:mod:`.decision`).

Every refusal is a 4xx with a binary error message and the reason in ``X-Svcard-Reason``; no
HSM free in time is 503 with Retry-After. A refusal changes nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ....reader import Reader
from ...kit.health import HealthCheck, database_check, pool_check
from ...kit.http import (
    STORAGE_ERROR_HANDLERS,
    SqlRunner,
    answer,
    openapi_route,
    refusal,
    shutting_down,
)
from ...kit.reader_pool import Pooled
from ...kit.request_log import RequestLog
from ...kit.serving import Drain, drain_writer
from ...terminal import apdus
from ...terminal.purse import call
from . import probe, request, result
from .db import LoadDb, loads, make_engine
from .hsm_pool import HsmPool
from .leases import Fence, LeasedHsmPool, LeaseKeeper, LeaseStore


@dataclass
class BankAccount:
    """A bank the load server serves, with the key they share (never printed)."""

    bank_id: bytes
    shared_key: bytes

    def __repr__(self) -> str:
        return f"BankAccount({self.bank_id.hex()})"


@dataclass
class LoadConfig:
    banks: dict[bytes, BankAccount]
    terminal_id: bytes
    db_url: str = field(default="sqlite:///loads.db", repr=False)  # may hold a password
    acquire_timeout: float = 2.0
    clock: Any = field(default=dt.datetime.now)
    # one of several nodes on one database (leases.py): this node's name, and how long an HSM
    # lease lasts without renewal (a dead node's HSMs are taken over after it)
    node_name: str = ""
    lease_seconds: float = 10.0


Step = Callable[["LoadServer", bytes], Awaitable[Response]]


class LoadServer:
    """The HSM pool, the load log and the routes; each step is a function of its module."""

    def __init__(self, config: LoadConfig, hsm_readers: list[Reader]) -> None:
        self.config = config
        self.db = LoadDb(make_engine(config.db_url))
        self.sql = SqlRunner(config.db_url)
        self.leases: LeaseKeeper | None = None
        if config.node_name:
            leased = LeasedHsmPool(hsm_readers)
            self.hsms: HsmPool = leased
            self.leases = LeaseKeeper(LeaseStore(self.db.engine), leased, config.node_name,
                                      config.lease_seconds, self.sql, self.db.recover)
        else:
            self.hsms = HsmPool(hsm_readers)
        # the drain: no new load request; a load's result and probe still finish it (each
        # request stands alone, and the client's journal finishes a load cut short)
        self.drain = Drain()
        self.health_check = HealthCheck(
            "load", {"database": database_check(self.db.engine, loads),
                     "hsms": pool_check(self.hsms, lambda reader: call(
                         reader, apdus.select(self.hsms.aid), "SELECT HSM"))},
            lambda: {"hsms": len(self.hsms.members), "hsms_leased": len(
                         self.leases.pool.serving) if self.leases else len(self.hsms.members),
                     "terminal_id": self.config.terminal_id.hex().upper()},
            lambda: self.drain.draining)

    @property
    def node(self) -> str | None:   # this node's holder id; None on a single server
        return self.leases.node if self.leases is not None else None

    def fence(self, hsm: Pooled) -> Fence | None:
        """The fence of a write for ``hsm``'s command (None on a single server)."""
        return self.leases.fence(hsm) if self.leases is not None else None

    async def fence_current(self, fence: Fence) -> bool:
        assert self.leases is not None
        return bool(await self.sql(self.leases.store.current, fence))

    async def run(self, step: Step, http_request: Request) -> Response:
        """Run a protocol step on the request body; a refusal becomes its answer."""
        return await answer(lambda data: step(self, data), http_request)

    # --- POST /v1/load/request (steps 878-880, 895-899) ------------------------------------
    async def load_request(self, http_request: Request) -> Response:
        if self.drain.draining:
            return refusal(shutting_down())
        return await self.run(request.load_request, http_request)

    # --- POST /v1/load/result (steps 883-890 and the negative result) ----------------------
    async def load_result(self, http_request: Request) -> Response:
        return await self.run(result.load_result, http_request)

    # --- POST /v1/load/probe: the card's TAC for the probe, and the decision -----------------
    async def load_probe(self, http_request: Request) -> Response:
        return await self.run(probe.load_probe, http_request)

    # --- GET /v1/health ---------------------------------------------------------------------
    async def health(self, http_request: Request) -> Response:
        return await self.health_check.answer(http_request)

    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            if self.leases is None:
                await asyncio.to_thread(self.db.recover)
            await self.hsms.start()
            if self.leases is not None:   # settles dead nodes' requests, takes HSMs
                await self.leases.start()
            try:
                yield
            finally:
                if self.leases is not None:
                    await self.leases.stop()
                try:
                    await asyncio.to_thread(self.hsms.close)
                finally:
                    await drain_writer(self.sql)   # the last group committed, not rolled back

        return Starlette(routes=[
            Route("/v1/load/request", self.load_request, methods=["POST"]),
            Route("/v1/load/result", self.load_result, methods=["POST"]),
            Route("/v1/load/probe", self.load_probe, methods=["POST"]),
            Route("/v1/health", self.health, methods=["GET"]),
            openapi_route("load"),
        ], lifespan=lifespan, exception_handlers=dict(STORAGE_ERROR_HANDLERS),
            middleware=[Middleware(RequestLog, server="load")])
