"""The ``svcard`` command line: the root group and its ``serve`` group. The commands that
belong to no one system live beside this module (card, terminal, apdu, readers, trace, demo);
each system registers its own (``pay.cli``, ``load.cli``, ``settle.cli``).

Exit codes: 0 done; 1 the transaction was refused (a chip's status word or a terminal check);
2 usage error; 3 a reader, card image, trace or profile could not be used; 4 no PC/SC service;
5 no such reader; 6 no card in the reader; 7 card removed mid-transaction; 8 sharing violation;
9 a replayed trace differs; 10 jCardSim failed.
"""

from __future__ import annotations

import click

from ..load import cli as load_cli
from ..pay import cli as pay_cli
from ..settle import cli as settle_cli
from .apdu import apdu_cmd
from .card import card
from .demo import demo
from .local_terminal import terminal
from .readers import readers_cmd
from .trace import trace


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="svcard")
def main() -> None:
    """svcard: an emulated PBOC ED/EP purse card, PSAM and load HSM, and host software
    that pays with them and loads them.

    Cards live in JSON card images; a reader spec names where a card is:
    virtual:IMAGE.json opens an image in this process.

    \b
    Quick tour:
      svcard demo                                   loads, payments, clearing, audit
      svcard card new fixtures/iep-demo.toml --out card.json
      svcard terminal balance --card virtual:card.json
    """


@main.group()
def serve() -> None:
    """Run the servers: payment (with its PSAM pool), merchant, bank, load (with its HSM)."""


for command in (card, terminal, apdu_cmd, readers_cmd, trace, demo):
    main.add_command(command)
for system in (pay_cli, load_cli, settle_cli):
    system.register(main, serve)


if __name__ == "__main__":  # pragma: no cover
    main()
