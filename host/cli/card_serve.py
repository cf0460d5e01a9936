"""``svcard card serve``: card images played to pcscd through vpcd, until Ctrl-C.

If no vpcd listens at an image's port within ``wait`` seconds, the command stops with exit
code 4 and names that host:port (vicc says "Is pcscd running?"); it says at once that it is
waiting. Once a card is connected, a vpcd that goes away (pcscd restarting) is waited for
without limit. On loopback, a PC/SC context is opened once first: a socket-activated pcscd
(Debian's ``pcscd.socket``) starts on it, and loads the vpcd driver.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from ...card.image import open_card
from ...card.runtime import Card
from ...reader import ReaderError
from ...reader.vpcd import VpcdCardServer

DEFAULT_WAIT = 10.0  # seconds for vpcd to listen, at the start
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _wake_pcscd(host: str) -> None:
    if host not in LOOPBACK:
        return
    from ...reader.pcsc import ping_service

    ping_service()


def serve_images(images: list[Path], host: str, port: int, *, quiet: bool = False,
                 wait: float | None = DEFAULT_WAIT) -> None:
    """Serve ``images`` to vpcd at ``port``, ``port + 1``, ... until SIGINT or SIGTERM.
    ``wait``: how long the first connection may take (None: no limit)."""
    cards: list[Card] = []
    servers: list[VpcdCardServer] = []
    try:
        for i, image in enumerate(images):
            card = open_card(image)
            cards.append(card)

            def report(msg: str, name: str = image.name, slot: int = i) -> None:
                if not quiet:
                    print(f"[{name} -> Virtual PCD 00 {slot:02d}] {msg}", file=sys.stderr,
                          flush=True)

            servers.append(VpcdCardServer(card, host, port + i, first_connect_timeout=wait,
                                          on_event=report))
        stop = threading.Event()
        errors: list[ReaderError] = []

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        def run(server: VpcdCardServer) -> None:
            try:
                server.serve_forever()
            except ReaderError as exc:
                errors.append(exc)
                stop.set()

        _wake_pcscd(host)
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in servers]
        try:
            for t in threads:
                t.start()
            if not quiet:
                print(f"serving {len(servers)} card(s) to vpcd at {host}:{port}"
                      f"{'..' + str(port + len(servers) - 1) if len(servers) > 1 else ''}; "
                      "Ctrl-C stops", file=sys.stderr, flush=True)
            while not stop.wait(0.5):
                pass
        finally:
            for server in servers:
                server.stop()
            for t in threads:
                t.join(timeout=10)
            for s, handler in previous.items():
                signal.signal(s, handler)
        if errors:
            raise errors[0]
    finally:
        for card in cards:
            card.close()
