"""The servers' logs: one JSON object a line on stderr (python-json-logger over stdlib logging),
and one line per HTTP request.

:func:`configure_logging` sends every record to stderr as JSON: svcard's own loggers and
uvicorn's (its start, stop and errors; its access log is off, since :class:`RequestLog` writes
a better one) at the level asked, every other library at ``warning`` at least, so that a
``--log-level debug`` never turns on, say, SQLAlchemy's statement log with its parameters.

:class:`RequestLog` is an ASGI middleware: when a request ends it writes one line with the
server, method, path, status and duration, and what the request's handler said of it through
:func:`note`: the transaction id, the protocol step, the outcome and a refusal's reason. A line
holds only those fields: never a body, a header (``Authorization`` carries the admin token),
a query string, a key, a TSK, an ETSK or an account secret. Handlers must :func:`note` only ids
and words; a refusal's reason is what the client is told anyway.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TextIO

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

LOG_LEVELS = ("debug", "info", "warning", "error")
REQUEST_LOGGER = "svcard.request"
OUR_LOGGERS = ("svcard", "uvicorn", "uvicorn.error")
MAX_FIELD = 300           # characters of a noted field (a reason, a path) in a line

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_fields: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "svcard_request_fields", default=None)

NOTED = ("txn", "party", "step", "outcome", "reason")


def note(**fields: Any) -> None:
    """Add fields to the log line of the request being handled (nothing outside a request).
    Only ``txn``, ``party``, ``step``, ``outcome`` and ``reason`` are kept; a later note of
    the same field wins, except ``reason``: the first refusal says why."""
    current = _fields.get()
    if current is None:
        return
    for name, value in fields.items():
        if name not in NOTED:
            raise ValueError(f"note(): {name} is not a request log field")
        if value is None or (name == "reason" and "reason" in current):
            continue
        current[name] = str(value)[:MAX_FIELD]


class _Formatter(JsonFormatter):
    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            # uvicorn adds an ANSI-coloured copy of its messages: left out
            reserved_attrs=[*RESERVED_ATTRS, "color_message"])

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) \
            + f".{int(record.msecs):03d}Z"


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Every log record as one JSON line on ``stream`` (stderr): svcard's and uvicorn's at
    ``level``, other libraries' at ``warning`` and above."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log level {level!r}: one of {', '.join(LOG_LEVELS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(level.upper())
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
    access.disabled = True


def _outcome(status: int) -> str:
    if status in (429, 503):
        return "busy"
    if status >= 500:
        return "error"
    return "refused" if status >= 400 else "ok"


class RequestLog:
    """ASGI middleware: one ``svcard.request`` log line per HTTP request (see the module)."""

    def __init__(self, app: ASGIApp, server: str) -> None:
        self.app = app
        self.server = server
        self.log = logging.getLogger(REQUEST_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        fields: dict[str, Any] = {}
        token = _fields.set(fields)
        status = 500
        started = time.perf_counter()

        async def send_and_see(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        except BaseException:
            status = 500
            fields["outcome"] = "error"
            raise
        finally:
            _fields.reset(token)
            self._write(scope, status, fields, time.perf_counter() - started)

    def _write(self, scope: Scope, status: int, fields: dict[str, Any],
               seconds: float) -> None:
        endpoint = scope.get("endpoint")  # set by the router, as are the path parameters
        txn = (scope.get("path_params") or {}).get("txn")
        if txn is not None and "txn" not in fields:
            fields["txn"] = str(txn)[:64]
        step = fields.pop("step", None) or getattr(endpoint, "__name__", None) or ""
        client = scope.get("client")
        line = {"server": self.server, "method": str(scope.get("method", "")),
                "path": str(scope.get("path", ""))[:MAX_FIELD], "status": status,
                "duration_ms": round(seconds * 1000, 2), "step": step,
                "outcome": fields.pop("outcome", None) or _outcome(status),
                "client": client[0] if client else "", **fields}
        level = logging.ERROR if status >= 500 and status != 503 else logging.INFO
        self.log.log(level, f"{line['method']} {line['path']} {status}", extra=line)
