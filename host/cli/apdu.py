"""``svcard apdu``: raw command APDUs sent to any reader, each answer and status word printed."""

from __future__ import annotations

from pathlib import Path

import click

from ...protocols import sw as SW
from ...protocols.apdu import APDUFormatError, parse_command, parse_response
from ..kit.command_line import EXIT_USAGE, emit, fail, json_option
from ..terminal.card_commands import handled, readers, trace_option


@click.command("apdu")
@click.option("--reader", "reader_spec", required=True, metavar="SPEC", help="Reader spec.")
@click.argument("apdus", nargs=-1, required=True, metavar="HEX...")
@json_option
@trace_option
def apdu_cmd(reader_spec: str, apdus: tuple[str, ...], as_json: bool,
             trace_out: Path | None) -> None:
    """Send raw command APDUs and print each answer and its status word (like opensc-tool -s).

    Spaces and colons inside a HEX argument are ignored: "00 A4 04 00 ..." works quoted.
    """
    commands: list[bytes] = []
    for text in apdus:
        try:
            raw = bytes.fromhex(text.replace(":", "").replace(" ", ""))
            parse_command(raw)
        except (ValueError, APDUFormatError) as exc:
            fail(f"{text!r} is not a command APDU: {exc}", EXIT_USAGE)
        commands.append(raw)
    results = []
    with handled(), readers(("card", reader_spec), trace_out=trace_out) as (reader,):
        for raw in commands:
            answer = parse_response(reader.transmit(raw))
            results.append({"command": raw.hex().upper(), "data": answer.data.hex().upper(),
                            "sw": f"{answer.sw:04X}", "meaning": SW.meaning(answer.sw)})
    text = "\n".join(
        f"Sending: {r['command']}\nReceived ({r['sw']}, {r['meaning']}):"
        + (f"\n{r['data']}" if r["data"] else "") for r in results)
    emit(as_json, results, text)
