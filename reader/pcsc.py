"""Real PC/SC readers through pyscard's low-level ``scard`` API.

``pcsc:NAME`` opens the reader with that exact name, or the one reader whose name starts with
NAME; ``pcsc:#N`` the N-th reader (from 0) as PC/SC lists them. T=0 and T=1 are both offered;
a ``61xx`` answer is completed with GET RESPONSE and a ``6Cxx`` answer re-issued with the right
Le here, so the host above never sees either. PC/SC failures become distinct errors
(:mod:`svcard.reader.base`): no service, no such reader, no card, card removed, sharing
violation.

pyscard has no Linux wheel: it builds from source against ``libpcsclite-dev`` with ``swig``
(``scripts/install-system-deps`` installs both). It is imported only when a PC/SC reader is used.
"""

from __future__ import annotations

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

MAX_CHAINED_RESPONSES = 64


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
        answer = self._raw(apdu)
        if answer[-2] == 0x6C and len(apdu) >= 5:
            # wrong Le: send the same command again, its last byte (Le) the one the card asked
            answer = self._raw(bytes(apdu[:-1]) + answer[-1:])
        # GET RESPONSE keeps an interindustry command's logical channel; proprietary: CLA 00
        cla = 0x00 if apdu[0] & 0x80 else apdu[0] & 0x03
        data = bytearray()
        for _ in range(MAX_CHAINED_RESPONSES):
            if answer[-2] != 0x61:
                break
            data += answer[:-2]
            answer = self._raw(bytes((cla, 0xC0, 0x00, 0x00, answer[-1])))
        else:
            raise ReaderError(f"{self.name}: more than {MAX_CHAINED_RESPONSES} GET RESPONSEs")
        return bytes(data) + answer

    def disconnect(self) -> None:
        if self._ctx is not None:
            s = self._ctx.scard
            s.SCardDisconnect(self._card, s.SCARD_LEAVE_CARD)
            self._ctx.release()
            self._ctx = None
            self._card = None
