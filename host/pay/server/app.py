"""The payment server (seed FIG. 4-9): draw requests in, debit commands out, PSAMs in a pool.

``POST /v1/draw`` takes a sealed draw request, has a PSAM compute MAC1 (INIT SAM FOR PURCHASE)
and answers the sealed debit command. ``POST /v1/debit-response`` (FIG. 5 and 6) takes the card's
answer: the server compares the card's MAC2 with the MAC2 the PSAM expects and, in FIG. 5, the
PSAM checks it again and completes its record with the card's TAC (CREDIT SAM FOR PURCHASE); it
answers "debit result C" (for the client) and "debit result M" (for the merchant). In FIG. 7
and 8 the one round trip is the draw: the debit command carries the expected MAC2 (FIG. 7, for
the client) or that MAC2 sealed for the merchant (FIG. 8), and M; the card's MAC2 and TAC come
later to ``POST /v1/proof``.

The rules this server keeps (docs/security.md):

* **Only authenticated data moves a payment.** The card is not authenticated before its MAC2:
  the draw's card serial, counter, expiry and balance are recorded, never trusted, so a draw
  never voids, fails or blocks another payment (a unique (card, counter) key exists only among
  confirmed payments). A debit response with a card status other than 9000 is an unauthenticated
  report: it is recorded (``client_report``), may free a FIG. 5 PSAM early, and changes no
  state; a MAC2 that is not the expected one is refused (400, code 401) and changes nothing. The
  MAC2 is compared (in constant time) *before* anything goes to the PSAM, so a forged MAC2
  never uses up the FIG. 5 PSAM session, and a genuine answer that comes later still confirms.
* **Every check-then-act is one atomic step.** A state change is one conditional UPDATE
  (:meth:`~svcard.host.pay.server.db.PaymentDb.advance`); the loser of a race re-reads the row (same
  response: the stored result, idempotently; else 409). The FIG. 5 held PSAM is taken from
  the holds (:mod:`.holds`) with a synchronous pop before any ``await``, so one request only
  runs CREDIT SAM.
* **No goods without evidence made after the fact.** "Paid" is answered only on the card's
  MAC2. The PSAM records every purchase at INIT SAM; if CREDIT SAM never runs (hold timed out,
  restart), the record stays without TAC and the batch hand-off adds the card's TAC from this
  database, in the batch ("proofs") or, if the batch had already left, in a late-proofs file.
* **Bounded.** FIG. 5 holds are bounded per merchant and per client address (429 beyond), and
  a hold lasts ``hold_timeout`` at most. The server refuses a card whose reported expiry date has
  passed (403). EF 0x15 dates are not MACed: a lying client can claim a later expiry (the card's
  keys still work, its MAC2 still verifies); what stops an invalidated card is the issuer's
  blocked list in the PSAM (INIT SAM answers 6985: 403).

Every refusal is a 4xx with a binary :data:`~svcard.protocols.messages.ErrorMessage` and the
reason also in the ``X-Svcard-Reason`` header; no PSAM free in time is 503 with Retry-After.

This module wires the server: its configuration, PSAM pool, database and FIG. 5 holds, and the
routes. Each step of the protocol is a module of its own: :mod:`.draw`, :mod:`.debit` (the
debit response), :mod:`.proof` and :mod:`.batches` (the batch close); :mod:`.envelope` opens and
seals the merchant's envelopes, :mod:`.holds` keeps the FIG. 5 holds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ....protocols import messages as M
from ....protocols import purse as P
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
from ...kit.reader_pool import PoolError
from ...kit.request_log import RequestLog
from ...kit.serving import drain_writer
from ...terminal import apdus
from ...terminal.purse import call
from .batches import hand_over_batches
from .db import PaymentDb, make_engine, payments
from .debit import answer_debit_response
from .draw import answer_draw
from .holds import Holds
from .leases import Fence, LeasedPsamPool, LeaseKeeper, LeaseStore
from .proof import take_proof
from .psam_pool import PooledPsam, PsamPool


@dataclass
class MerchantAccount:
    merchant_id: bytes
    shared_key: bytes
    variants: frozenset[int] = frozenset(M.VARIANTS.values())
    # the PSAM terminal its payments are made on (a shared POS, seed 001 FIG. 4B; None: the
    # pool's one terminal): clearing pays a terminal's records to its merchant
    terminal_id: bytes | None = None

    def __repr__(self) -> str:  # never the key
        return f"MerchantAccount({self.merchant_id.hex()})"


@dataclass
class PaymentConfig:
    merchants: dict[bytes, MerchantAccount]
    db_url: str = field(default="sqlite:///payments.db", repr=False)  # may hold a password
    acquire_timeout: float = 2.0
    hold_timeout: float = 10.0       # FIG. 5: how long a PSAM waits for the card's answer
    admin_token: str = field(default="", repr=False)  # for POST /v1/batches/close
    concentration_dir: str = ""      # where closed batches are handed to the concentration point
    clock: Any = field(default=dt.datetime.now)
    # FIG. 5 holds at once, per merchant and per client address (None: half the pool, >= 1)
    max_holds_per_merchant: int | None = None
    max_holds_per_client: int | None = None
    # one of several nodes on one database (leases.py): this node's name, and how long a PSAM
    # lease lasts without renewal (a dead node's PSAMs are taken over after it)
    node_name: str = ""
    lease_seconds: float = 10.0


def merchant_terminals(merchants: dict[bytes, MerchantAccount]) -> frozenset[bytes]:
    """The PSAM terminals the merchants name (empty: the pool's one terminal serves all);
    :class:`PoolError` for two naming one (clearing would pay both's records to one)."""
    named: dict[bytes, bytes] = {}
    for a in merchants.values():
        if a.terminal_id and named.setdefault(a.terminal_id, a.merchant_id) != a.merchant_id:
            raise PoolError(f"merchants {named[a.terminal_id].hex().upper()} and "
                            f"{a.merchant_id.hex().upper()} name one terminal_id "
                            f"{a.terminal_id.hex().upper()}: give each its own")
    return frozenset(named)


class PaymentServer:
    """The payment server's state (configuration, PSAM pool, database, FIG. 5 holds) and its
    routes; each route runs its step's module with the server."""

    def __init__(self, config: PaymentConfig, psam_readers: list[Reader]) -> None:
        if config.node_name and len(merchant_terminals(config.merchants)) > 1:
            raise ValueError("node_name: a shared POS with a PSAM terminal per merchant runs as "
                             "one server, not as nodes (a node leases PSAMs of one terminal)")
        self.config = config
        self.db = PaymentDb(make_engine(config.db_url))
        self.sql = SqlRunner(config.db_url)
        self.leases: LeaseKeeper | None = None
        if config.node_name:
            self.pool: PsamPool = LeasedPsamPool(psam_readers)
            self.leases = LeaseKeeper(LeaseStore(self.db.engine), self.pool, config.node_name,
                                      config.lease_seconds, self.sql, self.db.recover)
        else:
            self.pool = PsamPool(psam_readers, terminals=merchant_terminals(config.merchants))
        self.holds = Holds(config, self.pool)
        self.close_lock = asyncio.Lock()  # one batch close at a time
        self.draining = False     # shutting down: no new draw, held payments still finish
        self.draws = 0            # draws in progress (each may end in a FIG. 5 hold)
        self.health_check = HealthCheck(
            "payment", {"database": database_check(self.db.engine, payments),
                        "psams": pool_check(self.pool, self._probe_psam,
                                            lambda psam: psam.psam_id.hex().upper())},
            lambda: {"psams": len(self.pool.psams), "idle": self.pool.idle,
                     "terminal_id": self.pool.terminal_id.hex().upper()},
            lambda: self.draining)

    # --- the drain (kit/serving.py) ---------------------------------------------------------
    def begin_drain(self) -> None:
        self.draining = True

    def pending(self) -> int:
        """FIG. 5 payments whose PSAM is held for the card's answer, and draws in progress."""
        return len(self.holds.held) + self.draws

    def _probe_psam(self, reader: Reader) -> None:
        """The health check's harmless command: the PSAM reads back its terminal id."""
        if call(reader, apdus.read_binary(P.SFI_PSAM_TERMINAL_ID, 6),
                "READ TERMINAL ID") not in self.pool.terminal_ids:
            raise ValueError("the PSAM answers another terminal id")

    def fence(self, psam: PooledPsam) -> Fence | None:
        """What a write for ``psam``'s transaction carries at a node (None: one server)."""
        return self.leases.fence(psam) if self.leases is not None else None

    # --- routes -----------------------------------------------------------------------------
    async def draw(self, request: Request) -> Response:
        if self.draining:
            return refusal(shutting_down())
        client = request.client.host if request.client else "?"
        self.draws += 1
        try:
            return await answer(lambda data: answer_draw(self, data, client), request)
        finally:
            self.draws -= 1

    async def debit_response(self, request: Request) -> Response:
        return await answer(lambda data: answer_debit_response(self, data), request)

    async def proof(self, request: Request) -> Response:
        return await answer(lambda data: take_proof(self, data), request)

    async def close_batches(self, request: Request) -> Response:
        if self.draining:
            exc = shutting_down()
            return JSONResponse({"reason": exc.reason, "batches": []}, status_code=503,
                                headers=exc.headers)
        return await hand_over_batches(self, request)

    async def health(self, request: Request) -> Response:
        return await self.health_check.answer(request)

    # --- application ------------------------------------------------------------------------
    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            if self.leases is None:
                await asyncio.to_thread(self.db.recover)
            await self.pool.start()
            if self.leases is not None:   # settles dead nodes' draws, takes PSAMs
                await self.leases.start()
            try:
                yield
            finally:
                self.holds.release_all()
                if self.leases is not None:
                    await self.leases.stop()
                try:
                    await asyncio.to_thread(self.pool.close)
                finally:
                    await drain_writer(self.sql)   # the last group committed, not rolled back

        return Starlette(routes=[
            Route("/v1/draw", self.draw, methods=["POST"]),
            Route("/v1/debit-response", self.debit_response, methods=["POST"]),
            Route("/v1/proof", self.proof, methods=["POST"]),
            Route("/v1/batches/close", self.close_batches, methods=["POST"]),
            Route("/v1/health", self.health, methods=["GET"]),
            openapi_route("payment"),
        ], lifespan=lifespan, exception_handlers=dict(STORAGE_ERROR_HANDLERS),
            middleware=[Middleware(RequestLog, server="payment")])
