"""Import APDU logs of other tools into svcard traces.

Formats (each read from its public description; every importer is tolerant of the blank lines,
prefixes and comments those tools add, and strict about the hex):

* ``pcsc-spy``: the text pcsc-lite's ``pcsc-spy`` prints. Each ``SCardTransmit`` block has an
  ``i`` send buffer and an ``o`` receive buffer, each a hex dump whose lines are a 4-digit offset,
  16 bytes in a 47-column field, then ASCII; the block ends with a ``=>`` result line. Failed
  transmits (result not ``SCARD_S_SUCCESS``) are skipped. The ATR, when the log shows an
  ``SCardStatus`` ``bAtr``, is taken from there.
* ``gp``: GlobalPlatformPro / apdu4j debug output: ``A>> [T=0|T=1] [(4+LLLL)] HEX...`` and
  ``A<< [(LLLL+2)] [(NNms)] HEX... SW``, anywhere on a line (log prefixes are ignored).
* ``apdu4j``: apdu4j replay dumps: ``#`` comment lines (``# ATR: HEX``, ``# PROTOCOL: T=1``),
  then alternating command and response lines of hex.
* ``cardpeek``: Cardpeek ``.clf`` replay files: ``#`` comments, ``R:ATR`` for a reset and
  ``C:COMMAND:SW:RESPONSE-DATA`` for an exchange.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from .trace import SECRET_INS, Exchange, Trace, TraceError, redact

FORMATS = ("pcsc-spy", "gp", "apdu4j", "cardpeek")

_HEX_RE = re.compile(r"^[0-9A-Fa-f]*$")


def _hexbytes(text: str, where: str) -> bytes:
    clean = re.sub(r"[\s:]", "", text)
    if not _HEX_RE.match(clean) or len(clean) % 2:
        raise TraceError(f"{where}: not hex: {text.strip()!r}")
    return bytes.fromhex(clean)


# --- pcsc-spy ------------------------------------------------------------------------------
_DUMP_RE = re.compile(r"^\s*([io])\s+([0-9A-F]{4}) (.{1,47})")
_RESULT_RE = re.compile(r"=>.*\[(0x[0-9A-Fa-f]{8})\]")
_RESULT_TIME_RE = re.compile(r"\[(\d+)\.(\d+)\]\s*$")


def import_pcsc_spy(text: str, source: str = "pcsc-spy log") -> Trace:
    trace = Trace(reader="", atr=b"", source="imported from pcsc-spy")
    function = ""
    buffers: dict[str, bytearray] = {}
    current: str | None = None
    expected_offset = 0
    elapsed = 0.0
    for n, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"\x1b\[[0-9;]*m", "", raw)  # colour codes, when not run with -n
        stripped = line.strip()
        if not stripped:
            continue
        if re.match(r"^\s*SCard\w+", line) and not stripped.startswith(("i ", "o ")):
            function, buffers, current = stripped.split()[0], {}, None
            continue
        buf_name = re.match(r"^\s*([io])\s+(p?b(?:Send|Recv)Buffer|bAtr|pbAtr)\b", line)
        if buf_name:
            current = buf_name.group(2).lstrip("p")
            buffers[current] = bytearray()
            expected_offset = 0
            continue
        dump = _DUMP_RE.match(line)
        if dump and current is not None:
            offset = int(dump.group(2), 16)
            if offset != expected_offset:
                raise TraceError(f"{source}:{n}: hex dump offset {offset:04X}, "
                                 f"expected {expected_offset:04X}")
            data = _hexbytes(dump.group(3), f"{source}:{n}")
            buffers[current] += data
            expected_offset += 16
            continue
        result = _RESULT_RE.search(line)
        if result:
            ok = int(result.group(1), 16) == 0
            took = _RESULT_TIME_RE.search(line)
            ms = (int(took.group(1)) + int(took.group(2)) / 10 ** len(took.group(2))) * 1000 \
                if took else None
            if function == "SCardTransmit" and ok:
                cmd, resp = buffers.get("bSendBuffer"), buffers.get("bRecvBuffer")
                if cmd is None or resp is None:
                    raise TraceError(f"{source}:{n}: SCardTransmit without both buffers")
                if len(resp) < 2:
                    raise TraceError(f"{source}:{n}: response shorter than a status word")
                trace.exchanges.append(Exchange(bytes(cmd), bytes(resp), elapsed, ms))
                elapsed += (ms or 0) / 1000
            elif function == "SCardStatus" and ok and buffers.get("bAtr"):
                trace.atr = bytes(buffers["bAtr"])
            elif function == "SCardConnect" and ok and not trace.reader:
                trace.reader = "pcsc-spy"
            current = None
            continue
        reader = re.match(r"^\s*i\s+szReader:?\s+(.+)$", line)
        if reader and function == "SCardConnect":
            trace.reader = reader.group(1).strip()
    if not trace.exchanges:
        raise TraceError(f"{source}: no successful SCardTransmit found")
    return trace


# --- GlobalPlatformPro / apdu4j debug -----------------------------------------------------
_GP_PAREN = re.compile(r"\([^)]*\)")


def import_gp(text: str, source: str = "gp log") -> Trace:
    trace = Trace(reader="GlobalPlatformPro", atr=b"", source="imported from gp")
    pending: tuple[bytes, int] | None = None
    for n, line in enumerate(text.splitlines(), 1):
        where = f"{source}:{n}"
        if "A>>" in line:
            if pending is not None:
                raise TraceError(f"{where}: command without an answer at line {pending[1]}")
            body = line.split("A>>", 1)[1]
            body = re.sub(r"\bT=[01]\b", "", _GP_PAREN.sub("", body))
            pending = (_hexbytes(body, where), n)
        elif "A<<" in line:
            if pending is None:
                raise TraceError(f"{where}: answer without a command")
            body = line.split("A<<", 1)[1]
            # apdu4j prints "(12ms)", and "(1s234ms)" past a second
            took = re.search(r"\((?:(\d+)s)?(\d+)\s*ms\)", body)
            response = _hexbytes(_GP_PAREN.sub("", body), where)
            if len(response) < 2:
                raise TraceError(f"{where}: response shorter than a status word")
            ms = float(int(took.group(1) or 0) * 1000 + int(took.group(2))) if took else None
            trace.exchanges.append(Exchange(pending[0], response, None, ms))
            pending = None
        else:
            atr = re.search(r"\bATR[:=]?\s*([0-9A-Fa-f]{4,})\b", line)
            if atr and not trace.atr:
                trace.atr = bytes.fromhex(atr.group(1))
    if pending is not None:
        raise TraceError(f"{source}:{pending[1]}: the last command has no answer")
    if not trace.exchanges:
        raise TraceError(f"{source}: no A>> / A<< lines found")
    return trace


# --- apdu4j dumps --------------------------------------------------------------------------

def import_apdu4j(text: str, source: str = "apdu4j dump") -> Trace:
    trace = Trace(reader="apdu4j replay", atr=b"", source="imported from apdu4j")
    command: tuple[bytes, int] | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            if line.startswith("# ATR:"):
                trace.atr = _hexbytes(line[len("# ATR:"):], f"{source}:{n}")
            elif line.startswith("# Using "):
                trace.reader = line[len("# Using "):].strip()
            continue
        data = _hexbytes(line, f"{source}:{n}")
        if command is None:
            command = (data, n)
        else:
            if len(data) < 2:
                raise TraceError(f"{source}:{n}: response shorter than a status word")
            trace.exchanges.append(Exchange(command[0], data))
            command = None
    if command is not None:
        raise TraceError(f"{source}:{command[1]}: the last command has no response")
    if not trace.exchanges:
        raise TraceError(f"{source}: no exchanges")
    return trace


# --- Cardpeek .clf -------------------------------------------------------------------------

def import_cardpeek(text: str, source: str = "cardpeek clf") -> Trace:
    trace = Trace(reader="cardpeek replay", atr=b"", source="imported from cardpeek")
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        where = f"{source}:{n}"
        if not line or line.startswith("#"):
            continue
        if line.startswith("R:"):
            atr = _hexbytes(line[2:], where)
            if not trace.atr and not trace.exchanges:
                trace.atr = atr
            else:
                trace.resets.append((len(trace.exchanges), atr))
        elif line.startswith("C:"):
            parts = line[2:].split(":")
            if len(parts) != 3:
                raise TraceError(f"{where}: expected C:COMMAND:SW:DATA")
            command = _hexbytes(parts[0], where)
            sw = parts[1].strip()
            if not re.fullmatch(r"[0-9A-Fa-f]{4}", sw):
                raise TraceError(f"{where}: status word {sw!r} is not 4 hex digits")
            trace.exchanges.append(Exchange(command, _hexbytes(parts[2], where)
                                            + bytes.fromhex(sw)))
        else:
            raise TraceError(f"{where}: neither a comment, R: nor C: line")
    if not trace.exchanges:
        raise TraceError(f"{source}: no C: lines")
    return trace


IMPORTERS: dict[str, Callable[[str, str], Trace]] = {
    "pcsc-spy": import_pcsc_spy,
    "gp": import_gp,
    "apdu4j": import_apdu4j,
    "cardpeek": import_cardpeek,
}


def import_file(fmt: str, path: str | Path) -> Trace:
    if fmt not in IMPORTERS:
        raise TraceError(f"unknown trace format {fmt!r} (known: {', '.join(FORMATS)})")
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        raise TraceError(f"cannot read {path}: {exc.strerror}") from None
    trace = IMPORTERS[fmt](text, str(path))
    for ex in trace.exchanges:   # the other tool logged PINs as sent; an svcard trace never
        if len(ex.command) > 5 and ex.command[1] in SECRET_INS:   # (an export's FF too)
            ex.command, ex.redacted = redact(ex.command), True
    return trace
