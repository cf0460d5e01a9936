"""APDU traces: record any reader's exchanges, and replay them as a reader.

A trace is JSON Lines. The first line is the header::

    {"format": "svcard-trace", "version": 1, "reader": NAME, "atr": HEX, "started": ISO-8601,
     "source": "recorded" | "imported from FORMAT"}

then one line per exchange::

    {"i": 0, "t": SECONDS-SINCE-START, "ms": ROUND-TRIP, "command": HEX, "response": HEX}

(``response`` is data then SW1 SW2; ``t`` and ``ms`` may be null in imported traces). A line
``{"event": "reset", "atr": HEX}`` marks a card reset inside the trace.

PINs and personalisation keys never reach a trace file: the data of a VERIFY (INS 20), a PIN
change or reload (INS 5E) or the IEP applet's PUT PERSONALISATION DATA (INS F0), short or
extended length, is recorded as that many ``FF`` bytes (such a command that fits no
ISO 7816-4 case: every byte after its header) and the line carries ``"redacted": true``. Replay
matches such a command on its header, its length bytes and its Le, not on the PIN. An imported
log (:mod:`svcard.reader.trace_import`) is redacted the same way, and an export keeps the ``FF``
bytes, so an exported and re-imported trace still replays.

:class:`RecordingReader` wraps a reader and appends a line per exchange, flushed at once, so a
crash leaves a usable trace. :class:`TraceReader` (``trace:FILE``) answers with the recorded
responses while the commands match, and raises :class:`TraceMismatchError` naming the first
command that differs (its index, what the trace expected, what it got).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..protocols.apdu import APDUFormatError, parse_command
from .base import Reader, ReaderError

TRACE_FORMAT = "svcard-trace"
TRACE_VERSION = 1


class TraceError(ReaderError):
    """A trace file that cannot be read."""


class TraceMismatchError(ReaderError):
    """Replay met a command the trace did not record at that point."""

    exit_code = 9

    def __init__(self, index: int, expected: bytes | None, got: bytes) -> None:
        self.index = index
        self.expected = expected
        self.got = got
        if expected is None:
            text = (f"trace exhausted: command #{index} {got.hex().upper()} has no recorded "
                    "answer")
        else:
            text = (f"trace mismatch at command #{index}: expected {expected.hex().upper()}, "
                    f"got {got.hex().upper()}")
        super().__init__(text)


# commands whose data is a PIN (VERIFY; CHANGE PIN and RELOAD PIN share INS 5E) or may hold
# keys and the PIN in clear (svcard's IEP applet's PUT PERSONALISATION DATA, INS F0, sent
# from its personalisation script)
SECRET_INS = frozenset({0x20, 0x5E, 0xF0})


@dataclass
class Exchange:
    command: bytes
    response: bytes
    t: float | None = None
    ms: float | None = None
    redacted: bool = False

    def matches(self, command: bytes) -> bool:
        """Whether ``command`` is the one recorded (a redacted one: same header, length bytes,
        size and Le)."""
        if not self.redacted:
            return command == self.command
        return len(command) == len(self.command) and redact(command) == self.command


def redact(command: bytes) -> bytes:
    """``command`` with its data replaced by FF bytes when it carries a PIN (short or extended
    length), else unchanged. A PIN command that fits no ISO 7816-4 case keeps only its header:
    every byte after it is FF (its Lc may not say where the PIN ends)."""
    if len(command) <= 5 or command[1] not in SECRET_INS:
        return command
    try:
        cmd = parse_command(command)
    except APDUFormatError:
        return command[:4] + b"\xff" * (len(command) - 4)
    start = 7 if cmd.extended else 5
    return command[:start] + b"\xff" * len(cmd.data) + command[start + len(cmd.data):]


@dataclass
class Trace:
    reader: str
    atr: bytes
    exchanges: list[Exchange] = field(default_factory=list)
    started: str = ""
    source: str = "recorded"
    resets: list[tuple[int, bytes]] = field(default_factory=list)  # (before exchange i, ATR)

    def header(self) -> dict[str, Any]:
        return {"format": TRACE_FORMAT, "version": TRACE_VERSION, "reader": self.reader,
                "atr": self.atr.hex().upper(), "started": self.started, "source": self.source}

    def lines(self) -> list[str]:
        out = [json.dumps(self.header())]
        resets = dict(self.resets)
        for i, ex in enumerate(self.exchanges):
            if i in resets:
                out.append(json.dumps({"event": "reset", "atr": resets[i].hex().upper()}))
            out.append(json.dumps(exchange_line(i, ex)))
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text("\n".join(self.lines()) + "\n")


def exchange_line(i: int, ex: Exchange) -> dict[str, Any]:
    line: dict[str, Any] = {"i": i, "t": None if ex.t is None else round(ex.t, 6),
                            "ms": None if ex.ms is None else round(ex.ms, 3),
                            "command": ex.command.hex().upper(),
                            "response": ex.response.hex().upper()}
    if ex.redacted:
        line["redacted"] = True
    return line


def _hex(value: Any, where: str) -> bytes:
    try:
        return bytes.fromhex(str(value))
    except ValueError:
        raise TraceError(f"{where}: not hex: {value!r}") from None


def load_trace(path: str | Path) -> Trace:
    """Read and check a trace file."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror}") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append((n, json.loads(line)))
        except ValueError:
            raise TraceError(f"{path}:{n}: not JSON") from None
    if not records:
        raise TraceError(f"{path}: empty trace")
    n, head = records[0]
    if not isinstance(head, dict) or head.get("format") != TRACE_FORMAT:
        raise TraceError(f"{path}: not an svcard trace (no header line)")
    if head.get("version") != TRACE_VERSION:
        raise TraceError(f"{path}: trace version {head.get('version')!r}, this svcard reads "
                         f"{TRACE_VERSION}")
    trace = Trace(reader=str(head.get("reader", "")), atr=_hex(head.get("atr", ""), f"{path}:1"),
                  started=str(head.get("started", "")), source=str(head.get("source", "")))
    for n, rec in records[1:]:
        where = f"{path}:{n}"
        if not isinstance(rec, dict):
            raise TraceError(f"{where}: not an object")
        if rec.get("event") == "reset":
            trace.resets.append((len(trace.exchanges), _hex(rec.get("atr", ""), where)))
            continue
        if "command" not in rec or "response" not in rec:
            raise TraceError(f"{where}: an exchange needs 'command' and 'response'")
        response = _hex(rec["response"], where)
        if len(response) < 2:
            raise TraceError(f"{where}: a response has at least a status word")
        redacted = rec.get("redacted", False)
        if not isinstance(redacted, bool):
            raise TraceError(f"{where}: 'redacted' is true or false")
        trace.exchanges.append(Exchange(_hex(rec["command"], where), response, rec.get("t"),
                                        rec.get("ms"), redacted))
    return trace


class RecordingReader(Reader):
    """Passes everything to ``inner`` and writes each exchange to ``path`` (PINs redacted)."""

    def __init__(self, inner: Reader, path: str | Path) -> None:
        self.inner = inner
        self.path = Path(path)
        self.name = inner.name
        self._out: IO[str] | None = None
        self._t0 = 0.0
        self._count = 0

    def connect(self) -> bytes:
        atr = self.inner.connect()
        self._out = self.path.open("w")
        self._t0 = time.monotonic()
        self._count = 0
        header = Trace(self.inner.name, atr,
                       started=dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"))
        self._write(header.header())
        return atr

    def _write(self, record: dict[str, Any]) -> None:
        assert self._out is not None
        self._out.write(json.dumps(record) + "\n")
        self._out.flush()

    def transmit(self, apdu: bytes) -> bytes:
        if self._out is None:
            raise ReaderError(f"{self.name}: not connected (call connect first)")
        start = time.perf_counter()
        t = time.monotonic() - self._t0
        response = self.inner.transmit(apdu)
        ms = (time.perf_counter() - start) * 1000
        recorded = redact(apdu)
        self._write(exchange_line(self._count, Exchange(recorded, response, t, ms,
                                                        recorded != apdu)))
        self._count += 1
        return response

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.inner.transaction():
            yield

    def disconnect(self) -> None:
        try:
            self.inner.disconnect()
        finally:
            if self._out is not None:
                self._out.close()
                self._out = None


class TraceReader(Reader):
    """A reader that replays a trace, strictly in order."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = f"trace:{path}"
        self.trace: Trace | None = None
        self.position = 0

    def connect(self) -> bytes:
        self.trace = load_trace(self.path)
        self.position = 0
        return self.trace.atr

    def transmit(self, apdu: bytes) -> bytes:
        if self.trace is None:
            raise ReaderError(f"{self.name}: not connected (call connect first)")
        i = self.position
        if i >= len(self.trace.exchanges):
            raise TraceMismatchError(i, None, apdu)
        expected = self.trace.exchanges[i]
        if not expected.matches(apdu):
            raise TraceMismatchError(i, expected.command, redact(apdu))
        self.position += 1
        return expected.response

    def disconnect(self) -> None:
        self.trace = None
