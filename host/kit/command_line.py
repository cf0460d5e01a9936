"""What every ``svcard`` command shares, whichever system it belongs to: the exit codes, the
one-line failure message, printing a result as text or as ``--json``.

Exit codes: 0 done; 1 the transaction was refused (a chip's status word, a terminal check, a
server's refusal); 2 usage error; 3 a reader, card image, trace, profile or configuration could
not be used. Codes from 4 up are a reader error's own (``ReaderError.exit_code``); the whole
list is in the docstring of ``host/cli/main.py``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

EXIT_OK = 0
EXIT_DECLINED = 1      # the transaction was refused (status word, terminal check, server refusal)
EXIT_USAGE = 2         # the command line itself is wrong
EXIT_DEVICE = 3        # an input could not be used: reader, card image, trace, profile,
EXIT_INPUT = 3         # configuration, database or folder (missing, unreadable or invalid)
# 4..10: a reader error's own code (ReaderError.exit_code)
EXIT_NETWORK = 11      # a server could not be reached, or stayed busy past the retry deadline
EXIT_INTERNAL = 70     # a bug in svcard (sysexits EX_SOFTWARE): the message says where to report it
EXIT_INTERRUPTED = 130  # interrupted (Ctrl-C, SIGTERM): the message says what state was left

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int) -> NoReturn:
    """Print ``svcard: MESSAGE`` on stderr and exit with ``code``."""
    click.echo(f"svcard: {message}", err=True)
    sys.exit(code)


def emit(as_json: bool, data: Any, text: str) -> None:
    """Print a command's result: ``data`` as indented JSON with ``--json``, else ``text``."""
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


def json_option(f: F) -> F:
    """``--json``: the command prints its result as JSON (passed as ``as_json``)."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the result as JSON (for scripts).")(f)
