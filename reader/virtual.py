"""The in-process virtual reader: a card object in the same process, no transport at all."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .base import CardConnectionError, Reader


class CardLike(Protocol):
    @property
    def atr(self) -> bytes: ...

    def transmit(self, apdu: bytes) -> bytes: ...


class VirtualReader(Reader):
    """A reader with ``card`` inserted. ``reset`` (if the card has one) runs at connect;
    ``on_disconnect`` (for example: close the card image) runs at disconnect."""

    def __init__(self, card: CardLike, name: str = "svcard virtual reader",
                 on_disconnect: Callable[[], None] | None = None) -> None:
        self.card = card
        self.name = name
        self._on_disconnect = on_disconnect
        self._connected = False

    def connect(self) -> bytes:
        reset = getattr(self.card, "reset", None)
        atr = reset() if callable(reset) else self.card.atr
        self._connected = True
        return bytes(atr)

    def transmit(self, apdu: bytes) -> bytes:
        if not self._connected:
            raise CardConnectionError(f"{self.name}: not connected (call connect first)")
        return self.card.transmit(apdu)

    def disconnect(self) -> None:
        self._connected = False
        if self._on_disconnect is not None:
            self._on_disconnect()
            self._on_disconnect = None
