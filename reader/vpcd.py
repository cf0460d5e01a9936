"""Serve an emulated card to the system's pcscd through the vsmartcard ``vpcd`` driver.

vpcd (Debian ``vsmartcard-vpcd``) is a PC/SC reader driver that listens on TCP (port 35963 for
"Virtual PCD 00 00", 35964 for "00 01", ...) for a *virtual card* to connect. Every message
either way is a 2-byte big-endian length, then the payload. From vpcd, a 1-byte payload is a
control code (0 power off, 1 power on, 2 reset, 4 get ATR: answered with the ATR); anything
longer is a command APDU, answered with the response APDU.

:class:`VpcdCardServer` is that virtual card: it connects to vpcd, answers until vpcd goes away
(pcscd stopped or restarted), and connects again, polling until it is told to stop. A power-off
or reset drops the card's session state (``card.reset()``), never its persistent state. With
``first_connect_timeout``, a vpcd that never answered within that time is an error
(:class:`VpcdUnreachableError`, naming host and port) instead of a silent wait; once connected,
a vpcd that goes away is waited for without limit (pcscd restarting).

Debian bookworm's vpcd writes the length and the payload in two sends; with Nagle and delayed
ACKs every APDU would stall ~40 ms. This side sets ``TCP_NODELAY`` and re-arms ``TCP_QUICKACK``
before every receive, so it never pays that.

vpcd listens on all interfaces without authentication: anyone who can reach the port can play
a card to this machine's pcscd. Keep it to loopback with a firewall rule (see the README).
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

from .base import NoPcscServiceError

VPCD_PORT = 35963
CTRL_OFF = 0
CTRL_ON = 1
CTRL_RESET = 2
CTRL_ATR = 4


class ServedCard(Protocol):
    @property
    def atr(self) -> bytes: ...

    def transmit(self, apdu: bytes) -> bytes: ...

    def reset(self) -> bytes: ...


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` or ``:PORT`` (defaults 127.0.0.1 and 35963)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, ""
    try:
        return host or "127.0.0.1", int(port) if port else VPCD_PORT
    except ValueError:
        raise ValueError(f"vpcd address {text!r} is not HOST:PORT") from None


class _Closed(Exception):
    """vpcd closed the connection."""


class VpcdUnreachableError(NoPcscServiceError):
    """Nothing listened at vpcd's address within the time allowed (exit code 4, as for no
    PC/SC service: pcscd is not running, or runs without the vpcd driver)."""

    def __init__(self, host: str, port: int, waited: float) -> None:
        super().__init__(
            f"no vpcd listening at {host}:{port} after {waited:g} s: is pcscd running, with "
            "the vsmartcard vpcd driver (Debian: pcscd vsmartcard-vpcd)?")
        self.host = host
        self.port = port


class VpcdCardServer:
    """Plays ``card`` to vpcd at ``host:port`` until :meth:`stop`."""

    def __init__(self, card: ServedCard, host: str = "127.0.0.1", port: int = VPCD_PORT, *,
                 retry_interval: float = 0.2, first_connect_timeout: float | None = None,
                 on_event: Callable[[str], None] | None = None) -> None:
        self.card = card
        self.host = host
        self.port = port
        self.retry_interval = retry_interval
        self.first_connect_timeout = first_connect_timeout
        self.on_event = on_event or (lambda _msg: None)
        self._stop = threading.Event()
        self.connected = threading.Event()
        self.apdus = 0

    def stop(self) -> None:
        self._stop.set()

    # --- the loop ---------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Connect, serve, reconnect; return once :meth:`stop` was called. Raises
        :class:`VpcdUnreachableError` if the first connection is not made in time."""
        deadline = None if self.first_connect_timeout is None \
            else time.monotonic() + self.first_connect_timeout
        while not self._stop.is_set():
            sock = self._connect(deadline)
            deadline = None
            if sock is None:
                return
            self.on_event(f"connected to vpcd at {self.host}:{self.port}")
            self.connected.set()
            try:
                self._serve(sock)
            except (_Closed, OSError) as exc:
                self.on_event(f"vpcd went away ({exc or 'closed'}); reconnecting")
            finally:
                self.connected.clear()
                sock.close()
                self.card.reset()  # the card lost power with its reader

    def _connect(self, deadline: float | None) -> socket.socket | None:
        told = False
        while not self._stop.is_set():
            try:
                sock = socket.create_connection((self.host, self.port), timeout=2)
            except OSError as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    assert self.first_connect_timeout is not None
                    raise VpcdUnreachableError(self.host, self.port,
                                               self.first_connect_timeout) from None
                if not told:
                    told = True
                    limit = "" if deadline is None else \
                        f"; trying for {deadline - time.monotonic():.0f} s"
                    self.on_event(f"no vpcd at {self.host}:{self.port} yet "
                                  f"({exc.strerror or exc}){limit}")
                self._stop.wait(self.retry_interval)  # vpcd listens only while pcscd runs
                continue
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        return None

    def _serve(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([sock], [], [], 0.25)
            if not readable:
                continue
            payload = self._read_message(sock)
            if len(payload) == 1:
                self._control(sock, payload[0])
                continue
            response = self.card.transmit(payload)
            self.apdus += 1
            sock.sendall(len(response).to_bytes(2, "big") + response)

    def _control(self, sock: socket.socket, code: int) -> None:
        if code in (CTRL_OFF, CTRL_ON, CTRL_RESET):
            self.card.reset()
            self.on_event({CTRL_OFF: "power off", CTRL_ON: "power on",
                           CTRL_RESET: "reset"}[code])
        elif code == CTRL_ATR:
            atr = bytes(self.card.atr)
            sock.sendall(len(atr).to_bytes(2, "big") + atr)
        else:
            self.on_event(f"unknown vpcd control code {code}")

    @staticmethod
    def _quickack(sock: socket.socket) -> None:
        quickack = getattr(socket, "TCP_QUICKACK", None)
        if quickack is not None:
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)

    def _read_exact(self, sock: socket.socket, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            self._quickack(sock)
            k = sock.recv_into(view[got:], n - got)
            if k == 0:
                raise _Closed()
            got += k
        return bytes(buf)

    def _read_message(self, sock: socket.socket) -> bytes:
        length = int.from_bytes(self._read_exact(sock, 2), "big")
        if length == 0:
            raise _Closed("empty message")
        return self._read_exact(sock, length)
