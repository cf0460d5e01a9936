"""What the five goods servers share: their database, the signed messages in and out, the
drain and the health check.

A request from a party is read bounded, its fields checked (:func:`..wire.parse`), its signer
looked up among the parties this server takes that message from, its signature verified under
the route's domain label, and its ``created`` (when it has one) within ``MAX_SKEW`` of this
server's clock, all before any state is read or changed. A decision (paid, declined, a write)
is a 200 answer signed by the answering party under ``REPLY + the request's label``, so an
answer is never taken for another message; a non-200 answer is a refusal that changed nothing
(the caller may ask again).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...kit.db import reading
from ...kit.health import HealthCheck, database_check
from ...kit.http import (
    JSON_STORAGE_ERROR_HANDLERS,
    Refused,
    SqlRunner,
    json_refusal,
    openapi_route,
    read_body,
    shutting_down,
)
from ...kit.request_log import RequestLog, note
from ...kit.serving import with_writer_drained
from .. import wire as W
from ..config import PartyConfig
from ..db import make_engine

REPLY = b"svcard-goods-reply/1\n"


class Unreachable(Exception):
    """A peer that did not answer, or answered with no valid signed decision."""


# a peer's refusals that are its definite word on the request (the order is gone, expired, in
# another state; the message is malformed; too many): passed on with their own status. 401
# and 403 from a peer refuse *this server's* signature (a configuration fault): a 502.
PASSED_ON = frozenset({400, 404, 409, 410, 413, 422, 429})


class PeerRefused(Unreachable):
    """A peer's definite refusal (a status of :data:`PASSED_ON`): :func:`handled` answers it
    with the same status and the peer's reason. A subclass of :class:`Unreachable`, so every
    caller that only needs "no decision" treats it as before."""

    def __init__(self, role: str, status: int, reason: str, retry_after: str = "") -> None:
        super().__init__(f"{role} answered {status}: {reason}")
        self.role, self.status, self.reason, self.retry_after = (role, status, reason,
                                                                retry_after)


class PartyServer:
    """The base of each party's server: ``routes()`` gives its own routes."""

    role = ""
    health_table: Any = None
    tick_seconds = 30.0

    def __init__(self, config: PartyConfig, *, clock: Callable[[], float] = time.time,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.clock = clock
        self.engine = make_engine(config.db_url, config.role)
        self.sql = SqlRunner(config.db_url)
        self.transport = transport
        self.http: httpx.AsyncClient | None = None
        self.draining = False
        self.health_check = HealthCheck(
            f"goods-{self.role}", {"database": database_check(self.engine, self.health_table)},
            lambda: {}, lambda: self.draining)

    @property
    def system(self) -> Any:
        return self.config.system

    @property
    def me(self) -> str:
        return str(self.config.me.id)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # --- drain (kit/serving.py) -------------------------------------------------------------
    def begin_drain(self) -> None:
        self.draining = True

    def pending(self) -> int:
        return 0

    def close(self) -> None:
        if self.sql.executor is not None:
            self.sql.executor.shutdown(wait=True)
        self.engine.dispose()

    # --- messages in --------------------------------------------------------------------------
    async def authenticated(self, request: Request, fields: Mapping[str, W.Checker],
                            what: str, domain: bytes, roles: Collection[str],
                            limit: int = W.MAX_MESSAGE) -> tuple[bytes, dict[str, Any], str]:
        """(body, fields, signer role) of a message signed by a party of ``roles``."""
        if self.draining:
            raise shutting_down()
        body = await read_body(request, limit)
        data = W.parse(body, fields, what, limit)
        signer = request.headers.get(W.SIGNER, "")
        note(party=signer[:32])
        role = next((r for r in roles if self.system.peer(r).id == signer), None)
        if role is None:
            raise Refused(403, 403, f"{what}: the signer is not a party this server takes "
                                    "it from")
        if not W.verify(self.system.peer(role).public_key, domain, body,
                        request.headers.get(W.SIGNATURE)):
            raise Refused(401, 401, f"{what}: the signature does not verify")
        self.check_fresh(data, what)
        return body, data, role

    def check_fresh(self, data: Mapping[str, Any], what: str) -> None:
        created = data.get("created")
        if isinstance(created, int) and abs(self.now_ms() // 1000 - created) > W.MAX_SKEW:
            raise Refused(401, 401, f"{what}: made more than {W.MAX_SKEW} s from this "
                                    "server's clock")

    def reply(self, request_domain: bytes, payload: Mapping[str, Any]) -> Response:
        """A signed decision for the sender of a ``request_domain`` message."""
        body, headers = W.signed(self.config.private_key, self.me, REPLY + request_domain,
                                 payload)
        return Response(body, headers=headers, media_type="application/json")

    # --- messages out -------------------------------------------------------------------------
    def client(self) -> httpx.AsyncClient:
        if self.http is None:
            self.http = httpx.AsyncClient(timeout=30, transport=self.transport)
        return self.http

    async def send(self, role: str, path: str, domain: bytes, payload: Mapping[str, Any],
                   http: httpx.AsyncClient | None = None) -> dict[str, Any]:
        """POST a signed message to the party of ``role``; its signed decision (a dict), or
        :class:`Unreachable` (no answer, a refusal, or an answer it did not sign). ``http``:
        a client of the calling event loop (default: the server's own)."""
        return (await self.send_raw(role, path, domain, payload, http))[0]

    async def send_raw(self, role: str, path: str, domain: bytes, payload: Mapping[str, Any],
                       http: httpx.AsyncClient | None = None) -> tuple[dict[str, Any], str, str]:
        """:meth:`send`, with the answer's signed text and its signature (to pass on)."""
        peer = self.system.peer(role)
        body, headers = W.signed(self.config.private_key, self.me, domain, payload)
        try:
            answer = await (http or self.client()).post(f"{peer.url}{path}", content=body,
                                                        headers=headers)
        except httpx.HTTPError as exc:
            raise Unreachable(f"{role} {peer.url}: {type(exc).__name__}") from None
        if answer.status_code in PASSED_ON:
            raise PeerRefused(role, answer.status_code, _reason_of(answer),
                              answer.headers.get("Retry-After", "")[:8])
        if answer.status_code != 200:
            reason = answer.text[:200] if len(answer.content) < 4096 else ""
            raise Unreachable(f"{role} answered {answer.status_code}: {reason}")
        if (answer.headers.get(W.SIGNER) != peer.id or len(answer.content) > W.MAX_MESSAGE
                or not W.verify(peer.public_key, REPLY + domain, answer.content,
                                answer.headers.get(W.SIGNATURE))):
            raise Unreachable(f"{role}: the answer is not signed by {peer.id}")
        try:
            data = W.canonical_load(answer.content)
        except ValueError:
            raise Unreachable(f"{role}: the answer is not a JSON object") from None
        return data, answer.content.decode(), str(answer.headers.get(W.SIGNATURE))

    # --- the app ------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return await self.health_check.answer(request)

    def routes(self) -> list[Route]:
        raise NotImplementedError

    async def tick(self, http: httpx.AsyncClient) -> None:
        """Finish work a stop or an unreachable peer left open (overridden): at start and
        every ``tick_seconds``."""

    async def recover(self) -> None:
        """One :meth:`tick` with a client of the calling event loop; errors are logged by the
        caller's next tick (a peer still down is asked again)."""
        async with httpx.AsyncClient(timeout=30, transport=self.transport) as http:
            with contextlib.suppress(Unreachable):
                await self.tick(http)

    async def _clock(self) -> None:
        while True:
            await asyncio.sleep(self.tick_seconds)
            with contextlib.suppress(Exception):   # the next tick tries again
                await self.recover()

    async def starting(self) -> None:
        """Open what the server holds (the payment server's PSAMs), before the first tick."""

    def stopping(self) -> None:
        """Close what :meth:`starting` opened."""

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        await self.starting()
        with contextlib.suppress(Exception):
            await self.recover()
        task = asyncio.create_task(self._clock())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if self.http is not None:
                await self.http.aclose()
                self.http = None
            self.stopping()

    def app(self) -> Starlette:
        return Starlette(routes=[*self.routes(),
                                 Route("/v1/health", self.health, methods=["GET"]),
                                 openapi_route(f"goods-{self.role}")],
                         exception_handlers=dict(JSON_STORAGE_ERROR_HANDLERS),
                         lifespan=with_writer_drained(self.sql, self.lifespan),
                         middleware=[Middleware(RequestLog, server=f"goods-{self.role}")])


async def handled(work: Callable[[], Any]) -> Response:
    """Run a route's work; a refusal becomes its JSON answer, an unreachable peer a 502."""
    try:
        result: Response = await work()
        return result
    except Refused as exc:
        return json_refusal(exc)
    except PeerRefused as exc:   # the peer's definite word: its status, its reason
        note(reason=str(exc))
        headers = {"Retry-After": exc.retry_after} if exc.retry_after.isdigit() else {}
        return JSONResponse({"reason": f"{exc.role}: {exc.reason}"}, status_code=exc.status,
                            headers=headers)
    except Unreachable as exc:
        note(reason=str(exc))
        return JSONResponse({"reason": f"a party did not decide: {exc}"}, status_code=502)


def _reason_of(answer: httpx.Response) -> str:
    """The ``reason`` of a peer's JSON refusal (at most 200 characters), else its text's."""
    if len(answer.content) > 4096:
        return ""
    try:
        data = answer.json()
    except ValueError:
        return answer.text[:200]
    return str(data.get("reason", ""))[:200] if isinstance(data, dict) else ""


QUOTA_WINDOW_MS = 60_000


def take_quota(conn: Any, table: Any, key: str, limit: int, now: int) -> bool:
    """Inside a step: count one use of ``key`` in its current minute; False (nothing counted)
    past ``limit``. Each statement is one row's compare-and-set, so racing requests on
    PostgreSQL too never pass the limit."""
    from sqlalchemy import insert, update
    from sqlalchemy.exc import IntegrityError

    t = table
    try:
        with conn.begin_nested():
            conn.execute(insert(t).values(key=key[:64], since=now, used=0))
    except IntegrityError:   # there already
        pass
    conn.execute(update(t).where(t.c.key == key[:64], t.c.since <= now - QUOTA_WINDOW_MS)
                 .values(since=now, used=0))
    done = conn.execute(update(t).where(t.c.key == key[:64], t.c.used < limit)
                        .values(used=t.c.used + 1))
    return int(done.rowcount or 0) == 1


def read_one(engine: Any, table: Any, **where: Any) -> dict[str, Any] | None:
    from sqlalchemy import select
    query = select(table).where(*(table.c[k] == v for k, v in where.items()))
    with reading(engine) as conn:
        row = conn.execute(query).first()
    return dict(row._mapping) if row is not None else None
