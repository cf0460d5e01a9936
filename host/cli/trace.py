"""``svcard trace``: decode a recorded APDU trace, import another tool's APDU log, export a
trace to that tool's format."""

from __future__ import annotations

from pathlib import Path

import click

from ..kit.command_line import EXIT_INPUT, emit, fail, json_option
from ..terminal.card_commands import handled


@click.group()
def trace() -> None:
    """Show, import, export and replay APDU traces (replay: the reader spec trace:FILE)."""


@trace.command("show")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
def trace_show(path: Path, as_json: bool) -> None:
    """Decode a trace: command names, fields, status words, log records."""
    from ...protocols.decode import decode, render
    from ...reader.trace import load_trace

    with handled():
        loaded = load_trace(path)
    decoded = [decode(ex.command, ex.response) for ex in loaded.exchanges]
    if as_json:
        emit(True, {"reader": loaded.reader, "atr": loaded.atr.hex().upper(),
                    "source": loaded.source,
                    "exchanges": [{"command": ex.command.hex().upper(),
                                   "response": ex.response.hex().upper(), "name": d.name,
                                   "fields": d.fields, "sw": f"{d.sw:04X}" if d.sw else None,
                                   "meaning": d.meaning, "answer": d.answer,
                                   "log_records": d.records}
                                  for ex, d in zip(loaded.exchanges, decoded, strict=True)]},
             "")
        return
    lines = [f"trace of {loaded.reader or '?'}, ATR {loaded.atr.hex().upper() or '?'}"
             f" ({loaded.source}), {len(loaded.exchanges)} exchanges"]
    for i, d in enumerate(decoded):
        lines.append(f"#{i} {render(d)}")
    emit(False, None, "\n".join(lines))


@trace.command("import")
@click.option("--from", "fmt", required=True,
              type=click.Choice(["pcsc-spy", "gp", "apdu4j", "cardpeek"]),
              help="pcsc-spy text, GlobalPlatformPro/apdu4j A>>/A<< lines, apdu4j dump, "
                   "Cardpeek .clf")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def trace_import(fmt: str, source: Path, out: Path) -> None:
    """Convert another tool's APDU log into an svcard trace."""
    from ...reader.trace_import import import_file

    with handled():
        converted = import_file(fmt, source)
        converted.save(out)
    click.echo(f"wrote {out}: {len(converted.exchanges)} exchanges from {fmt} log {source}")


@trace.command("export")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", required=True,
              type=click.Choice(["gp", "apdu4j", "cardpeek", "pcsc-spy"]),
              help="gp: GlobalPlatformPro/apdu4j A>>/A<< lines; apdu4j: replay dump; "
                   "cardpeek: .clf; pcsc-spy: pcsc-spy text.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to this file (default: standard output).")
def trace_export(path: Path, fmt: str, out: Path | None) -> None:
    """Write an svcard trace in another tool's format ('trace import --from' reads it back)."""
    from ...reader.trace import load_trace
    from ...reader.trace_export import export_trace

    with handled():
        text = export_trace(load_trace(path), fmt)
    if out is None:
        click.echo(text, nl=False)
        return
    try:
        out.write_text(text)
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror}", EXIT_INPUT)
    click.echo(f"wrote {out}: {fmt} export of {path}", err=True)
