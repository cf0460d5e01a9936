"""What the servers share: refusals as binary error answers, bounded request bodies and JSON,
a storage failure answered 503, opening a sealed client envelope and sealing its answer (FIG. 9
layer), and database calls off the event loop (SQLite: group commit, :class:`GroupWriter`).

Every body goes through :func:`read_body` (at most ``max_bytes``, else 413, read as a stream)
and every JSON body through :func:`read_json` (also bounded in depth and item count by a linear
scan *before* ``json.loads``, so no input makes the parser recurse); :func:`answer` does the
bounded read for the binary endpoints. A database that cannot write (full disk, read-only,
PostgreSQL down) is an :class:`sqlalchemy.exc.OperationalError`; :data:`STORAGE_ERROR_HANDLERS`
(binary) and :data:`JSON_STORAGE_ERROR_HANDLERS` (``{"reason": ...}``) answer it 503 with the
reason and ``Retry-After`` (the transaction was rolled back: nothing changed). Every refusal is
noted in the request's log line (:func:`.request_log.note`), as is each client envelope's
transaction id. :func:`openapi_route` serves ``host/openapi/NAME.yaml`` as ``/openapi.json``.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import queue
import re
import threading
import weakref
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar

import yaml  # type: ignore[import-untyped]  # (no types-PyYAML in the venv)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...protocols import messages as M
from ...protocols import secure
from .db import StepGroup, storage_reason, writer_state
from .reader_pool import handed_back, one_wake
from .request_log import note

OCTETS = "application/octet-stream"
T = TypeVar("T")

MAX_BODY = 64 * 1024          # the largest binary message a server takes
MAX_JSON_BODY = 16 * 1024     # the largest JSON request
MAX_JSON_DEPTH = 8            # nesting of objects and arrays
MAX_JSON_ITEMS = 256          # object members and array elements, all levels together
STORAGE_RETRY_AFTER = 30      # seconds a client should wait after a storage 503
STORAGE_ERRORS: tuple[type[Exception], ...] = (OperationalError, PoolTimeoutError)


class Refused(Exception):
    """A request refused: HTTP status, error code and a reason (never a key)."""

    def __init__(self, status: int, code: int, reason: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason = status, code, reason
        self.headers = headers or {}


def refusal(exc: Refused) -> Response:
    note(reason=exc.reason)
    headers = {"X-Svcard-Reason": exc.reason.encode("ascii", "replace").decode(), **exc.headers}
    return Response(M.error_message(exc.code, exc.reason), status_code=exc.status,
                    media_type=OCTETS, headers=headers)


async def read_body(request: Request, max_bytes: int = MAX_BODY) -> bytes:
    """The request body, at most ``max_bytes``: a larger declared or streamed body is refused
    (413) as soon as it passes the limit, without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Refused(400, 400, "Content-Length is not a number")
        if int(declared) > max_bytes:
            raise Refused(413, 413, f"the body has {declared} bytes; at most {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise Refused(413, 413, f"the body is larger than {max_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise Refused(400, 400, "the client went away before the whole body") from None
    return b"".join(chunks)


# A JSON string (escapes included), an unterminated string's opening quote, or a structural
# character. One left-to-right pass: a string is skipped whole, so brackets in it do not count.
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|"|[\[\]{},]')


def check_json_shape(data: bytes, max_depth: int = MAX_JSON_DEPTH,
                     max_items: int = MAX_JSON_ITEMS) -> None:
    """Refuse (400) JSON text nested deeper than ``max_depth`` or with more than ``max_items``
    members and elements in all, by a linear scan that never recurses. Text that is not JSON
    at all passes here and fails in ``json.loads`` (which then cannot recurse deeply)."""
    depth = items = 0
    for match in _JSON_TOKENS.finditer(data):
        token = match.group()
        if token == b'"':
            return  # an unterminated string: everything after it is inside it
        if token in (b"[", b"{"):
            depth += 1
            items += 1
            if depth > max_depth:
                raise Refused(400, 400, f"the JSON is nested deeper than {max_depth} levels")
        elif token in (b"]", b"}"):
            depth -= 1
        elif token == b",":
            items += 1
        if items > max_items:
            raise Refused(400, 400, f"the JSON has more than {max_items} items")


async def read_json(request: Request, max_bytes: int = MAX_JSON_BODY,
                    max_depth: int = MAX_JSON_DEPTH, max_items: int = MAX_JSON_ITEMS) -> Any:
    """The request body as JSON, bounded in size (413), depth and item count (400)."""
    data = await read_body(request, max_bytes)
    check_json_shape(data, max_depth, max_items)
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise Refused(400, 400, "the body is not JSON") from None


def shutting_down() -> Refused:
    """New work refused while the server drains (kit/serving.py): 503, and the connection
    closed so the client's next attempt finds another server or this one restarted."""
    return Refused(503, 503, "the server is shutting down; retry",
                   {"Retry-After": "1", "Connection": "close"})


def storage_refusal(exc: Exception) -> Refused:
    """A database that cannot do its work, as a 503 refusal with the reason and Retry-After."""
    return Refused(503, 503, storage_reason(exc),
                   {"Retry-After": str(STORAGE_RETRY_AFTER)})


async def _storage_error(request: Request, exc: Exception) -> Response:
    return refusal(storage_refusal(exc))


async def _json_storage_error(request: Request, exc: Exception) -> Response:
    return json_refusal(storage_refusal(exc))


def json_refusal(exc: Refused) -> JSONResponse:
    """A refusal as ``{"reason": ...}`` for the JSON servers."""
    note(reason=exc.reason)
    return JSONResponse({"reason": exc.reason}, status_code=exc.status, headers=exc.headers)


ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]
STORAGE_ERROR_HANDLERS: Mapping[Any, ExceptionHandler] = {
    cls: _storage_error for cls in STORAGE_ERRORS}
JSON_STORAGE_ERROR_HANDLERS: Mapping[Any, ExceptionHandler] = {
    cls: _json_storage_error for cls in STORAGE_ERRORS}


async def answer(handler: Callable[[bytes], Awaitable[Response]], request: Request,
                 max_bytes: int = MAX_BODY) -> Response:
    """Run a handler on the request body (at most ``max_bytes``); a refusal becomes its
    4xx/503 answer, and a database that cannot write a 503 with its reason."""
    try:
        return await handler(await read_body(request, max_bytes))
    except Refused as exc:
        return refusal(exc)
    except STORAGE_ERRORS as exc:
        return refusal(storage_refusal(exc))


def open_client_envelope(data: bytes, msg_type: int, keys: dict[bytes, bytes], party: str,
                         ticket_layout: Any, ticket_aad: Callable[[bytes, bytes], bytes],
                         ) -> tuple[Any, bytes, Any, bytes]:
    """Check and open a client envelope: (envelope, DK, ticket, body plaintext). ``keys`` maps
    the party id in the envelope (merchant or bank) to the key it shares with this server."""
    try:
        env, header = M.split_envelope(data)
    except M.MessageError as exc:
        raise Refused(400, 400, str(exc)) from None
    note(txn=env.txn_id.hex(), party=env.merchant_id.hex())
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


def seal_answer(env: Any, tsk: bytes, msg_type: int, body: bytes) -> Response:
    """The answer to an opened client envelope ``env``: ``body`` as a ``msg_type`` envelope
    sealed under the ticket's TSK, for the client that sent it."""
    return Response(M.seal_envelope(msg_type, env.merchant_id, env.txn_id, env.etsk, tsk, body),
                    media_type=OCTETS)


def request_digest(plaintext: bytes) -> str:
    """The SHA-256 of a request's plaintext (hex): how a retried request is told from another."""
    return hashlib.sha256(plaintext).hexdigest()


_SHUT = "the database writer has been shut down"


@dataclass
class _Call:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    future: Future[Any] = field(default_factory=Future)


class GroupWriter:
    """The SQLite writer thread with group commit: it takes every step waiting (at most
    ``max_group``), runs them in one transaction (:class:`.db.StepGroup`, each :func:`.db.step`
    block in a SAVEPOINT), commits once, and only then gives each step its result or error: an
    answer leaves only after its step's commit; one commit (one fsync) serves every step.

    A step beginning a transaction of its own has the group committed before and after it. A
    database error but a unique key's, a transaction SQLite ended by itself (even if the step
    caught the error) or a failed commit rolls the group back, and each step not committed
    runs again alone (the one that failed keeps its error). ``groups``/``steps`` count runs."""

    def __init__(self, max_group: int = 256) -> None:
        self._writer = writer = _Writer(max_group)
        self._stopped = False
        self._thread = threading.Thread(target=writer.loop, name="sqlite-writer", daemon=True)
        self._thread.start()
        weakref.finalize(self, writer.queue.put, None)  # the thread ends with its runner

    @property
    def groups(self) -> int:
        return self._writer.groups

    @property
    def steps(self) -> int:
        return self._writer.steps

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        if self._stopped:
            raise RuntimeError(_SHUT)
        call = _Call(fn, args, kwargs)
        self._writer.queue.put(call)
        if self._stopped and self._thread is not threading.current_thread():
            self._thread.join()  # shutdown() came between the check and the put: the step
            self._writer.refuse_rest()  # may be behind the end mark, and is refused then
        return call.future

    def shutdown(self, wait: bool = True) -> None:
        """No new step; the steps already given run, then the thread ends."""
        if not self._stopped:
            self._stopped = True
            self._writer.queue.put(None)
        if wait and self._thread is not threading.current_thread():
            self._thread.join()


class _Writer:
    """The writer thread's own state (not the :class:`GroupWriter`, which may go away)."""

    def __init__(self, max_group: int) -> None:
        self.max_group = max_group
        self.groups = self.steps = 0
        self.queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()

    def loop(self) -> None:
        while (first := self.queue.get()) is not None:
            calls, last = [first], False
            while len(calls) < self.max_group:
                try:
                    more = self.queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    last = True
                    break
                calls.append(more)
            running = [c for c in calls if c.future.set_running_or_notify_cancel()]
            try:
                self.run(running)
            except BaseException as exc:  # the writer's own work failed: no caller waits
                for call in running:     # forever, and the thread goes on
                    if not call.future.done():
                        call.future.set_exception(exc)
            if last:
                break
        self.refuse_rest()

    def refuse_rest(self) -> None:  # steps queued after the end mark (as shutdown began)
        with contextlib.suppress(queue.Empty):
            while True:
                if (call := self.queue.get_nowait()) and call.future.set_running_or_notify_cancel():
                    call.future.set_exception(RuntimeError(_SHUT))

    def run(self, calls: list[_Call]) -> None:
        group = StepGroup()
        done: list[tuple[_Call, Any, BaseException | None]] = []
        durable = 0       # done[:durable] are committed
        culprit = -1      # the step whose error broke the group (-1: none, or the commit)
        broken = False
        writer_state.group = group
        try:
            for call in calls:
                try:
                    done.append((call, call.fn(*call.args, **call.kwargs), None))
                    if group.lost():  # it caught an error that ended the transaction: it
                        broken, culprit = True, 0 if len(calls) == 1 else -1  # runs again alone
                except BaseException as exc:  # the step's caller gets it, as from an executor
                    done.append((call, None, exc))
                    broken = _breaks(exc, group)
                    culprit = len(done) - 1 if broken else -1
                if group.foreign:  # it began its own transaction: the steps before committed
                    durable = len(done) - 1
                    if not broken:  # and it is committed at once
                        group.foreign, culprit = False, len(done) - 1
                        group.end()
                        durable, culprit = len(done), -1
                if broken:
                    break
            else:
                culprit = 0 if len(calls) == 1 else -1
                group.end()
                durable, culprit = len(done), -1
        except BaseException as failure:  # a commit that failed
            broken = True
            if culprit >= 0:
                done[culprit] = (done[culprit][0], None, failure)
        finally:
            writer_state.group = None
        self.groups += 1
        self.steps += len(done)
        if broken:  # rolled back: every step not committed and not the culprit runs alone
            with contextlib.suppress(Exception):  # a failed rollback closed the connections
                group.end(commit=False)
            for i, (call, _, _) in enumerate(done):
                if i >= durable and i != culprit:
                    self.run([call])
            for call in calls[len(done):]:
                self.run([call])
            done = done[:durable] + ([done[culprit]] if culprit >= 0 else [])
        with one_wake():   # each waiting loop is woken once for the whole group
            for call, result, error in done:
                fut = call.future
                fut.set_result(result) if error is None else fut.set_exception(error)


def _breaks(exc: BaseException, group: StepGroup) -> bool:
    """True if the group's transaction cannot go on after a step raised ``exc``: a database
    error other than a unique key's, or SQLite ended the transaction by itself."""
    if isinstance(exc, DBAPIError) and not isinstance(exc, IntegrityError):
        return True
    return group.lost()


class SqlRunner:
    """Database calls off the event loop. SQLite has one writer at a time (concurrent ones meet
    in its sleeping busy handler): one thread does every SQLite call, with group commit
    (:class:`GroupWriter`), its results back by the loop's inbox; other databases: a thread."""

    def __init__(self, db_url: str) -> None:
        self.executor = GroupWriter() if db_url.startswith("sqlite") else None

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self.executor is None:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return await handed_back(self.executor.submit(fn, *args, **kwargs))


def openapi_document(name: str) -> dict[str, Any]:
    """A server's OpenAPI document, ``host/openapi/NAME.yaml`` (package data)."""
    package = __package__.rsplit(".", 1)[0]  # svcard.host
    source = resources.files(package).joinpath("openapi", f"{name}.yaml")
    document: dict[str, Any] = yaml.safe_load(source.read_text(encoding="utf-8"))
    return document


def openapi_route(name: str) -> Route:
    """``GET /openapi.json``: the server's OpenAPI document (read once, when the app is
    built, so a server whose document is missing does not start)."""
    body = json.dumps(openapi_document(name)).encode()

    async def openapi(request: Request) -> Response:
        return Response(body, media_type="application/json")

    return Route("/openapi.json", openapi, methods=["GET"])
