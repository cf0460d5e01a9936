"""The ``svcard`` command line: the root group and its ``serve`` group. The commands that
belong to no one system live beside this module (card, terminal, apdu, readers, trace, demo);
each system registers its own (``pay.cli``, ``load.cli``, ``settle.cli``...). Both groups are
lazy (:class:`LazyGroup`): a command's module is imported only when that command runs, so
``svcard serve payment`` never imports the goods, trade or wallet systems (``svcard --help``
imports them all for their summaries). A new command goes in :data:`OWN` or :data:`SYSTEMS`.

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

import functools
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import click

from ..kit.command_line import EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_NETWORK, fail

REPORT_URL = "https://github.com/svcard/svcard/issues"
# errors that say an input cannot be used (their message names it): exit code 3, as
# (module, class) under the svcard package: looked up only in modules already imported, since
# an error of a class whose module no one imported cannot have been raised (and importing
# card.personalise, pydantic and all, to find out would cost ~0.1-0.3 s)
INPUT_ERRORS: tuple[tuple[str, str], ...] = (
    ("host.kit.config", "ConfigError"), ("card.personalise", "ProfileError"),
    ("card.storage", "ImageError"), ("host.kit.reader_pool", "PoolError"))
PACKAGE = __name__.split(".", 1)[0]  # "svcard"


def input_errors() -> tuple[type[Exception], ...]:
    """The classes of :data:`INPUT_ERRORS` whose modules are loaded."""
    found = (getattr(sys.modules.get(f"{PACKAGE}.{module}"), name, None)
             for module, name in INPUT_ERRORS)
    return tuple(cls for cls in found if isinstance(cls, type) and issubclass(cls, Exception))


def one_line(exc: BaseException) -> str:
    """The exception's message as one line (its type's name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def exit_for(exc: Exception) -> tuple[str, int]:
    """The line and exit code for an error no command handled (see the module docstring)."""
    code = getattr(type(exc), "exit_code", None)  # ReaderError, DatabaseError, SchemaError
    if isinstance(code, int) and not isinstance(code, bool):
        return one_line(exc), code
    if isinstance(exc, input_errors()):
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


Loader = Callable[[], click.Command]


class LazyCommands(MutableMapping[str, click.Command]):
    """A group's commands by name, each imported the first time it is looked up: listing the
    names imports nothing, so ``svcard pay ...`` pays for the payment modules only, not for
    the goods, trade and wallet systems' (and ``svcard --help``, which shows every command's
    summary, imports them all)."""

    def __init__(self, loaders: Mapping[str, Loader]) -> None:
        self._loaders = dict(loaders)
        self._loaded: dict[str, click.Command] = {}

    def __getitem__(self, name: str) -> click.Command:
        if name not in self._loaded:
            self._loaded[name] = self._loaders[name]()  # KeyError: no such command
        return self._loaded[name]

    def __setitem__(self, name: str, command: click.Command) -> None:
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self._loaders.pop(name, None)
        self._loaded.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._loaded or name in self._loaders

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._loaded.keys() | self._loaders.keys()))

    def __len__(self) -> int:
        return len(self._loaded.keys() | self._loaders.keys())


class LazyGroup(click.Group):
    """click's lazy group: :meth:`list_commands` names the commands without importing them,
    :meth:`get_command` imports the one asked for (through :class:`LazyCommands`, so
    ``group.commands[name]`` loads it too)."""

    def __init__(self, *args: Any, lazy: Mapping[str, Loader] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        eager, self.commands = self.commands, LazyCommands(lazy or {})
        self.commands.update(eager)


def attribute(module: str, name: str) -> Loader:
    """A loader of the command ``name`` in ``module`` (relative to this package)."""
    def load() -> click.Command:
        command = getattr(importlib.import_module(module, __package__), name)
        assert isinstance(command, click.Command), (module, name)
        return command
    return load


@functools.cache
def registered(module: str) -> tuple[dict[str, click.Command], dict[str, click.Command]]:
    """What the system ``module`` registers (its ``register(root, serve)``): its root
    commands and its servers, by name. Imported and registered once."""
    root, serve = click.Group(), click.Group()
    importlib.import_module(module, __package__).register(root, serve)
    return dict(root.commands), dict(serve.commands)


def system(module: str, name: str, *, server: bool = False) -> Loader:
    """A loader of the command (or with ``server``, the ``svcard serve`` command) ``name``
    that the system ``module`` registers."""
    return lambda: registered(module)[int(server)][name]


# the commands of this folder and the helper's
OWN: dict[str, tuple[str, str]] = {
    "apdu": (".apdu", "apdu_cmd"), "card": (".card", "card"), "demo": (".demo", "demo"),
    "helper": ("..helper.cli", "helper_cmd"), "readers": (".readers", "readers_cmd"),
    "terminal": (".local_terminal", "terminal"), "trace": (".trace", "trace")}
# each system's module: the root commands and the servers its register() adds
# (tests/test_cli_lazy.py checks these names against what register() does)
SYSTEMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "..pay.cli": (("pay", "terminal-key", "batches"), ("payment", "merchant")),
    "..load.cli": (("load", "bank"), ("load", "bank")),
    "..settle.cli": (("clearing", "audit"), ()),
    "..sp.cli": (("sp",), ("sp",)),
    "..trade.cli": (("session",), ("trade-account-manager", "trade-acquirer", "trade-merchant",
                                   "trade-merchant-account")),
    "..goods.cli": (("goods", "device"), ("goods-auth", "goods-bank", "goods-fulfil",
                                          "goods-merchant", "goods-payment")),
    "..wallet.cli": (("wallet",), ("wallet-fin", "wallet-gateway", "wallet-web", "wallet-van")),
}
ROOT_COMMANDS: dict[str, Loader] = {name: attribute(*where) for name, where in OWN.items()}
SERVERS: dict[str, Loader] = {}
for _module, (_commands, _servers) in SYSTEMS.items():
    ROOT_COMMANDS.update({name: system(_module, name) for name in _commands})
    SERVERS.update({name: system(_module, name, server=True) for name in _servers})


class SvcardGroup(LazyGroup):
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


@click.group(cls=SvcardGroup, lazy=ROOT_COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
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


@main.group(cls=LazyGroup, lazy=SERVERS)
def serve() -> None:
    """Run the servers: payment (with its PSAM pool), merchant, bank, load (with its HSM)."""


if __name__ == "__main__":  # pragma: no cover
    main()
