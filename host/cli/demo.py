"""``svcard demo``: the whole story on embedded defaults (told by host/demo/story.py)."""

from __future__ import annotations

from pathlib import Path

import click

from ..kit.command_line import EXIT_USAGE, emit, fail, json_option
from ..terminal.card_commands import handled


@click.command("demo")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the card images, databases, journal and settlement file in this "
                   "folder (new or empty) instead of a temporary one.")
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
    zero-amount card authentication). Then the service provider (seed 001): its two purse
    cards top up from its bank account through the load flow and pay the merchant for a
    customer without a card; a blocked customer and one over its credit limit are refused
    with nothing paid; the customer's bill is printed. Close the PSAM batches and clear them
    (the merchant is paid, the loaded funds move to the issuer's float); audit that money is
    conserved (the SP's purses count as cards).
    """
    from ..demo.story import run_demo

    if keep is not None and (keep / "network").exists():
        fail(f"{keep}: holds an earlier demo run (its bank and SP databases); --keep needs a "
             "new or empty folder", EXIT_USAGE)
    with handled():
        story = run_demo(keep, load_amount, purchase_amount)
    emit(as_json, story.data, story.text)
