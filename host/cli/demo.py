"""``svcard demo``: the whole story on embedded defaults (told by host/demo/story.py)."""

from __future__ import annotations

from pathlib import Path

import click

from ..kit.command_line import emit, json_option
from ..terminal.card_commands import handled


@click.command("demo")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the card images, databases, journal and settlement file in this "
                   "folder instead of a temporary one.")
@click.option("--load-amount", default=10000, show_default=True,
              type=click.IntRange(1, 0xFFFFFFFF),
              help="Minor units loaded onto each card (at the local terminal and over the "
                   "network).")
@click.option("--purchase-amount", default=1234, show_default=True,
              type=click.IntRange(0, 0xFFFFFFFF),
              help="Minor units of the local purchase (the network payments are at the "
                   "merchant's prices).")
@json_option
def demo(keep: Path | None, load_amount: int, purchase_amount: int, as_json: bool) -> None:
    """Run the whole system once on embedded demo defaults.

    At a local terminal: personalise a purse card, a PSAM and a load HSM from the demo
    fixtures (TEST KEYS ONLY), load the card, make a purchase, and show the balance and log.

    Then over the network, on loopback with SQLite databases: start a bank, a load server
    (with its HSM), a payment server (two PSAMs) and a merchant; load a second card from a
    bank account; pay the merchant with it in each variant (FIG. 5, 6, 7 and 8, and a
    zero-amount card authentication); close the PSAM batches and clear them (the merchant is
    paid, the loaded funds move to the issuer's float); audit that money is conserved.
    """
    from ..demo.story import run_demo

    with handled():
        story = run_demo(keep, load_amount, purchase_amount)
    emit(as_json, story.data, story.text)
