"""The ``svcard`` command line: the root group and its ``serve`` group. The commands that
belong to no one system live beside this module (card, terminal, apdu, readers, trace, demo);
each system registers its own (``pay.cli``, ``load.cli``, ``settle.cli``).

Every failure is one line on stderr, ``svcard: ...``, and one of these exit codes (the
constants are in ``host/kit/command_line.py``):

\b
  0    done
  1    refused: a chip's status word, a terminal check, a server's refusal, an audit finding,
       a clearing run that refused a batch or record
  2    usage: the command line itself is wrong (unknown option, --port out of 1..65535, a
       --set without "=", nothing to audit...)
  3    an input cannot be used: a reader spec, card image, trace, profile or configuration
       file, a database (not a URL, driver not installed, cannot be created or reached, a
       tool's input that does not exist, a newer schema) or a folder; the message names it
       and the field
  4    no PC/SC service          5  no such reader          6  no card in the reader
  7    card removed mid-transaction          8  sharing violation (reader busy)
  9    a replayed trace differs  10  jCardSim failed
  11   a server could not be reached, or stayed busy past the retry deadline
  70   internal error: a bug in svcard; the line says where to report it (set SVCARD_DEBUG=1
       to see the traceback)
  130  interrupted (Ctrl-C)

:class:`SvcardGroup` applies this to every command: an error a command did not handle becomes
its line and code here, never a traceback.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import click

from ...card.personalise import ProfileError
from ...card.storage import ImageError
from ..goods import cli as goods_cli
from ..helper.cli import helper_cmd
from ..kit.command_line import (
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_NETWORK,
    fail,
)
from ..kit.config import ConfigError
from ..kit.reader_pool import PoolError
from ..load import cli as load_cli
from ..pay import cli as pay_cli
from ..settle import cli as settle_cli
from ..sp import cli as sp_cli
from ..trade import cli as trade_cli
from ..wallet import cli as wallet_cli
from .apdu import apdu_cmd
from .card import card
from .demo import demo
from .local_terminal import terminal
from .readers import readers_cmd
from .trace import trace

REPORT_URL = "https://github.com/svcard/svcard/issues"
# errors that say an input cannot be used (their message names it): exit code 3
INPUT_ERRORS: tuple[type[Exception], ...] = (ConfigError, ProfileError, ImageError, PoolError)


def one_line(exc: BaseException) -> str:
    """The exception's message as one line (its type's name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def exit_for(exc: Exception) -> tuple[str, int]:
    """The line and exit code for an error no command handled (see the module docstring)."""
    code = getattr(type(exc), "exit_code", None)  # ReaderError, DatabaseError, SchemaError
    if isinstance(code, int) and not isinstance(code, bool):
        return one_line(exc), code
    if isinstance(exc, INPUT_ERRORS):
        return one_line(exc), EXIT_INPUT
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or one_line(exc)}", EXIT_INPUT
    import httpx

    if isinstance(exc, httpx.TransportError):
        try:
            where = f"cannot reach {exc.request.url}"
        except RuntimeError:  # no request attached
            where = "cannot reach the server"
        return f"network: {where}: {one_line(exc)}", EXIT_NETWORK
    from sqlalchemy.exc import StatementError

    what = f"{type(exc).__name__}: {one_line(exc)}"
    if isinstance(exc, StatementError):  # the driver's first line: never the SQL or its values
        orig = exc.orig if isinstance(exc.orig, BaseException) else exc
        first = (str(orig).strip().splitlines() or [""])[0]
        what = f"database: {type(orig).__name__}: {' '.join(first.split())[:200]}"
    return (f"internal error: {what}; please report it with the command at {REPORT_URL}",
            EXIT_INTERNAL)


class SvcardGroup(click.Group):
    """The root group: whatever a command did not handle becomes one line and its exit code
    (:func:`exit_for`); Ctrl-C is exit code 130. ``SVCARD_DEBUG=1`` adds the traceback of an
    internal error."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException):
            raise  # click's own: --help, usage errors (exit code 2)
        except (KeyboardInterrupt, click.Abort):
            fail("interrupted", EXIT_INTERRUPTED)
        except Exception as exc:
            message, code = exit_for(exc)
            if code == EXIT_INTERNAL and os.environ.get("SVCARD_DEBUG") == "1":
                traceback.print_exc()
            fail(message, code)


@click.group(cls=SvcardGroup, context_settings={"help_option_names": ["-h", "--help"]})
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

    \b
    Exit codes: 0 done; 1 refused; 2 usage; 3 an input cannot be used (file,
    configuration, database, folder); 4-10 reader errors; 11 server unreachable or busy;
    70 internal error (please report it); 130 interrupted.
    """


@main.group()
def serve() -> None:
    """Run the servers: payment (with its PSAM pool), merchant, bank, load (with its HSM)."""


for command in (card, terminal, apdu_cmd, readers_cmd, trace, demo, helper_cmd):
    main.add_command(command)
for system in (pay_cli, load_cli, settle_cli, sp_cli, trade_cli, goods_cli, wallet_cli):
    system.register(main, serve)


if __name__ == "__main__":  # pragma: no cover
    main()
