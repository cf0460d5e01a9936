"""Reader specs on the command line.

* ``virtual:IMAGE.json``: a card image opened in this process;
* ``pcsc:NAME`` / ``pcsc:#N``: a PC/SC reader by exact name, unique prefix or index;
* ``trace:FILE``: replay a recorded trace;
* ``jcardsim:APPLET_CLASS:AID``: a Java Card applet in jCardSim (``JCARDSIM_JAR``);
* ``delayed:MS:SPEC``: SPEC with MS milliseconds added to every APDU (a slow physical card).
"""

from __future__ import annotations

from ...card.image import open_card
from ...reader import Reader, ReaderError, VirtualReader
from ...reader.delayed import DelayedReader
from ...reader.jcardsim import JCardSimReader
from ...reader.pcsc import PcscReader
from ...reader.trace import TraceReader

SCHEMES = ("virtual", "pcsc", "trace", "jcardsim", "delayed")


class ReaderSpecError(ReaderError):
    """A reader spec that names no reader this svcard can open."""


def open_reader(spec: str, *, lock_timeout: float = 5.0) -> Reader:
    """The reader ``spec`` names (not yet connected: use it as a context manager)."""
    scheme, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ReaderSpecError(f"reader spec {spec!r} is not SCHEME:TARGET "
                              f"(supported: {', '.join(s + ':' for s in SCHEMES)})")
    if scheme == "virtual":
        card = open_card(rest, lock_timeout=lock_timeout)
        return VirtualReader(card, name=f"virtual:{rest}", on_disconnect=card.close)
    if scheme == "pcsc":
        return PcscReader(rest)
    if scheme == "trace":
        return TraceReader(rest)
    if scheme == "jcardsim":
        applet, sep, aid = rest.rpartition(":")
        try:
            aid_bytes = bytes.fromhex(aid)
        except ValueError:
            aid_bytes = b""
        if not sep or not applet or not aid_bytes:
            raise ReaderSpecError(f"{spec!r}: expected jcardsim:APPLET_CLASS:AID (AID in hex)")
        return JCardSimReader(applet, aid_bytes)
    if scheme == "delayed":
        ms, sep, inner = rest.partition(":")
        try:
            delay = float(ms)
        except ValueError:
            delay = -1.0
        if not sep or delay < 0:
            raise ReaderSpecError(f"{spec!r}: expected delayed:MS:SPEC")
        return DelayedReader(open_reader(inner, lock_timeout=lock_timeout), delay)
    raise ReaderSpecError(f"unknown reader scheme {scheme!r} "
                          f"(supported: {', '.join(s + ':' for s in SCHEMES)})")
