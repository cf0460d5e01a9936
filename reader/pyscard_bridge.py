"""Between svcard readers and pyscard connections, both ways.

* :class:`SvcardCardConnection` is a pyscard ``CardConnection`` whose card is any svcard
  :class:`~svcard.reader.base.Reader`: an image in process (``virtual:``), a trace, jCardSim, a
  PC/SC reader. pyscard code runs on it unchanged: its observers
  (``ConsoleCardConnectionObserver``) see every command and response, its error-checking
  chains (``ISO7816_4ErrorChecker``) raise on status words, ``PassThruCardService`` wraps it::

      from svcard.host.terminal.reader_specs import open_reader
      connection = SvcardCardConnection(open_reader("virtual:card.json"))
      connection.addObserver(ConsoleCardConnectionObserver())
      connection.connect()
      data, sw1, sw2 = connection.transmit([0x00, 0xA4, 0x04, 0x00, 0x09, ...])

* :class:`PyscardReader` is an svcard ``Reader`` over a connection the user made with pyscard
  (``readers()[0].createConnection()``, decorated or not), so svcard's terminal flows run
  through it; ``61xx`` and ``6Cxx`` are completed as in ``pcsc:`` readers, and
  :meth:`PyscardReader.transaction` holds a PC/SC transaction when the connection (or the one
  it decorates) is a PC/SC one.

pyscard is needed (``pip install 'svcard[pcsc]'``); this module imports it when imported.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from .base import CardConnectionError, NoCardError, NoPcscServiceError, Reader, ReaderError
from .pcsc import TransactionDepth, card_transaction
from .responses import complete

try:
    from smartcard.CardConnection import CardConnection
    from smartcard.Exceptions import CardConnectionException, NoCardException
except ImportError:  # pragma: no cover - depends on the installation
    raise NoPcscServiceError("pyscard is not installed (pip install 'svcard[pcsc]'; it builds "
                             "against libpcsclite-dev with swig)") from None


def _pyscard_error(exc: ReaderError) -> Exception:
    """An svcard reader error as the pyscard exception pyscard code catches."""
    error: Exception = NoCardException(str(exc), hresult=-1) if isinstance(exc, NoCardError) \
        else CardConnectionException(str(exc))
    return error


class SvcardCardConnection(CardConnection):  # type: ignore[misc]  # pyscard is untyped
    """A pyscard ``CardConnection`` over an svcard reader (not yet connected: ``connect()``)."""

    def __init__(self, reader: Reader) -> None:
        super().__init__(reader.name)
        self.svcard_reader = reader
        self._atr: bytes | None = None

    def connect(self, protocol: int | None = None, mode: int | None = None,
                disposition: int | None = None) -> None:
        super().connect(protocol, mode, disposition)  # tells the observers
        try:
            self._atr = self.svcard_reader.connect()
        except ReaderError as exc:
            raise _pyscard_error(exc) from exc

    def reconnect(self, protocol: int | None = None, mode: int | None = None,
                  disposition: int | None = None) -> None:
        """Reset the card: disconnect the svcard reader and connect it again."""
        super().reconnect(protocol, mode, disposition)
        try:
            self.svcard_reader.disconnect()
            self._atr = self.svcard_reader.connect()
        except ReaderError as exc:
            self._atr = None
            raise _pyscard_error(exc) from exc

    def disconnect(self) -> None:
        super().disconnect()
        if self._atr is not None:
            self._atr = None
            self.svcard_reader.disconnect()

    def getATR(self) -> list[int]:
        if self._atr is None:
            raise CardConnectionException("Card not connected")
        return list(self._atr)

    def doTransmit(self, command: list[int], protocol: int | None = None
                   ) -> tuple[list[int], int, int]:
        if self._atr is None:
            raise CardConnectionException("Card not connected")
        try:
            answer = self.svcard_reader.transmit(bytes(command))
        except ReaderError as exc:
            raise _pyscard_error(exc) from exc
        return list(answer[:-2]), answer[-2], answer[-1]


def _pcsc_handle(connection: Any) -> Any:
    """The PC/SC card handle under ``connection`` (through any decorators), or None."""
    seen = 0
    while connection is not None and seen < 16:
        handle = getattr(connection, "hcard", None)
        if handle is not None:
            return handle
        connection = getattr(connection, "component", None)
        seen += 1
    return None


class PyscardReader(Reader):
    """An svcard reader over a user's pyscard ``CardConnection``.

    ``connect=True`` (default): ``connect()`` and ``disconnect()`` open and close the
    connection, as for every svcard reader. ``connect=False``: the connection is already open
    and stays open; this reader only reads its ATR and sends commands.

    The connection's own error-checking chain, if it has one, still runs on every answer and
    raises its ``SWException`` through svcard; svcard reads status words itself, so leave the
    chain off a connection given to svcard's flows."""

    def __init__(self, connection: Any, *, connect: bool = True) -> None:
        self.connection = connection
        self._owns = connect
        self._connected = False
        self._depth = TransactionDepth()
        self.name = f"pyscard:{connection.getReader()}"

    def connect(self) -> bytes:
        try:
            if self._owns:
                self.connection.connect()
            atr = bytes(self.connection.getATR() or b"")
        except NoCardException as exc:
            raise NoCardError(f"{self.name}: {exc}") from None
        except CardConnectionException as exc:
            raise CardConnectionError(f"{self.name}: {exc}") from None
        self._connected = True
        return atr

    def _raw(self, apdu: bytes) -> bytes:
        try:
            data, sw1, sw2 = self.connection.transmit(list(apdu))
        except NoCardException as exc:
            raise NoCardError(f"{self.name}: {exc}") from None
        except CardConnectionException as exc:
            raise CardConnectionError(f"{self.name}: transmit failed: {exc}") from None
        return bytes(data) + bytes((sw1, sw2))

    def transmit(self, apdu: bytes) -> bytes:
        if not self._connected:
            raise ReaderError(f"{self.name}: not connected (call connect first)")
        if len(apdu) < 4:
            raise ReaderError(f"a command APDU has at least 4 bytes, got {len(apdu)}")
        return complete(self._raw, apdu, self.name)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A PC/SC transaction on the connection's card handle (an
        :class:`SvcardCardConnection`: its svcard reader's); nothing for a connection that has
        neither."""
        inner = getattr(self.connection, "svcard_reader", None)
        if isinstance(inner, Reader):
            with inner.transaction():
                yield
            return
        handle = _pcsc_handle(self.connection)
        if handle is None:
            yield
            return
        from smartcard import scard

        with card_transaction(scard, handle, self.name, self._depth):
            yield

    def disconnect(self) -> None:
        if self._connected and self._owns:
            # a card or reader that is gone already leaves nothing to release
            with suppress(CardConnectionException):
                self.connection.disconnect()
        self._connected = False
