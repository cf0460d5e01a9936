"""Running the servers with uvicorn: :func:`serve` for ``svcard serve ...`` (JSON logs, a
graceful drain on SIGTERM), :class:`ServerThread` on loopback in a background thread (tests,
demo, benchmarks).

The drain. On SIGTERM (or Ctrl-C) :func:`serve` does not stop at once: it tells the server
(:meth:`Drainable.begin_drain`), which from then on refuses new work (503, ``Retry-After``,
``Connection: close``) and answers its health check 503 ``draining``, but still takes the
requests that finish work already begun: the card's answer for a FIG. 5 payment whose PSAM is
held. When the server has nothing pending (:meth:`Drainable.pending`) or ``drain_seconds``
have passed, uvicorn's own graceful shutdown follows: the listening socket closes, requests in
flight get what is left of the deadline (at least a second), the lifespan ends (held PSAMs
released, readers closed). Then the process exits 0 after SIGTERM, 130 after Ctrl-C. A second
signal stops waiting for pending work; a third Ctrl-C stops at once.

:class:`NodeProcess` is one server node as a child process (``python -m MODULE SPEC.json``),
for the node tests and benchmarks (docs/deploy-nodes.md): started, signalled, SIGKILLed as a
crash, started again on its port.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import click
import uvicorn

from .command_line import EXIT_INTERRUPTED, EXIT_OK
from .config import ConfigError
from .request_log import LOG_LEVELS, configure_logging

if TYPE_CHECKING:  # kit.http (sqlalchemy) loads with a server, not for svcard pay's start
    from .http import SqlRunner

log = logging.getLogger("svcard.serve")
DRAIN_SECONDS = 10.0


class Drainable(Protocol):
    """What :func:`serve` asks of a server for the drain."""

    def begin_drain(self) -> None:
        """From now on, refuse new work; still take what finishes work already begun."""

    def pending(self) -> int:
        """How many pieces of begun work the drain waits for (0: none)."""


class Drain:
    """A server's drain state, for servers whose requests each finish on their own (nothing
    spans requests): refuse new work from :meth:`begin_drain` on, wait for nothing."""

    def __init__(self) -> None:
        self.draining = False

    def begin_drain(self) -> None:
        self.draining = True

    def pending(self) -> int:
        return 0


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drainable | None,
                 drain_seconds: float) -> None:
        super().__init__(config)
        self.drain, self.drain_seconds = drain, drain_seconds
        self.stop_signal: int | None = None
        self.deadline = 0.0
        self.signals = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn's own handler re-raises the signal once it has shut down, which makes a
        # SIGTERM'd process end "killed by SIGTERM"; here the exit code says how it ended
        self.signals += 1
        if self.stop_signal is None:
            self.stop_signal = sig
            self.deadline = time.monotonic() + self.drain_seconds
            if self.drain is not None:
                self.drain.begin_drain()
        elif not self.should_exit:
            self.should_exit = True
        elif sig == signal.SIGINT:
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.stop_signal is not None and not self.should_exit:
            pending = self.drain.pending() if self.drain is not None else 0
            left = self.deadline - time.monotonic()
            if counter % 10 == 0 or pending == 0:
                log.info("draining: %d pending, %.1f s left", pending, max(left, 0),
                         extra={"pending": pending})
            if pending == 0 or left <= 0:
                if pending:
                    log.warning("drain deadline passed with %d pending", pending,
                                extra={"pending": pending})
                self.config.timeout_graceful_shutdown = max(1, math.ceil(left))
                self.should_exit = True
        return await super().on_tick(counter)


F = TypeVar("F", bound=Callable[..., Any])

MAX_PROXIES, _trusted = 32, cast(tuple[str, ...], ())   # _trusted: --trusted-proxy


def trusted_proxies(values: Sequence[str]) -> tuple[str, ...]:
    """Proxies' IP addresses or networks (``10.0.0.0/8``); a bad one: ValueError."""
    if len(values) > MAX_PROXIES:
        raise ValueError(f"at most {MAX_PROXIES} trusted proxies")
    out = []
    for value in values:
        try:
            out.append(str(ipaddress.ip_network(value.strip(), strict=False)))
        except ValueError:
            raise ValueError(f"{value[:60]!r} is not an IP address or network") from None
    return tuple(out)


def serve_options(f: F) -> F:
    """``--log-level``, ``--drain-seconds`` (passed as ``log_level``, ``drain_seconds``) and
    ``--trusted-proxy`` (kept for :func:`serve`) for a ``svcard serve`` command."""
    inner = f
    @functools.wraps(f)
    def command(*args: Any, trusted_proxy: tuple[str, ...] = (), **kwargs: Any) -> Any:
        global _trusted
        try:
            _trusted = trusted_proxies(trusted_proxy)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--trusted-proxy'") from None
        try:
            return inner(*args, **kwargs)
        finally:
            _trusted = ()

    f = click.option("--trusted-proxy", "trusted_proxy", multiple=True, metavar="ADDR",
                     help="A proxy (nginx, which must overwrite the header) whose "
                          "X-Forwarded-For names the client: an IP address or network; "
                          "repeat for more (default: none believed; docs/deploy-nodes.md).")(
        cast(F, command))
    f = click.option("--drain-seconds", "drain_seconds", default=DRAIN_SECONDS,
                     show_default=True, type=click.FloatRange(0, 3600),
                     help="On SIGTERM, how long pending work (held FIG. 5 payments, requests "
                          "in flight) may take to finish before the server stops.")(f)
    return click.option("--log-level", "log_level", default="info", show_default=True,
                        type=click.Choice(LOG_LEVELS),
                        help="Log lines (JSON, one per request, on stderr) at this level "
                             "and above.")(f)


NODE_NAME = r"^[A-Za-z0-9_.-]{1,60}$"   # as node_name in a server's TOML
MIN_LEASE, MAX_LEASE = 1.0, 3600.0
C = TypeVar("C")


def node_options(module: str) -> Callable[[F], F]:
    """``--node NAME`` and ``--lease-seconds S`` for ``svcard serve payment``/``load`` (passed
    as ``node`` and ``lease_seconds``; :func:`node_settings` applies them); ``module``: "PSAM"
    or "HSM"."""
    def add(f: F) -> F:
        f = click.option("--lease-seconds", "lease_seconds", default=None, metavar="S",
                         help=f"A node's {module} lease: a dead node's {module}s are taken "
                              "over after this (1-3600; default: lease_seconds in the "
                              "config, else 10).")(f)
        return click.option("--node", "node", default=None, metavar="NAME",
                            help="Run as one of several nodes on one (PostgreSQL) database: "
                                 f"give every node the same {module} list; a node opens a "
                                 f"{module} only while it holds its lease (overrides "
                                 "node_name in the config; docs/deploy-nodes.md).")(f)
    return add


def node_settings(config: C, node: str | None, lease_seconds: str | None) -> C:
    """``config`` (a server's configuration dataclass with ``node_name`` and
    ``lease_seconds``) with ``--node NAME --lease-seconds S`` over the file's settings; a bad
    value is a :class:`~.config.ConfigError` naming the option."""
    if node is not None:
        if not re.fullmatch(NODE_NAME, node):
            raise ConfigError(f"--node: {node[:80]!r} is not a node name (1 to 60 letters, "
                              "digits, '_', '.' or '-')")
        config = dataclasses.replace(config, node_name=node)  # type: ignore[type-var]
    if lease_seconds is not None:
        try:
            value = float(lease_seconds)
        except ValueError:
            value = math.nan
        if not MIN_LEASE <= value <= MAX_LEASE:   # NaN fails too
            raise ConfigError(f"--lease-seconds: {lease_seconds[:40]!r} is not a number of "
                              f"seconds from {MIN_LEASE:g} to {MAX_LEASE:g}")
        if not getattr(config, "node_name", ""):
            raise ConfigError("--lease-seconds: only for a node (give --node NAME or "
                              "node_name in the configuration)")
        config = dataclasses.replace(config, lease_seconds=value)  # type: ignore[type-var]
    return config


def proxy_settings(proxies: Sequence[str] | None) -> dict[str, Any]:
    """uvicorn's settings: ``X-Forwarded-For`` believed on connections from ``proxies``
    only (None: the command's ``--trusted-proxy``)."""
    proxies = _trusted if proxies is None else trusted_proxies(proxies)
    return {"proxy_headers": bool(proxies), "forwarded_allow_ips": list(proxies) or None}


def serve(app: Any, *, host: str, port: int, log_level: str = "info",
          drain: Drainable | None = None, drain_seconds: float = DRAIN_SECONDS,
          proxies: Sequence[str] | None = None) -> int:
    """Run ``app`` in the foreground until SIGTERM or Ctrl-C, logging JSON lines on stderr at
    ``log_level``, draining ``drain`` for at most ``drain_seconds`` (see the module); the
    process's exit code. A server that cannot start (a lifespan error, the port taken) makes
    uvicorn exit 3. A client's address is its connection's, or the ``X-Forwarded-For``
    header's on a connection from one of ``proxies`` (default: ``--trusted-proxy``; none)."""
    configure_logging(log_level)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, log_level=log_level,
                            access_log=False, lifespan="on", **proxy_settings(proxies),
                            timeout_graceful_shutdown=max(1, math.ceil(drain_seconds)))
    server = _DrainingServer(config, drain, drain_seconds)
    server.run()
    return EXIT_INTERRUPTED if server.stop_signal == signal.SIGINT else EXIT_OK


async def drain_writer(sql: SqlRunner) -> None:
    """At a server's shutdown (its lifespan's end): the SQLite writer COMMITS every step still
    queued (a daemon thread would die with the process, its group rolled back), then ends; a
    fresh idle writer takes its place (for an app started again, as in the tests)."""
    writer = sql.executor
    if writer is not None:
        await asyncio.to_thread(writer.shutdown)
        sql.executor = type(writer)()


Lifespan = Callable[[Any], contextlib.AbstractAsyncContextManager[None]]


def with_writer_drained(sql: SqlRunner, lifespan: Lifespan | None = None) -> Lifespan:
    """A Starlette lifespan: ``lifespan`` (if any), then at shutdown :func:`drain_writer` on
    ``sql`` however the inner one ended."""
    @contextlib.asynccontextmanager
    async def drained(app: Any) -> AsyncIterator[None]:
        try:
            if lifespan is None:
                yield
            else:
                async with lifespan(app):
                    yield
        finally:
            await drain_writer(sql)   # the last group committed, not rolled back
    return drained


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None,
                 proxies: Sequence[str] = ()) -> None:
        self.host = host
        self.port = port or free_port()
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                lifespan="on", access_log=False, **proxy_settings(proxies))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server failed to start (see its log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {timeout:g} s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_http(url: str, timeout: float = 60.0) -> None:
    """Poll ``url`` until it answers 200 (a server process starting); TimeoutError after
    ``timeout`` seconds."""
    import httpx
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:g} s")
        time.sleep(0.02)


def write_private_json(path: Path, document: Mapping[str, Any]) -> None:
    """``document`` as JSON in a file of mode 0600 (a node's spec holds a key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(document, f)


class NodeProcess:
    """A node process, ``python -m MODULE FOLDER/NAME.json`` (its spec, mode 0600), its output
    in ``FOLDER/NAME.log``: started, SIGKILLed (a crash), SIGSTOPped and continued, stopped,
    started again on its port. Ready once ``/v1/health`` answers below ``ready_below``."""

    def __init__(self, folder: Path, name: str, port: int, module: str,
                 document: Mapping[str, Any], ready_below: int = 500) -> None:
        self.name, self.port, self.module, self.ready_below = name, port, module, ready_below
        self.spec_path = folder / f"{name}.json"
        self.log_path = folder / f"{name}.log"
        write_private_json(self.spec_path, document)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> NodeProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", self.module,
                                          str(self.spec_path)],
                                         stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node {self.name} exited ({self.proc.returncode}); "
                                   f"see {self.log_path}")
            try:
                if httpx.get(self.url + "/v1/health", timeout=2).status_code < self.ready_below:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"node {self.name} not ready within {timeout:g} s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is closed; the image locks go with the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)   # a stopped process dies as well
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM (the drain, then the writer's last group committed), SIGKILL after 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
