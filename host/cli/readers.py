"""``svcard readers``: the PC/SC readers this machine has, and the card in each; with
``--watch``, every reader and card that comes or goes until Ctrl-C (as ``pcsc_scan`` does)."""

from __future__ import annotations

import datetime as dt
import json
import sys

import click

from ..kit.command_line import EXIT_INTERRUPTED, emit, json_option
from ..terminal.card_commands import handled

_TEXT = {"reader_added": "reader", "reader_removed": "reader removed",
         "card_inserted": "card inserted", "card_removed": "card removed"}


@click.command("readers")
@click.option("--watch", is_flag=True,
              help="Print each reader and card event (insert, remove) until Ctrl-C; with "
                   "--json one JSON object a line.")
@json_option
def readers_cmd(watch: bool, as_json: bool) -> None:
    """List PC/SC readers, whether a card is present, and its ATR."""
    from ...reader.pcsc import list_readers

    if watch:
        _watch(as_json)
        return
    with handled():
        found = list_readers()
    rows = [{"index": i, "name": r.name, "card_present": r.card_present,
             "atr": r.atr.hex().upper() if r.card_present else None}
            for i, r in enumerate(found)]
    text = "\n".join(f"#{r['index']}  {r['name']}  " + (f"card, ATR {r['atr']}"
                     if r["card_present"] else "no card") for r in rows) or "no readers"
    emit(as_json, rows, text)


def _watch(as_json: bool) -> None:
    """Events as they come; Ctrl-C ends the watch quietly with exit code 130."""
    from ...reader.pcsc import CARD_INSERTED, watch

    try:
        with handled():
            for event in watch():
                now = dt.datetime.now().astimezone()
                atr = event.atr.hex().upper() if event.event == CARD_INSERTED else None
                if as_json:
                    click.echo(json.dumps({"time": now.isoformat(timespec="milliseconds"),
                                           "event": event.event, "reader": event.reader,
                                           "atr": atr, "initial": event.initial}))
                    continue
                what = _TEXT[event.event]
                if event.initial:
                    what = "reader present" if event.event == "reader_added" else "card present"
                click.echo(f"{now:%H:%M:%S}  {event.reader}  {what}"
                           + (f", ATR {atr}" if atr else ""))
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
