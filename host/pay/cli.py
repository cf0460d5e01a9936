"""The card payment system's commands: ``svcard pay`` (the client), ``svcard terminal-key``
(a client terminal's key), ``svcard serve payment`` and ``svcard serve merchant``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ...reader import Reader
from ..kit.command_line import EXIT_DEVICE, EXIT_INPUT, EXIT_USAGE, emit, fail, json_option
from ..kit.serving import node_options, serve_options
from ..kit.serving import serve as serve_app
from ..terminal import purse as T
from ..terminal.card_commands import card_option, handled, pin_option, purse_option, readers
from ..terminal.online import (
    http_client,
    journalled_run,
    report_resumed,
    resume_command,
    retry_for_option,
)
from ..terminal.reader_specs import open_reader
from .batch_close import batches


def register(root: click.Group, serve: click.Group) -> None:
    """Add the payment commands to ``svcard`` (``root``) and its ``serve`` group."""
    root.add_command(pay_cmd)
    root.add_command(terminal_key_group)
    root.add_command(batches)
    serve.add_command(serve_payment)
    serve.add_command(serve_merchant)


@click.command("pay")
@click.argument("checkout_url", required=False)
@card_option
@purse_option
@pin_option
@click.option("--journal", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The local payment journal (default: $SVCARD_JOURNAL or "
                   "~/.local/state/svcard/journal.jsonl).")
@click.option("--timeout", default=30.0, show_default=True, help="HTTP timeout, seconds.")
@click.option("--terminal-key", "terminal_key", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="This client terminal's Ed25519 key (svcard terminal-key new): names the "
                   "terminal at checkout and signs FIG. 7 confirmations. Without it the "
                   "client never asks for FIG. 7.")
@click.option("--terminal-id", "terminal_id", default=None, metavar="HEX",
              help="The terminal id registered with the merchant (8 bytes hex; default: "
                   "derived from the key).")
@click.option("--resume", is_flag=True,
              help="Only finish what an interruption left in the journal for this card; no "
                   "new payment (no CHECKOUT_URL).")
@retry_for_option
@json_option
def pay_cmd(checkout_url: str | None, card_spec: str, aid: bytes, purse: str, pin: str | None,
            journal: Path | None, timeout: float, terminal_key: Path | None,
            terminal_id: str | None, resume: bool, retry_for: float, as_json: bool) -> None:
    """Pay a merchant's CHECKOUT_URL with the card (seed steps 608-640).

    First finishes any payment of this card that an interruption left in the journal (or proves
    with the card that it never happened), then pays: one draw request to the payment server,
    the card debits itself, the confirmation goes to the merchant, the goods come back.
    Interrupted (Ctrl-C, SIGTERM: exit 130), or a server unreachable or busy past --retry-for
    (exit 11), it says what state the journal holds; `svcard pay --resume --card SPEC`
    finishes it.
    """
    from ..terminal.journal import Journal, default_journal
    from . import client as C
    from . import client_terminal as CT

    if resume == (checkout_url is not None):
        fail("give CHECKOUT_URL to pay, or --resume (alone) to finish what the journal holds",
             EXIT_USAGE)
    book = Journal(journal or default_journal())
    terminal = None
    if terminal_id is not None and terminal_key is None:
        fail("--terminal-id needs --terminal-key", EXIT_USAGE)
    if terminal_key is not None:
        with handled():
            terminal = CT.ClientTerminal.load(terminal_key, terminal_id_option(terminal_id))
    finish = resume_command("pay", card_spec, journal, aid)
    with handled(), journalled_run(book, finish, retry_for), \
            http_client(timeout, retry_for) as http, readers(("card", card_spec)) as (card_r,):
        resumed = C.resume(card_r, journal=book, http=http, terminal=terminal, aid=aid)
        if resume:
            report_resumed(book, resumed, as_json)
            return
        assert checkout_url is not None
        # a PC/SC transaction: no other program's command comes between SELECT and DEBIT
        with card_r.transaction():
            info = T.select_purse(card_r, aid)  # the card's currency, to print amounts with
            outcome = C.pay(checkout_url, card_r, journal=book, http=http, pin=pin,
                            purse=T.purse_id(purse), terminal=terminal, aid=aid)
    money = info.money
    text = "\n".join(
        [f"resumed {r['txn_id']}: {r['outcome']}" for r in resumed]
        + [f"paid {money(outcome.amount)} ({outcome.variant}, "
           f"{outcome.round_trips} round trips): {outcome.item}",
           f"  balance {money(outcome.balance_before)} -> {money(outcome.balance_after)}",
           f"  goods: {outcome.goods}" + ("" if outcome.proven else
                                          " (unproven until the card's proof is cleared)"),
           f"  receipt: {_receipt_text(outcome.receipt, money)}"])
    emit(as_json, {"resumed": resumed, "payment": outcome.to_json()}, text)


def _receipt_text(receipt: dict[str, Any], money: Callable[[int], str]) -> str:
    """The merchant's receipt for a person: "txn 0A1B..., CNY 12.34, PSAM ... TTN 3, ..."."""
    names = {"txn_id": "txn", "psam_id": "PSAM", "terminal_txn_number": "TTN",
             "card_serial": "card", "card_counter": "card counter"}
    parts = []
    for key, value in receipt.items():
        if key == "amount" and isinstance(value, int):
            parts.append(money(value))
        elif key == "proven":
            parts.append("proven" if value else "not yet proven")
        elif key == "status":
            parts.append(str(value))
        elif isinstance(value, str | int) and not isinstance(value, bool):
            parts.append(f"{names.get(key, key.replace('_', ' '))} {value}")
    return ", ".join(parts)


def terminal_id_option(value: str | None) -> bytes | None:
    """The ``--terminal-id`` option's bytes (None when it is not given); anything but 8 bytes
    of hex is a usage error. Shared with ``svcard helper``."""
    if value is None:
        return None
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != 8:
        fail("--terminal-id: 8 bytes of hex", EXIT_USAGE)
    return raw


@click.group("terminal-key")
def terminal_key_group() -> None:
    """A client terminal's Ed25519 key (merchants register it to allow FIG. 7)."""


@terminal_key_group.command("new")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--terminal-id", "terminal_id", default=None, metavar="HEX",
              help="The terminal id (8 bytes hex; default: derived from the public key).")
@json_option
def terminal_key_new(file: Path, terminal_id: str | None, as_json: bool) -> None:
    """Write a new key to FILE (mode 0600, never overwritten); print its id and public key
    (the private key is not printed)."""
    from .client_terminal import ClientTerminal

    terminal = ClientTerminal.generate(terminal_id_option(terminal_id))
    try:
        terminal.save(file)
    except FileExistsError:
        fail(f"{file} exists: not overwritten", EXIT_USAGE)
    except OSError as exc:
        fail(f"{file}: {exc.strerror}", EXIT_DEVICE)
    tid, public = terminal.terminal_id.hex().upper(), terminal.public_key.hex().upper()
    emit(as_json, {"file": str(file), "terminal_id": tid, "public_key": public},
         f"wrote {file} (mode 0600)\nterminal id {tid}\npublic key {public}\n"
         f"for the merchant's [client_terminals]:\n\"{tid}\" = \"{public}\"")


@click.command("payment")
@click.option("--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML: merchants and their shared keys, db, timeouts "
                   "(see fixtures/payment-demo.toml).")
@click.option("--psam", "psam_specs", multiple=True, required=True, metavar="SPEC",
              help="A PSAM of the pool (repeat): virtual:psam.json, pcsc:NAME, ...")
@click.option("--db", "db_url", default=None, help="Database URL (overrides the config).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@node_options("PSAM")
@serve_options
def serve_payment(config_path: Path, psam_specs: tuple[str, ...], db_url: str | None,
                  host: str, port: int, node: str | None, lease_seconds: str | None,
                  log_level: str, drain_seconds: float) -> None:
    """The payment server: draw requests in, debit commands out, a pool of PSAMs."""
    from ..kit.config import ConfigError
    from ..kit.reader_pool import PoolError
    from ..kit.serving import node_settings
    from .config import payment_config
    from .server.app import PaymentServer

    try:
        config = node_settings(payment_config(config_path, db_url), node, lease_seconds)
    except ConfigError as exc:
        fail(str(exc), EXIT_DEVICE)
    from ..terminal.reader_specs import node_readers
    from .server.app import merchant_terminals
    from .server.psam_pool import check_psams

    with handled():
        psams: list[Reader]
        if config.node_name:   # opened only while leased: another node may hold one now
            psams = node_readers(psam_specs, "--psam")
        else:
            # one line naming both readers (exit 3) for PSAMs that share a serial or differ
            # in terminal id, before the server starts (PoolError: the root maps it)
            check_psams((open_reader(spec) for spec in psam_specs),
                        terminals=merchant_terminals(config.merchants))
            psams = [open_reader(spec) for spec in psam_specs]
        try:
            server = PaymentServer(config, psams)
        except PoolError:
            raise   # names a reader, not a setting: the root maps it (exit 3)
        except ValueError as exc:  # a setting the server refuses (its message names it)
            fail(f"{config_path}: {exc}", EXIT_INPUT)
    sys.exit(serve_app(server.app(), host=host, port=port, log_level=log_level,
                       drain=server, drain_seconds=drain_seconds))


@click.command("merchant")
@click.option("--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML: merchant id, shared key, payment server URL and terminal id, "
                   "variants, client terminals, db, bounds, [pon] for payment order numbers "
                   "(see fixtures/merchant-demo.toml).")
@click.option("--db", "db_url", default=None, help="Database URL (overrides the config).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8081, show_default=True, type=click.IntRange(1, 65535))
@serve_options
def serve_merchant(config_path: Path, db_url: str | None, host: str, port: int, log_level: str,
                   drain_seconds: float) -> None:
    """A merchant selling digital goods: checkout and status endpoints."""
    from ..kit.config import ConfigError
    from .config import merchant_config
    from .merchant.server import MerchantServer

    try:
        config = merchant_config(config_path, db_url)
    except ConfigError as exc:
        fail(str(exc), EXIT_DEVICE)
    sys.exit(serve_app(MerchantServer(config).app(), host=host, port=port,
                       log_level=log_level, drain_seconds=drain_seconds))
