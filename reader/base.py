"""The ``Reader`` interface shared by every backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from ..protocols.apdu import ResponseAPDU, parse_response


class ReaderError(Exception):
    """A reader that cannot be reached or used. ``exit_code`` is what the CLI exits with."""

    exit_code = 3


class NoPcscServiceError(ReaderError):
    """The PC/SC service (pcscd) is not running, or pyscard is not installed."""

    exit_code = 4


class NoSuchReaderError(ReaderError):
    """No reader matches the name, prefix or index given."""

    exit_code = 5


class CardConnectionError(ReaderError):
    """No card, or the card went away."""

    exit_code = 6


class NoCardError(CardConnectionError):
    """The reader has no card in it."""

    exit_code = 6


class CardRemovedError(CardConnectionError):
    """The card was removed (or reset by someone else) in the middle of a transaction."""

    exit_code = 7


class SharingViolationError(ReaderError):
    """Another program holds the card exclusively."""

    exit_code = 8


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

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Keep the card to this reader for the whole block: no other program's command may
        come between ours (PC/SC: ``SCardBeginTransaction`` .. ``SCardEndTransaction``).

        Wrap a value transaction in it, from SELECT to the last DEBIT or CREDIT, so another
        PC/SC client cannot SELECT, reset or query the card in the middle. Blocks nest. Here,
        for a reader no other program can reach (in process, a trace), it does nothing."""
        yield

    def exchange(self, apdu: bytes) -> ResponseAPDU:
        """``transmit`` and split the answer into data and status word."""
        return parse_response(self.transmit(apdu))

    def __enter__(self) -> Reader:
        self.connect()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.disconnect()
