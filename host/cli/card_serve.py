"""``svcard card serve``: card images played to pcscd through vpcd, until Ctrl-C."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from ...card.image import open_card
from ...card.runtime import Card
from ...reader.vpcd import VpcdCardServer


def serve_images(images: list[Path], host: str, port: int, *, quiet: bool = False) -> None:
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

            servers.append(VpcdCardServer(card, host, port + i, on_event=report))
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()
            for server in servers:
                server.stop()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
        for t in threads:
            t.start()
        if not quiet:
            print(f"serving {len(servers)} card(s) to vpcd at {host}:{port}"
                  f"{'..' + str(port + len(servers) - 1) if len(servers) > 1 else ''}; "
                  "Ctrl-C stops", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        for t in threads:
            t.join(timeout=10)
        for s, handler in previous.items():
            signal.signal(s, handler)
    finally:
        for card in cards:
            card.close()
