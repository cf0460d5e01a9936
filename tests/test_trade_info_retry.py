"""Issue 15: the mediating agent's information message to the merchant agent is sent again
ONCE when the connection breaks under it (a kept-alive connection the merchant closed for
idleness just as the request went out). The merchant answers the same bytes with the same
acknowledgement, so the second send opens the session exactly once."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from svcard.host.kit.db import first_row
from svcard.host.trade import db as D
from svcard.host.trade.stack import TradeStack, start_trade


class DroppingProxy:
    """A TCP proxy in front of ``upstream`` that reads the whole of the first ``drops``
    requests and closes their connections without a word; later connections are relayed."""

    def __init__(self, upstream: tuple[str, int], drops: int) -> None:
        self.upstream, self.drops, self.dropped = upstream, drops, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.dropped < self.drops:
                self.dropped += 1
                self._read_request(conn)
                conn.close()
                continue
            up = socket.create_connection(self.upstream)
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _read_request(conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return
            rest += chunk

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[TradeStack]:
    s = start_trade(tmp_path / "trade", close_seconds=3600)
    yield s
    s.close()


def _through(stack: TradeStack, drops: int) -> DroppingProxy:
    shop = stack.parties["shop"]
    proxy = DroppingProxy(("127.0.0.1", shop.thread.port), drops)
    cfg = stack.acquirer.config
    cfg.merchants["shop"] = dataclasses.replace(cfg.merchants["shop"], url=proxy.url)
    return proxy


def test_a_connection_closed_under_the_information_message_is_retried_once(
        stack: TradeStack) -> None:
    proxy = _through(stack, drops=1)
    try:
        with httpx.Client(timeout=30) as http:
            alice = stack.customer("alice", 10_00)
            s = stack.open(http, alice, 5_00, unit=10)
        assert proxy.dropped == 1
        row = first_row(stack.acquirer.engine, D.acq_sessions, session=s.session)
        assert row is not None and row["state"] == D.OPEN
        shop = stack.merchants["shop"]
        assert first_row(shop.engine, D.ma_sessions, session=s.session) is not None
    finally:
        proxy.close()


def test_only_once_two_broken_connections_refuse_the_session(stack: TradeStack) -> None:
    proxy = _through(stack, drops=2)
    try:
        with httpx.Client(timeout=30) as http:
            alice = stack.customer("alice", 10_00)
            with pytest.raises(Exception, match="did not answer"):
                stack.open(http, alice, 5_00, unit=10)
        assert proxy.dropped == 2
    finally:
        proxy.close()
