"""Reader specs on the command line: ``virtual:PATH`` (a card image in this process).

``pcsc:NAME`` and ``trace:PATH`` arrive with the readers work; until then they are refused
with a clear message.
"""

from __future__ import annotations

from svcard.card.image import open_card
from svcard.reader import Reader, ReaderError, VirtualReader

SCHEMES = ("virtual",)


class ReaderSpecError(ReaderError):
    """A reader spec that names no reader this svcard can open."""


def open_reader(spec: str, *, lock_timeout: float = 5.0) -> Reader:
    """A connected-on-enter reader for ``spec``. The caller connects and disconnects it."""
    scheme, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ReaderSpecError(f"reader spec {spec!r} is not SCHEME:TARGET "
                              f"(supported: {', '.join(s + ':' for s in SCHEMES)})")
    if scheme == "virtual":
        card = open_card(rest, lock_timeout=lock_timeout)
        return VirtualReader(card, name=f"virtual:{rest}", on_disconnect=card.close)
    if scheme in ("pcsc", "trace", "jcardsim"):
        raise ReaderSpecError(f"{scheme}: readers are not available in this svcard version")
    raise ReaderSpecError(f"unknown reader scheme {scheme!r} "
                          f"(supported: {', '.join(s + ':' for s in SCHEMES)})")
