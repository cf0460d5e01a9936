"""Real PC/SC readers through pyscard's low-level ``scard`` API.

``pcsc:NAME`` opens the reader with that exact name, or the one reader whose name starts with
NAME; ``pcsc:#N`` the N-th reader (from 0) as PC/SC lists them. T=0 and T=1 are both offered;
a ``61xx`` answer is completed with GET RESPONSE and a ``6Cxx`` answer re-issued with the right
Le here (:mod:`svcard.reader.responses`), so the host above never sees either. PC/SC failures
become distinct errors (:mod:`svcard.reader.base`): no service, no such reader, no card, card
removed, sharing violation.

:meth:`PcscReader.transaction` holds ``SCardBeginTransaction`` for a block: pcsc-lite makes any
other client's command to that card wait until the block ends. :func:`watch` reports readers
and cards coming and going (``svcard readers --watch``), as ``pcsc_scan`` does.

pyscard has no Linux wheel: it builds from source against ``libpcsclite-dev`` with ``swig``
(``scripts/install-system-deps`` installs both). It is imported only when a PC/SC reader is used.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .base import (
    CardRemovedError,
    NoCardError,
    NoPcscServiceError,
    NoSuchReaderError,
    Reader,
    ReaderError,
    SharingViolationError,
)
from .responses import complete


def _scard() -> ModuleType:
    try:
        from smartcard import scard
    except ImportError:
        raise NoPcscServiceError("pyscard is not installed (pip install 'svcard[pcsc]'; it "
                                 "builds against libpcsclite-dev with swig)") from None
    module: ModuleType = scard
    return module


def _error(scard: ModuleType, hresult: int, what: str) -> ReaderError:
    """Map a PC/SC result code to our error classes."""
    message = f"{what}: {scard.SCardGetErrorMessage(hresult)} (0x{hresult & 0xFFFFFFFF:08X})"
    code = hresult & 0xFFFFFFFF
    table: dict[int, type[ReaderError]] = {
        scard.SCARD_E_NO_SERVICE & 0xFFFFFFFF: NoPcscServiceError,
        scard.SCARD_E_SERVICE_STOPPED & 0xFFFFFFFF: NoPcscServiceError,
        scard.SCARD_E_NO_READERS_AVAILABLE & 0xFFFFFFFF: NoSuchReaderError,
        scard.SCARD_E_UNKNOWN_READER & 0xFFFFFFFF: NoSuchReaderError,
        scard.SCARD_E_READER_UNAVAILABLE & 0xFFFFFFFF: NoSuchReaderError,
        scard.SCARD_E_NO_SMARTCARD & 0xFFFFFFFF: NoCardError,
        scard.SCARD_W_REMOVED_CARD & 0xFFFFFFFF: CardRemovedError,
        scard.SCARD_W_RESET_CARD & 0xFFFFFFFF: CardRemovedError,
        scard.SCARD_W_UNPOWERED_CARD & 0xFFFFFFFF: CardRemovedError,
        scard.SCARD_W_UNRESPONSIVE_CARD & 0xFFFFFFFF: CardRemovedError,
        scard.SCARD_E_SHARING_VIOLATION & 0xFFFFFFFF: SharingViolationError,
    }
    return table.get(code, ReaderError)(message)


@dataclass(frozen=True)
class ReaderStatus:
    name: str
    card_present: bool
    atr: bytes


class _Context:
    """A PC/SC context, released on exit."""

    def __init__(self) -> None:
        self.scard = _scard()
        hresult, self.handle = self.scard.SCardEstablishContext(self.scard.SCARD_SCOPE_USER)
        if hresult != self.scard.SCARD_S_SUCCESS:
            raise _error(self.scard, hresult, "cannot reach the PC/SC service (is pcscd running?)")

    def readers(self) -> list[str]:
        hresult, names = self.scard.SCardListReaders(self.handle, [])
        if (hresult & 0xFFFFFFFF) == (self.scard.SCARD_E_NO_READERS_AVAILABLE & 0xFFFFFFFF):
            return []
        if hresult != self.scard.SCARD_S_SUCCESS:
            raise _error(self.scard, hresult, "cannot list readers")
        return list(names)

    def release(self) -> None:
        self.scard.SCardReleaseContext(self.handle)

    def __enter__(self) -> _Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def list_readers() -> list[ReaderStatus]:
    """Every PC/SC reader, whether a card is in it, and the card's ATR."""
    with _Context() as ctx:
        names = ctx.readers()
        if not names:
            return []
        s = ctx.scard
        states = [(n, s.SCARD_STATE_UNAWARE) for n in names]
        hresult, result = s.SCardGetStatusChange(ctx.handle, 0, states)
        if hresult not in (s.SCARD_S_SUCCESS, s.SCARD_E_TIMEOUT):
            raise _error(s, hresult, "cannot read reader states")
        return [ReaderStatus(name, bool(state & s.SCARD_STATE_PRESENT), bytes(atr))
                for name, state, atr in result]


def resolve_reader(names: list[str], target: str) -> str:
    """The one reader that ``target`` names: ``#N``, an exact name, or a unique prefix."""
    if target.startswith("#"):
        try:
            return names[int(target[1:])]
        except (ValueError, IndexError):
            raise NoSuchReaderError(f"no reader {target} (there are {len(names)})") from None
    if target in names:
        return target
    matches = [n for n in names if n.startswith(target)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        listed = "; ".join(names) or "none"
        raise NoSuchReaderError(f"no reader named {target!r} (readers: {listed})")
    raise NoSuchReaderError(f"{target!r} matches several readers: {'; '.join(matches)}")


class PcscReader(Reader):
    """One card in one PC/SC reader, shared with other programs (SCARD_SHARE_SHARED)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.name = f"pcsc:{target}"
        self._ctx: _Context | None = None
        self._card: Any = None
        self._protocol: int = 0
        self._lock = TransactionDepth()
        self.atr = b""

    def connect(self) -> bytes:
        ctx = _Context()
        try:
            name = resolve_reader(ctx.readers(), self.target)
            s = ctx.scard
            hresult, card, protocol = s.SCardConnect(
                ctx.handle, name, s.SCARD_SHARE_SHARED, s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1)
            if hresult != s.SCARD_S_SUCCESS:
                raise _error(s, hresult, f"cannot connect to the card in {name!r}")
            hresult, _reader, _state, _proto, atr = s.SCardStatus(card)
            if hresult != s.SCARD_S_SUCCESS:
                s.SCardDisconnect(card, s.SCARD_LEAVE_CARD)
                raise _error(s, hresult, f"cannot read the card status in {name!r}")
        except BaseException:
            ctx.release()
            raise
        self._ctx, self._card, self._protocol = ctx, card, protocol
        self.name = f"pcsc:{name}"
        self.atr = bytes(atr)
        return self.atr

    def _raw(self, apdu: bytes) -> bytes:
        if self._ctx is None:
            raise ReaderError(f"{self.name}: not connected (call connect first)")
        s = self._ctx.scard
        hresult, response = s.SCardTransmit(self._card, self._protocol, list(apdu))
        if hresult != s.SCARD_S_SUCCESS:
            raise _error(s, hresult, f"{self.name}: transmit failed")
        if len(response) < 2:
            raise ReaderError(f"{self.name}: the card answered {len(response)} bytes")
        return bytes(response)

    def transmit(self, apdu: bytes) -> bytes:
        if len(apdu) < 4:
            # vpcd would read a 1-byte payload as a control code and hang; no card wants this
            raise ReaderError(f"a command APDU has at least 4 bytes, got {len(apdu)}")
        return complete(self._raw, apdu, self.name)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        if self._ctx is None:
            raise ReaderError(f"{self.name}: not connected (call connect first)")
        with card_transaction(self._ctx.scard, self._card, self.name, self._lock):
            yield

    def disconnect(self) -> None:
        if self._ctx is not None:
            s = self._ctx.scard
            s.SCardDisconnect(self._card, s.SCARD_LEAVE_CARD)
            self._ctx.release()
            self._ctx = None
            self._card = None


class TransactionDepth:
    """How deeply transaction blocks are nested on one card handle (only the outermost one
    begins and ends the PC/SC transaction)."""

    def __init__(self) -> None:
        self.depth = 0


@contextmanager
def card_transaction(scard: ModuleType, handle: Any, name: str,
                     depth: TransactionDepth) -> Iterator[None]:
    """``SCardBeginTransaction`` on ``handle`` for the block (nested blocks join the outer one).

    pcsc-lite makes every other handle's command to the card wait until the block ends; a
    second transaction waits too. The end is not checked: a card removed or reset inside the
    block has ended the transaction already, and the block's own command said so."""
    if depth.depth == 0:
        hresult = scard.SCardBeginTransaction(handle)
        if hresult != scard.SCARD_S_SUCCESS:
            raise _error(scard, hresult, f"{name}: cannot begin a PC/SC transaction")
    depth.depth += 1
    try:
        yield
    finally:
        depth.depth -= 1
        if depth.depth == 0:
            scard.SCardEndTransaction(handle, scard.SCARD_LEAVE_CARD)


# --- watching readers and cards --------------------------------------------------------------
PNP_NOTIFICATION = "\\\\?PnP?\\Notification"  # PC/SC's pseudo reader: readers added/removed
READER_ADDED = "reader_added"
READER_REMOVED = "reader_removed"
CARD_INSERTED = "card_inserted"
CARD_REMOVED = "card_removed"


@dataclass(frozen=True)
class ReaderEvent:
    """A reader or card that came or went. ``initial``: found so at the start of the watch."""

    event: str
    reader: str
    atr: bytes = b""
    initial: bool = False


def watch(poll_ms: int = 500, stop: threading.Event | None = None) -> Iterator[ReaderEvent]:
    """Every reader and card event until ``stop`` is set (or the consumer stops): first what is
    there (``initial``), then each change as PC/SC reports it (``SCardGetStatusChange``).

    Each wait lasts at most ``poll_ms``, so ``stop`` and Ctrl-C are seen within that time. A
    card taken out and put back between two looks is still two events (pcsc-lite counts events
    in the upper half of the state)."""
    with _Context() as ctx:
        s = ctx.scard
        states: dict[str, int] = {}
        pnp_state: int | None = s.SCARD_STATE_UNAWARE
        initial = True
        while stop is None or not stop.is_set():
            names = ctx.readers()
            for name in [n for n in states if n not in names]:
                if states.pop(name) & s.SCARD_STATE_PRESENT:
                    yield ReaderEvent(CARD_REMOVED, name)
                yield ReaderEvent(READER_REMOVED, name)
            for name in names:
                if name not in states:
                    states[name] = s.SCARD_STATE_UNAWARE
                    yield ReaderEvent(READER_ADDED, name, initial=initial)
            query = [(n, states[n]) for n in names]
            if pnp_state is not None:
                query.append((PNP_NOTIFICATION, pnp_state))
            if not query:  # no readers, and no PnP to wait on: look again later
                initial = False
                if stop is not None:
                    stop.wait(poll_ms / 1000)
                continue
            hresult, result = s.SCardGetStatusChange(ctx.handle, poll_ms, query)
            code = hresult & 0xFFFFFFFF
            if code == s.SCARD_E_TIMEOUT & 0xFFFFFFFF:
                continue
            if code in (s.SCARD_E_UNKNOWN_READER & 0xFFFFFFFF,
                        s.SCARD_E_READER_UNAVAILABLE & 0xFFFFFFFF):
                continue  # a reader went between the listing and the wait: list again
            if hresult != s.SCARD_S_SUCCESS:
                raise _error(s, hresult, "cannot watch the readers")
            for name, state, atr in result:
                if name == PNP_NOTIFICATION:
                    # a PC/SC without PnP support says UNKNOWN: watch the listed readers only
                    pnp_state = None if state & s.SCARD_STATE_UNKNOWN \
                        else state & ~s.SCARD_STATE_CHANGED
                    continue
                yield from _card_events(s, name, states.get(name, 0), state, bytes(atr),
                                        initial)
                if name in states:
                    states[name] = state & ~s.SCARD_STATE_CHANGED
            initial = False


def _card_events(s: ModuleType, name: str, before: int, after: int, atr: bytes,
                 initial: bool) -> Iterator[ReaderEvent]:
    had = bool(before & s.SCARD_STATE_PRESENT)
    has = bool(after & s.SCARD_STATE_PRESENT)
    counted = before != s.SCARD_STATE_UNAWARE and (before >> 16) != (after >> 16)
    if had and (not has or counted):
        yield ReaderEvent(CARD_REMOVED, name)
    if has and (not had or counted):
        yield ReaderEvent(CARD_INSERTED, name, atr, initial)


def ping_service() -> bool:
    """Open and close a PC/SC context: True if pcscd answered. A socket-activated pcscd
    (Debian's ``pcscd.socket``) starts on this, and with it the vpcd driver's listener."""
    try:
        with _Context():
            return True
    except ReaderError:
        return False
