"""A child process for the kill -9 and lock tests (run with ``python cardloop.py MODE ...``).

* ``purchase IMAGE COUNT REOPEN``: COUNT purchases of 1 minor unit on the card image, with an
  in-memory demo PSAM; REOPEN=1 opens and closes the image around every purchase (waiting for
  its lock). Prints one line per purchase.
* ``hold IMAGE``: open the image, print ``locked``, wait for a line on stdin, close it.
"""

from __future__ import annotations

import sys

from svcard.card.image import card_from_image, open_card
from svcard.card.personalise import image_from_profile
from svcard.fixtures import fixture_path
from svcard.host.terminal import purse as T
from svcard.reader import VirtualReader


def purchase_loop(image: str, count: int, reopen: bool) -> None:
    psam = VirtualReader(card_from_image(image_from_profile(fixture_path("psam-demo.toml"))))
    psam.connect()
    card = None if reopen else open_card(image)
    for n in range(count):
        this = open_card(image, lock_timeout=60) if reopen else card
        assert this is not None
        reader = VirtualReader(this)
        reader.connect()
        T.purchase(reader, psam, 1)
        if reopen:
            this.close()
        print(n + 1, flush=True)


def hold(image: str) -> None:
    card = open_card(image)
    print("locked", flush=True)
    sys.stdin.readline()
    card.close()
    print("released", flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "purchase":
        purchase_loop(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1")
    elif mode == "hold":
        hold(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {mode}")
