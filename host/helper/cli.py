"""``svcard helper``: the local card helper a shop's web page pays through."""

from __future__ import annotations

import os
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import click

from ...protocols import purse as P
from ..kit.command_line import EXIT_INPUT, EXIT_USAGE, fail
from ..kit.serving import serve, serve_options
from ..pay.cli import terminal_id_option
from ..terminal.card_commands import card_option, handled, purse_option
from ..terminal.online import DEFAULT_RETRY_FOR
from ..terminal.purse import TerminalCheckFailed, purse_id
from ..terminal.reader_specs import shown_spec
from .pairing import (
    PairingError,
    default_token_file,
    load_or_create_token,
    loopback_address,
    normalise_origin,
)

DEFAULT_PORT = 8790
MAX_PIN_FILE = 64


@click.command("helper")
@card_option
@purse_option
@click.option("--allow-origin", "origins", multiple=True, required=True, metavar="URL",
              help="A shop's web origin whose pages may pay through this helper, e.g. "
                   "https://shop.example (repeat for more; no wildcard).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Loopback address to listen on (127.0.0.1 or ::1; nothing else).")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where the pairing token is kept, mode 0600 (default: "
                   "$XDG_STATE_HOME/svcard/helper-token); made on first start.")
@click.option("--new-token", is_flag=True,
              help="Replace the pairing token (paired pages must pair again).")
@click.option("--show-token", is_flag=True,
              help="Print the pairing token even when it is not new (by default it is printed "
                   "only when it is made, so logs of later starts do not hold it).")
@click.option("--pin-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="The cardholder's PIN for the ED purse, in a file only you "
                                 "can read. Without it the helper asks at each ED payment.")
@click.option("--journal", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The local payment journal (default: $SVCARD_JOURNAL or "
                   "~/.local/state/svcard/journal.jsonl).")
@click.option("--timeout", default=30.0, show_default=True, help="HTTP timeout, seconds.")
@click.option("--retry-for", "retry_for", default=DEFAULT_RETRY_FOR, show_default=True,
              type=click.FloatRange(0, 3600), metavar="SECONDS",
              help="Ask a busy server (503) again for up to SECONDS per request; then the "
                   "payment is reported refused (the journal keeps it).")
@serve_options
@click.option("--terminal-key", "terminal_key", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="This client terminal's Ed25519 key (FIG. 7), as for svcard pay.")
@click.option("--terminal-id", "terminal_id", default=None, metavar="HEX",
              help="The terminal id registered with the merchant (default: from the key).")
def helper_cmd(card_spec: str, aid: bytes, purse: str, origins: tuple[str, ...], host: str,
               port: int,
               token_file: Path | None, new_token: bool, show_token: bool,
               pin_file: Path | None,
               journal: Path | None, timeout: float, retry_for: float,
               terminal_key: Path | None, terminal_id: str | None, log_level: str,
               drain_seconds: float) -> None:
    """A local card helper: shop pages from --allow-origin pay with the card through it.

    It listens on loopback only and answers only those origins, and only requests that carry
    its pairing token (printed at start; enter it once in the shop's page). Each payment runs
    the whole svcard pay flow with the journal. The PIN of the ED purse is asked here (or read
    from --pin-file), never by the page. One payment at a time. A wallet page from an allowed
    origin may also have it load the card from its own bank (svcard load's flow, journalled).
    """
    from ..pay.client_terminal import ClientTerminal
    from ..terminal.journal import default_journal
    from .app import CardHelper
    from .payments import HelperCard

    if terminal_id is not None and terminal_key is None:
        fail("--terminal-id needs --terminal-key", EXIT_USAGE)
    try:
        address = loopback_address(host)
        allowed = [normalise_origin(origin) for origin in origins]
    except PairingError as exc:
        fail(str(exc), EXIT_USAGE)
    purse_number = purse_id(purse)
    pin = _pin_source(pin_file) if purse_number == P.PURSE_ED else None
    terminal = None
    if terminal_key is not None:
        with handled():
            terminal = ClientTerminal.load(terminal_key, terminal_id_option(terminal_id))
    path = token_file or default_token_file()
    try:
        token, made = load_or_create_token(path, renew=new_token)
    except PairingError as exc:
        fail(str(exc), EXIT_INPUT)
    helper = CardHelper(HelperCard(card_spec, journal or default_journal(), purse_number, pin,
                                   terminal, timeout, retry_for, aid), token, allowed)
    _check_port(address, port)
    shown = f"[{address}]" if ":" in address else address
    click.echo(f"svcard helper: listening on http://{shown}:{port} for "
               f"{', '.join(sorted(helper.origins))}\n"
               f"card: {shown_spec(card_spec)} ({purse.upper()} purse, AID {aid.hex().upper()})\n"
               + (f"pairing token ({'new, ' if made else ''}kept in {path}, mode 0600):\n"
                  f"  {token}\n"
                  "enter it once in the shop page's \"Card helper\" box"
                  if made or show_token else
                  f"pairing token kept in {path} (mode 0600; --show-token prints it)"),
               err=True)
    sys.exit(serve(helper.app(), host=address, port=port, log_level=log_level, drain=helper,
                   drain_seconds=drain_seconds))


def _check_port(address: str, port: int) -> None:
    """A port already taken is one clear line (uvicorn would only log it)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            fail(f"--port {port}: cannot listen on {address} ({exc.strerror or exc})",
                 EXIT_INPUT)


def _pin_source(pin_file: Path | None) -> Callable[[], str]:
    """How the helper gets the ED purse's PIN: from a file only its owner can read, or asked on
    this terminal at each payment."""
    if pin_file is not None:
        try:
            fd = os.open(pin_file, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as fh:
                mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
                raw = fh.read(MAX_PIN_FILE + 1)
        except OSError as exc:
            fail(f"--pin-file {pin_file}: {exc.strerror or exc}", EXIT_INPUT)
        if mode & 0o077:
            fail(f"--pin-file {pin_file}: others may read it (mode {mode:04o}); chmod 600 it",
                 EXIT_INPUT)
        pin = raw.decode("ascii", "replace").strip()
        if len(raw) > MAX_PIN_FILE or not pin.isdigit():
            fail(f"--pin-file {pin_file}: not a PIN (digits only)", EXIT_INPUT)
        return lambda: pin
    if not sys.stdin.isatty():
        fail("--purse ed needs the cardholder's PIN: give --pin-file, or run the helper in a "
             "terminal so that it can ask", EXIT_USAGE)

    def ask() -> str:
        try:
            return str(click.prompt("PIN for the payment a shop page asked for", hide_input=True,
                                    err=True))
        except (click.Abort, EOFError):
            raise TerminalCheckFailed("no PIN was entered at the card helper") from None

    return ask

