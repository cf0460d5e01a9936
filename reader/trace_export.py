"""Export svcard traces to the formats :mod:`svcard.reader.trace_import` reads.

* ``gp``: GlobalPlatformPro / apdu4j debug lines, as apdu4j's logging terminal prints them::

      # ATR: 3B888001535643415244303119
      A>> (4+0009) 00A40400 09 F05356434152440101 00
      A<< (0071+2) (12ms) 6F45...0000 9000

  The command is split into header, length bytes and the rest; the answer into data and status
  word. The protocol (``T=0``/``T=1``) is left out: a trace does not record it.
* ``apdu4j``: an apdu4j replay dump: ``# ATR:`` and ``# Using READER`` comments, then one line
  of hex per command and one per response.
* ``cardpeek``: a Cardpeek ``.clf`` replay file: ``R:ATR`` for the reset (again before each
  exchange a recorded reset preceded), ``C:COMMAND:SW:DATA`` per exchange.
* ``pcsc-spy``: the ``SCardTransmit`` blocks of pcsc-lite's ``pcsc-spy`` text (and one
  ``SCardStatus`` block for the ATR), with the hex dumps pcsc-spy prints.

Every format keeps each exchange's command and response byte for byte, so importing the export
gives the same exchanges. What a format has no room for is lost: resets outside ``cardpeek``,
round-trip times outside ``gp`` (whole milliseconds) and ``pcsc-spy``, start times everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

from ..protocols.apdu import APDUFormatError, parse_command
from .trace import Trace, TraceError

EXPORT_FORMATS = ("gp", "apdu4j", "cardpeek", "pcsc-spy")


def _hex(data: bytes) -> str:
    return data.hex().upper()


def _gp_command(command: bytes) -> str:
    """``A>> (4+Nc) HEADER [LC] [DATA] [LE]``, the parts apart as apdu4j shows them."""
    try:
        cmd = parse_command(command)
    except APDUFormatError:
        return f"A>> {_hex(command)}"  # no case fits: the bytes as they are
    lc_size = (3 if cmd.extended else 1) if cmd.data else 0
    le_size = 0 if cmd.le is None else (2 if cmd.extended and cmd.data else
                                        3 if cmd.extended else 1)
    body = command[4:]
    parts = [_hex(body[:lc_size]), _hex(body[lc_size:len(body) - le_size]),
             _hex(body[len(body) - le_size:])]
    return " ".join([f"A>> (4+{len(cmd.data):04d})", _hex(command[:4]), *filter(None, parts)])


def export_gp(trace: Trace) -> str:
    lines = [f"# ATR: {_hex(trace.atr)}"] if trace.atr else []
    lines.append(f"# svcard trace of {trace.reader or '?'} ({trace.source or 'recorded'})")
    for ex in trace.exchanges:
        lines.append(_gp_command(ex.command))
        data, sw = ex.response[:-2], ex.response[-2:]
        took = "" if ex.ms is None else f" ({round(ex.ms)}ms)"
        lines.append(f"A<< ({len(data):04d}+2){took}"
                     + (f" {_hex(data)}" if data else "") + f" {_hex(sw)}")
    return "\n".join(lines) + "\n"


def export_apdu4j(trace: Trace) -> str:
    lines = ["# svcard trace export"]
    if trace.reader:
        lines.append(f"# Using {trace.reader}")
    lines.append(f"# ATR: {_hex(trace.atr)}")
    for ex in trace.exchanges:
        lines += [_hex(ex.command), _hex(ex.response)]
    return "\n".join(lines) + "\n"


def export_cardpeek(trace: Trace) -> str:
    lines = [f"# svcard trace of {trace.reader or '?'}", f"R:{_hex(trace.atr)}"]
    resets = dict(trace.resets)
    for i, ex in enumerate(trace.exchanges):
        if i in resets:
            lines.append(f"R:{_hex(resets[i])}")
        lines.append(f"C:{_hex(ex.command)}:{_hex(ex.response[-2:])}:{_hex(ex.response[:-2])}")
    return "\n".join(lines) + "\n"


def _spy_dump(direction: str, data: bytes) -> list[str]:
    """pcsc-spy's hex dump: offset, 16 bytes in a 47-column field, the printable ASCII."""
    out = []
    for offset in range(0, len(data), 16):
        chunk = data[offset:offset + 16]
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        out.append(f" {direction}  {offset:04X} {' '.join(f'{b:02X}' for b in chunk):<47} {text}")
    return out


def export_pcsc_spy(trace: Trace) -> str:
    ok = " => Command successful. (SCARD_S_SUCCESS [0x00000000])"
    lines = []
    if trace.reader:
        lines += ["SCardConnect", f" i szReader {trace.reader}", f"{ok}  [0.000000]"]
    lines += ["SCardStatus", " o bAtr", *_spy_dump("o", trace.atr), f"{ok}  [0.000000]"]
    for ex in trace.exchanges:
        seconds = (ex.ms or 0.0) / 1000
        lines += ["SCardTransmit", " i bSendBuffer", *_spy_dump("i", ex.command),
                  " o bRecvBuffer", *_spy_dump("o", ex.response), f"{ok}  [{seconds:.6f}]"]
    return "\n".join(lines) + "\n"


EXPORTERS: dict[str, Callable[[Trace], str]] = {
    "gp": export_gp,
    "apdu4j": export_apdu4j,
    "cardpeek": export_cardpeek,
    "pcsc-spy": export_pcsc_spy,
}


def export_trace(trace: Trace, fmt: str) -> str:
    """``trace`` as the text of format ``fmt``."""
    if fmt not in EXPORTERS:
        raise TraceError(f"unknown export format {fmt!r} (known: {', '.join(EXPORT_FORMATS)})")
    return EXPORTERS[fmt](trace)
