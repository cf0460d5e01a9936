"""``svcard readers``: the PC/SC readers this machine has, and the card in each."""

from __future__ import annotations

import click

from ..kit.command_line import emit, json_option
from ..terminal.card_commands import handled


@click.command("readers")
@json_option
def readers_cmd(as_json: bool) -> None:
    """List PC/SC readers, whether a card is present, and its ATR."""
    from ...reader.pcsc import list_readers

    with handled():
        found = list_readers()
    rows = [{"index": i, "name": r.name, "card_present": r.card_present,
             "atr": r.atr.hex().upper() if r.card_present else None}
            for i, r in enumerate(found)]
    text = "\n".join(f"#{r['index']}  {r['name']}  " + (f"card, ATR {r['atr']}"
                     if r["card_present"] else "no card") for r in rows) or "no readers"
    emit(as_json, rows, text)
