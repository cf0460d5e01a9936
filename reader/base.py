"""The ``Reader`` interface shared by every backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType

from svcard.protocols.apdu import ResponseAPDU, parse_response


class ReaderError(Exception):
    """A reader that cannot be reached or used."""


class CardConnectionError(ReaderError):
    """No card, or the card went away."""


class Reader(ABC):
    """Connect, exchange APDUs, disconnect. ``transmit`` returns data || SW1 SW2."""

    name: str = "reader"

    @abstractmethod
    def connect(self) -> bytes:
        """Power the card (or join it) and return its ATR."""

    @abstractmethod
    def transmit(self, apdu: bytes) -> bytes:
        """Send one command APDU, return the whole response (data then the status word)."""

    @abstractmethod
    def disconnect(self) -> None:
        """Release the card."""

    def exchange(self, apdu: bytes) -> ResponseAPDU:
        """``transmit`` and split the answer into data and status word."""
        return parse_response(self.transmit(apdu))

    def __enter__(self) -> Reader:
        self.connect()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.disconnect()
