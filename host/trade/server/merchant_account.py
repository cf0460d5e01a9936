"""The merchant account manager (seed 004, 204): takes the mediating trusted agent's signed
clearing information and turns it into a deposit record for the merchant's billing system
(claim 11), once per session: stored in one step, then written as
``BILLING/deposits/<session>.json`` (see :mod:`.billing`); the signed receipt goes back.

``POST /v1/clearings``: the clearing information signed by a known acquirer. Answers: 200 the
receipt (the same again for a second delivery); 400 malformed; 401 bad signature; 403 an
unknown acquirer. ``GET /v1/health``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...kit.http import JSON_STORAGE_ERROR_HANDLERS, Refused, SqlRunner, openapi_route
from ...kit.request_log import RequestLog
from ...kit.serving import with_writer_drained
from .. import db as D
from ..config import MerchantAccountConfig
from .billing import export, file_payload, read_clearing, receipt, take_deposit, write_file
from .common import refused


class MerchantAccount:
    def __init__(self, config: MerchantAccountConfig, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.engine = D.mam_engine(config.db_url)
        self.sql = SqlRunner(config.db_url)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def close(self) -> None:
        if self.sql.executor is not None:
            self.sql.executor.shutdown(wait=True)
        self.engine.dispose()

    async def clearing(self, request: Request) -> Response:
        try:
            body, info, signature = await read_clearing(request, self.config.acquirers)
            row = await self.sql(take_deposit, self.engine, info, body, signature,
                                 self.now_ms())
            write_file(self.config.billing, "deposits", info["session"],
                       file_payload("deposits", row))
            return receipt(self.config.private_key, self.config.id, info["session"], body)
        except Refused as exc:
            return refused(exc)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"server": "trade-merchant-account", "id": self.config.id})

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        await self.sql(export, self.engine, D.mam_deposits, self.config.billing, "deposits")
        yield

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/clearings", self.clearing, methods=["POST"]),
            Route("/v1/health", self.health, methods=["GET"]),
            openapi_route("trade-merchant-account"),
        ], exception_handlers=dict(JSON_STORAGE_ERROR_HANDLERS),
            lifespan=with_writer_drained(self.sql, self.lifespan),
            middleware=[Middleware(RequestLog, server="trade-merchant-account")])
