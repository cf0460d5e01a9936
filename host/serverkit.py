"""What the payment and load servers share: refusals as binary error answers, opening a sealed
client envelope (FIG. 9 layer), and database calls off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from svcard.protocols import messages as M
from svcard.protocols import secure

OCTETS = "application/octet-stream"
T = TypeVar("T")


class Refused(Exception):
    """A request refused: HTTP status, error code and a reason (never a key)."""

    def __init__(self, status: int, code: int, reason: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason = status, code, reason
        self.headers = headers or {}


def refusal(exc: Refused) -> Response:
    headers = {"X-Svcard-Reason": exc.reason.encode("ascii", "replace").decode(), **exc.headers}
    return Response(M.error_message(exc.code, exc.reason), status_code=exc.status,
                    media_type=OCTETS, headers=headers)


async def answer(handler: Callable[[bytes], Awaitable[Response]], request: Request) -> Response:
    """Run a handler on the request body; a refusal becomes its 4xx/503 answer."""
    try:
        return await handler(await request.body())
    except Refused as exc:
        return refusal(exc)


def open_client_envelope(data: bytes, msg_type: int, keys: dict[bytes, bytes], party: str,
                         ticket_layout: Any, ticket_aad: Callable[[bytes, bytes], bytes],
                         ) -> tuple[Any, bytes, Any, bytes]:
    """Check and open a client envelope: (envelope, DK, ticket, body plaintext). ``keys`` maps
    the party id in the envelope (merchant or bank) to the key it shares with this server."""
    try:
        env, header = M.split_envelope(data)
    except M.MessageError as exc:
        raise Refused(400, 400, str(exc)) from None
    if env.msg_type != msg_type:
        raise Refused(400, 400, f"expected message type {msg_type}, got {env.msg_type}")
    shared = keys.get(env.merchant_id)
    if shared is None:
        raise Refused(403, 403, f"unknown {party} {env.merchant_id.hex()}")
    dk = secure.derive_key(shared, env.merchant_id, env.txn_id)
    try:
        ticket = M.parse(ticket_layout, secure.open_sealed(
            dk, env.etsk, ticket_aad(env.merchant_id, env.txn_id), "ETSK"), "ticket")
        plaintext = secure.open_sealed(ticket.tsk, env.body, header, "message body")
    except (secure.SealError, M.MessageError) as exc:
        raise Refused(400, 401, str(exc)) from None
    return env, dk, ticket, plaintext


class SqlRunner:
    """Database calls off the event loop. SQLite has one writer at a time: concurrent writers
    would only meet in its busy handler, which sleeps in growing steps, so one thread does every
    SQLite call; other databases get a thread per call."""

    def __init__(self, db_url: str) -> None:
        self.executor = (ThreadPoolExecutor(1, thread_name_prefix="sqlite")
                         if db_url.startswith("sqlite") else None)

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self.executor is None:
            return await asyncio.to_thread(fn, *args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))
