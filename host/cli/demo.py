"""``svcard demo``: the whole story on embedded defaults (told by host/demo/story.py)."""

from __future__ import annotations

from pathlib import Path

import click

from ..kit.command_line import emit, json_option
from ..terminal.card_commands import handled


@click.command("demo")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the card images in this folder instead of a temporary one.")
@click.option("--load-amount", default=10000, show_default=True,
              type=click.IntRange(1, 0xFFFFFFFF))
@click.option("--purchase-amount", default=1234, show_default=True,
              type=click.IntRange(0, 0xFFFFFFFF))
@json_option
def demo(keep: Path | None, load_amount: int, purchase_amount: int, as_json: bool) -> None:
    """Run the main job on embedded defaults: personalise a purse card, a PSAM and a load
    HSM from the demo fixtures, load the card, make a purchase, and show the log."""
    from ..demo.story import run_demo

    with handled():
        story = run_demo(keep, load_amount, purchase_amount)
    emit(as_json, story.data, story.text)
