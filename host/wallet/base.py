"""What each of the wallet's servers is built on: a database engine with its SQLite writer
(group commit), the health answer, the drain, and the reading of a linked request (bounded
body, bounded JSON, the link's MAC) with refusals answered as ``{"reason": ...}``."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from sqlalchemy import Engine, Table
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..kit.health import HealthCheck, database_check
from ..kit.http import (
    MAX_JSON_BODY,
    Refused,
    SqlRunner,
    check_json_shape,
    json_refusal,
    read_body,
    shutting_down,
)
from ..kit.request_log import note
from .links import check_link

Handler = Callable[[Request], Awaitable[Response]]


class WalletServer:
    """The common part of the web server, the gateway and the financial system."""

    name = "wallet"

    def __init__(self, engine: Engine, db_url: str, health_table: Table,
                 clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock
        self.sql = SqlRunner(db_url)
        self.draining = False
        self.in_flight = 0
        self.health_check = HealthCheck(
            self.name, {"database": database_check(engine, health_table)},
            lambda: {"in_flight": self.in_flight}, lambda: self.draining)

    def begin_drain(self) -> None:
        self.draining = True

    def pending(self) -> int:
        return self.in_flight

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def close(self) -> None:
        if self.sql.executor is not None:
            self.sql.executor.shutdown(wait=True)
        self.engine.dispose()

    async def health(self, request: Request) -> Response:
        return await self.health_check.answer(request)

    def guarded(self, handler: Handler) -> Handler:
        """``handler`` with the drain, the in-flight count and refusals as JSON answers."""
        async def run(request: Request) -> Response:
            if self.draining:
                return json_refusal(shutting_down())
            self.in_flight += 1
            try:
                return await handler(request)
            except Refused as exc:
                return json_refusal(exc)
            finally:
                self.in_flight -= 1
        return run

    async def linked(self, request: Request, keys: Mapping[str, bytes],
                     max_bytes: int = MAX_JSON_BODY) -> tuple[str, Any]:
        """(party, JSON body) of a request over a link keyed by ``keys``."""
        body = await read_body(request, max_bytes)
        party = check_link(keys, request.headers, request.method, request.url.path, body,
                           self.clock())
        note(party=party)
        check_json_shape(body)
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise Refused(400, 400, "the body is not JSON") from None
        if not isinstance(data, dict):
            raise Refused(400, 400, "the body is not a JSON object")
        return party, data


def ok(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status)


CRASH_ENV = "SVCARD_WALLET_CRASH"


def crash_point(name: str) -> None:
    """A fault test's hook: the process kills itself with SIGKILL here (nothing closed, nothing
    flushed) when ``SVCARD_WALLET_CRASH`` names this point. Unset, it does nothing."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
