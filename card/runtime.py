"""A small ISO 7816 card runtime: ATR, application selection, GET RESPONSE, status words.

A :class:`Card` holds applications (:class:`Application`), routes each command APDU to the one
selected, and turns every failure into a status word: nothing raises out of
:meth:`Card.transmit` except :class:`~svcard.card.storage.PowerCut`, which models the card
losing power.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..protocols import sw as SW
from ..protocols.apdu import APDUFormatError, CommandAPDU, parse_command
from ..protocols.purse import CLA_ISO, INS_GET_RESPONSE, INS_SELECT

log = logging.getLogger(__name__)

# A T=1 ATR: TS=3B, T0=88 (TD1, 8 historical bytes), TD1=80, TD2=01 (T=1), "SVCARD01", TCK.
DEFAULT_ATR = bytes.fromhex("3B888001535643415244303119")
# A T=0 ATR: TS=3B, T0=08 (no interface bytes, so T=0 only; 8 historical bytes), "SVCARD01";
# no TCK (ISO 7816-3: absent when T=0 is the only protocol).
DEFAULT_ATR_T0 = bytes.fromhex("3B085356434152443031")


def default_atr(t0: bool) -> bytes:
    """svcard's ATR for a card that speaks T=0 (``t0``) or T=1."""
    return DEFAULT_ATR_T0 if t0 else DEFAULT_ATR


def atr_protocols(atr: bytes) -> tuple[int, ...]:
    """The transmission protocols an ATR offers (ISO 7816-3: the T of each TDi; no TD1 means
    T=0 only; T=15 marks global bytes and is no protocol)."""
    if len(atr) < 2 or atr[0] not in (0x3B, 0x3F):
        raise ValueError("an ATR starts with TS 3B or 3F and T0")
    present, i, offered = atr[1] >> 4, 2, []
    while True:
        i += bin(present & 0x7).count("1")          # TAi, TBi, TCi
        if not present & 0x8:
            break
        if i >= len(atr):
            raise ValueError("the ATR ends inside its interface bytes")
        td = atr[i]
        i += 1
        if td & 0x0F != 15 and td & 0x0F not in offered:
            offered.append(td & 0x0F)
        present = td >> 4
    if i > len(atr):
        raise ValueError("the ATR ends inside its interface bytes")
    return tuple(offered) or (0,)


def check_atr(atr: bytes, t0: bool) -> None:
    """Refuse (ValueError) an ATR that contradicts ``t0``: a T=0 card's ATR offers T=0 only
    (else a reader picks T=1 and gets 61xx answers it never asked for); a T=1 card's offers
    T=1."""
    offered = atr_protocols(atr)
    if t0 and offered != (0,):
        raise ValueError("t0 = true needs an ATR that offers T=0 only, this one offers "
                         + ", ".join(f"T={p}" for p in offered)
                         + " (leave atr out for svcard's T=0 ATR)")
    if not t0 and 1 not in offered:
        raise ValueError("this ATR offers T=0 only: set t0 = true, or give an ATR that "
                         "offers T=1")


class CardError(Exception):
    """Raised inside an application to answer with a status word and no data."""

    def __init__(self, sw: int) -> None:
        super().__init__(f"{sw:04X}")
        self.sw = sw


class Application:
    """Base of a card application. Subclasses set ``aid`` and implement :meth:`process`;
    they call ``persist()`` at each point where their state must survive a power cut."""

    aid: bytes = b""
    persist: Callable[[], None]
    # the CLA bytes with secure-messaging bits this application checks itself (e.g. 04)
    secure_messaging_classes: tuple[int, ...] = ()

    def fci(self) -> bytes:
        return b""

    def on_select(self) -> None:
        """Called when the application is selected; session state starts afresh."""

    def on_deselect(self) -> None:
        """Called when another application is selected or the card is reset."""

    def process(self, cmd: CommandAPDU) -> bytes:
        """Handle one command; return the answer data (SW 9000) or raise :class:`CardError`."""
        raise CardError(SW.INS_NOT_SUPPORTED)

    def to_state(self) -> dict[str, Any]:
        raise NotImplementedError


Handler = Callable[[CommandAPDU], bytes]


class TableApplication(Application):
    """An application whose commands are a table ``(CLA, INS) -> handler``.

    A pending operation (an INITIALIZE waiting for its DEBIT, say) survives only into the
    handlers in ``keep_pending`` (its completion, and queries that change nothing); any other
    command ends it via :meth:`end_pending`.
    """

    handlers: dict[tuple[int, int], Handler]
    keep_pending: tuple[Handler, ...] = ()

    def end_pending(self) -> None:
        """Forget any operation waiting for its completion."""

    def on_select(self) -> None:
        self.end_pending()

    def on_deselect(self) -> None:
        self.end_pending()

    def process(self, cmd: CommandAPDU) -> bytes:
        handler = self.handlers.get((cmd.cla, cmd.ins))
        if handler is None:
            self.end_pending()
            if any(ins == cmd.ins for _, ins in self.handlers):
                raise CardError(SW.CLA_NOT_SUPPORTED)
            raise CardError(SW.INS_NOT_SUPPORTED)
        if handler not in self.keep_pending:
            self.end_pending()
        return handler(cmd)


def need_data(cmd: CommandAPDU, size: int) -> None:
    """Refuse with ``6700`` a command whose data is not exactly ``size`` bytes."""
    if len(cmd.data) != size:
        raise CardError(SW.WRONG_LENGTH)


def read_binary_sfi(cmd: CommandAPDU, files: dict[int, bytes]) -> bytes:
    """READ BINARY addressed by short file identifier (P1 = 100xxxxx), offset in P2."""
    if not cmd.p1 & 0x80:
        raise CardError(SW.FILE_NOT_FOUND)  # no current EF: files are addressed by SFI
    if cmd.p1 & 0x60:
        raise CardError(SW.WRONG_P1P2)
    if cmd.data:
        raise CardError(SW.WRONG_LENGTH)
    content = files.get(cmd.p1 & 0x1F)
    if content is None:
        raise CardError(SW.FILE_NOT_FOUND)
    if cmd.p2 >= len(content):
        raise CardError(SW.WRONG_OFFSET)
    rest = content[cmd.p2:]
    return rest[: cmd.le] if cmd.le is not None else rest


class Card:
    """A card with one or more applications, behind ``atr`` and ``transmit(bytes) -> bytes``.

    ``t0=True`` makes case-4 answers come back as 61xx, to be fetched with GET RESPONSE, as a
    T=0 card does.
    """

    def __init__(self, apps: list[Application], *, atr: bytes = DEFAULT_ATR,
                 t0: bool = False, kind: str = "",
                 on_close: Callable[[], None] | None = None) -> None:
        self.apps = apps
        self.kind = kind
        self.atr = atr
        self.t0 = t0
        self.selected: Application | None = None
        self._pending: bytes = b""
        self._on_close = on_close

    # --- power ------------------------------------------------------------------------------
    def reset(self) -> bytes:
        """Warm or cold reset: volatile state goes, persistent state stays. Returns the ATR."""
        if self.selected is not None:
            self.selected.on_deselect()
        self.selected = None
        self._pending = b""
        return self.atr

    def close(self) -> None:
        self.reset()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    # --- APDUs ------------------------------------------------------------------------------
    def transmit(self, apdu: bytes) -> bytes:
        try:
            cmd = parse_command(apdu)
        except APDUFormatError as exc:
            self._pending = b""
            return exc.sw.to_bytes(2, "big")
        try:
            data, status = self._dispatch(cmd)
        except CardError as exc:
            data, status = b"", exc.sw
        except Exception:  # a bug in an application must not take the card down
            log.exception("card application failed on INS %02X", cmd.ins)
            data, status = b"", SW.NO_PRECISE_DIAGNOSIS
        return data + status.to_bytes(2, "big")

    def _dispatch(self, cmd: CommandAPDU) -> tuple[bytes, int]:
        if cmd.ins == INS_GET_RESPONSE and cmd.cla == CLA_ISO:
            return self._get_response(cmd)
        self._pending = b""
        if cmd.cla == CLA_ISO and cmd.ins == INS_SELECT and cmd.p1 == 0x04:
            data = self._select(cmd)
        else:
            sm = self.selected is not None and cmd.cla in self.selected.secure_messaging_classes
            if cmd.cla & 0x0C and not sm:
                raise CardError(0x6882)  # secure messaging not supported
            if cmd.cla not in (0x00, 0x80) and not sm:
                raise CardError(SW.CLA_NOT_SUPPORTED)
            if self.selected is None:
                if cmd.ins == INS_SELECT:
                    raise CardError(SW.FILE_NOT_FOUND)
                raise CardError(SW.CONDITIONS_NOT_SATISFIED)
            data = self.selected.process(cmd)
        return self._deliver(cmd, data)

    def _deliver(self, cmd: CommandAPDU, data: bytes) -> tuple[bytes, int]:
        if not data:
            return b"", SW.OK
        if self.t0 and cmd.case in (3, 4):
            self._pending = data
            return b"", 0x6100 | (len(data) & 0xFF)
        if cmd.le is not None and cmd.le < len(data) and cmd.case == 2 and not cmd.extended:
            # Short case 2 with a too small Le: tell the exact length (T=0 style 6Cxx).
            return b"", 0x6C00 | (len(data) & 0xFF)
        return data, SW.OK

    def _get_response(self, cmd: CommandAPDU) -> tuple[bytes, int]:
        if cmd.p1 or cmd.p2:
            raise CardError(SW.WRONG_P1P2)
        if not self._pending or cmd.data:
            self._pending = b""
            raise CardError(SW.CONDITIONS_NOT_SATISFIED)
        want = cmd.le if cmd.le is not None else 256
        chunk, rest = self._pending[:want], self._pending[want:]
        self._pending = rest
        if rest:
            return chunk, 0x6100 | (len(rest) & 0xFF)
        return chunk, SW.OK

    def _select(self, cmd: CommandAPDU) -> bytes:
        if cmd.p2 not in (0x00, 0x0C):
            raise CardError(SW.WRONG_P1P2)
        if not 1 <= len(cmd.data) <= 16:
            raise CardError(SW.WRONG_LENGTH)
        for app in self.apps:
            if app.aid.startswith(cmd.data):
                if self.selected is not None:
                    self.selected.on_deselect()
                self.selected = app
                app.on_select()
                return app.fci() if cmd.p2 == 0x00 else b""
        raise CardError(SW.FILE_NOT_FOUND)
