"""The loading system's commands: ``svcard load`` (the client), ``svcard bank account ...``
(the bank's customer accounts), ``svcard serve load`` and ``svcard serve bank``."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..kit.command_line import EXIT_DECLINED, EXIT_DEVICE, EXIT_USAGE, emit, fail, json_option
from ..kit.serving import node_options, serve_options
from ..kit.serving import serve as serve_app
from ..terminal import purse as T
from ..terminal.card_commands import (
    amount_option,
    card_option,
    handled,
    parse_amount_option,
    readers,
)
from ..terminal.money import Amount, AmountError, exponent_of, format_money
from ..terminal.online import (
    http_client,
    journalled_run,
    report_resumed,
    resume_command,
    retry_for_option,
)
from ..terminal.reader_specs import open_reader


def register(root: click.Group, serve: click.Group) -> None:
    """Add the loading commands to ``svcard`` (``root``) and its ``serve`` group."""
    root.add_command(load_cmd)
    root.add_command(bank)
    serve.add_command(serve_load)
    serve.add_command(serve_bank)


# --- svcard bank account ... ----------------------------------------------------------------
@click.group()
def bank() -> None:
    """The bank's customer accounts (straight in the bank's database)."""


db_option = click.option("--db", "db_url", required=True,
                         help="The bank database URL, e.g. sqlite:///bank.db.")


@bank.group("account")
def bank_account() -> None:
    """Create, fund and list accounts (amounts as 12.34 in the account's currency, or 1234u
    in minor units)."""


def _bounded(limit: int) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    """A click callback refusing (usage error) an empty value or one over ``limit``
    characters: what the bank's table holds (a longer one would fail in the database)."""
    def check(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None and not 1 <= len(value) <= limit:
            raise click.BadParameter(f"1 to {limit} characters (got {len(value)})",
                                     param=param)
        return value
    return check


# what the bank's accounts table holds (host/load/bank/db.py), and what the bank takes
ACCOUNT_ID_MAX, HOLDER_MAX, SECRET_MAX = 32, 100, 128
account_argument = click.argument("account_id", callback=_bounded(ACCOUNT_ID_MAX))


def _bank_db_or_new(url: str) -> None:
    """Refuse (exit 3) a database that exists but is not a bank's: its tables are never
    added to a database of another kind. A SQLite file that does not exist (or is empty) is
    a new bank database; PostgreSQL is not checked (one database may hold several
    components' tables)."""
    from ..kit.db import sqlite_file
    from .records import check_bank_db

    path = sqlite_file(url)
    if path is not None and path.is_file() and path.stat().st_size > 0:
        check_bank_db(url)


@bank_account.command("create")
@account_argument
@db_option
@click.option("--holder", default=None, callback=_bounded(HOLDER_MAX),
              help=f"The holder's name, at most {HOLDER_MAX} characters (default: the id).")
@click.option("--funds", default="0", show_default=True, metavar="AMOUNT",
              callback=parse_amount_option,
              help="Opening balance: 1000.00 in the account's currency, or 100000u in minor "
                   "units.")
@click.option("--currency", default=156, show_default=True, type=click.IntRange(1, 999),
              help="ISO 4217 numeric currency code (156 = CNY).")
@click.option("--secret", default=None, callback=_bounded(SECRET_MAX),
              help="The account secret (default: a random one).")
@json_option
def bank_account_create(account_id: str, db_url: str, holder: str | None, funds: Amount,
                        currency: int, secret: str | None, as_json: bool) -> None:
    """Open ACCOUNT_ID. Prints its secret once: `svcard load` needs it."""
    from .bank.db import BankDb, BankError, make_engine

    opening = _minor_units(funds, currency)
    _bank_db_or_new(db_url)
    try:
        secret = BankDb(make_engine(db_url)).create_account(account_id, holder or account_id,
                                                            currency, opening, secret)
    except BankError as exc:
        fail(str(exc), EXIT_DECLINED)
    emit(as_json, {"account": account_id, "balance": opening, "secret": secret},
         f"account {account_id} opened with {format_money(opening, currency)}; "
         f"secret: {secret}")


def _minor_units(amount: Amount, currency: int) -> int:
    """An amount typed for an account, in minor units of its currency (ISO 4217 exponent)."""
    try:
        return amount.minor_units(exponent_of(currency), currency, maximum=2**62)
    except AmountError as exc:
        fail(str(exc), EXIT_USAGE)


@bank_account.command("fund")
@account_argument
@click.argument("amount", callback=parse_amount_option)
@db_option
@json_option
def bank_account_fund(account_id: str, amount: Amount, db_url: str, as_json: bool) -> None:
    """Deposit AMOUNT into ACCOUNT_ID: 12.34 in the account's currency, or 1234u in minor
    units."""
    from .bank.db import BankDb, BankError, make_engine
    from .records import check_bank_db

    check_bank_db(db_url)  # read-only first: an existing bank database, never a new one or
    # another kind of database (whose tables the bank's would be added to)
    db = BankDb(make_engine(db_url))
    account = db.account(account_id)
    if account is None:
        fail(f"no account {account_id}", EXIT_DECLINED)
    currency = int(account["currency_code"])
    try:
        balance = db.fund(account_id, _minor_units(amount, currency))
    except BankError as exc:
        fail(str(exc), EXIT_DECLINED)
    emit(as_json, {"account": account_id, "balance": balance},
         f"account {account_id}: balance {format_money(balance, currency)}")


@bank_account.command("list")
@db_option
@json_option
def bank_account_list(db_url: str, as_json: bool) -> None:
    """Every account with its balance (reads the database; never creates it)."""
    from .records import accounts

    rows = accounts(db_url)  # read only: a database that does not exist is an error (exit 3)
    emit(as_json, rows, "\n".join(
        f"{r['account_id']:<16} {format_money(r['balance'], r['currency_code']):>18}  "
        f"{r['holder']}" for r in rows) or "no accounts")


# --- svcard load ----------------------------------------------------------------------------
def _or_resume(f: Callable[..., None]) -> Callable[..., None]:
    """``--resume``: finish what the journal holds for the card instead of a new load, decided
    before the amount is asked for (BANK_URL, --account, --secret and the amount are needed
    only for a new load)."""

    @functools.wraps(f)
    def dispatch(*args: Any, resume: bool, **kwargs: Any) -> None:
        if resume:
            given = [name for name, key in (("BANK_URL", "bank_url"), ("--amount", "amount"),
                                            ("--minor", "minor")) if kwargs.get(key) is not None]
            if given:
                fail(f"--resume makes no new load: drop {', '.join(given)}", EXIT_USAGE)
            _resume_loads(kwargs["card_spec"], kwargs["aid"], kwargs["journal"],
                          kwargs["timeout"], kwargs["retry_for"], kwargs["as_json"])
            return
        missing = [name for name, key in (("BANK_URL", "bank_url"), ("--account", "account"),
                                          ("--secret", "secret")) if kwargs.get(key) is None]
        if missing:
            fail(f"a load needs {', '.join(missing)} (or --resume to finish what the journal "
                 f"holds)", EXIT_USAGE)
        f(*args, **kwargs)

    return click.option("--resume", is_flag=True,
                        help="Only finish what an interruption left in the journal for this "
                             "card; no new load (no BANK_URL or amount).")(dispatch)


def _resume_loads(card_spec: str, aid: bytes, journal: Path | None, timeout: float,
                  retry_for: float, as_json: bool) -> None:
    """``svcard load --resume``: each open load of the card finished, asking the card."""
    from ..terminal.journal import Journal, default_journal
    from . import client as LC

    book = Journal(journal or default_journal())
    finish = resume_command("load", card_spec, journal, aid)
    with handled(), journalled_run(book, finish, retry_for), \
            http_client(timeout, retry_for) as http, readers(("card", card_spec)) as (card_r,):
        report_resumed(book, LC.resume_loads(card_r, journal=book, http=http, aid=aid), as_json)


@click.command("load")
@click.argument("bank_url", required=False)
@card_option
@click.option("--account", default=None, help="Your account at the bank.")
@click.option("--secret", default=None, envvar="SVCARD_ACCOUNT_SECRET",
              help="The account secret (or $SVCARD_ACCOUNT_SECRET).")
@_or_resume
@amount_option
@click.option("--journal", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The local journal (default: $SVCARD_JOURNAL or "
                   "~/.local/state/svcard/journal.jsonl).")
@click.option("--timeout", default=30.0, show_default=True, help="HTTP timeout, seconds.")
@retry_for_option
@json_option
def load_cmd(bank_url: str, card_spec: str, aid: bytes, account: str, secret: str,
             amount: Amount, journal: Path | None, timeout: float, retry_for: float,
             as_json: bool) -> None:
    """Load an amount from your bank account onto the card (seed FIG. 18): --amount 50.00 in
    the card's currency (read from the card first), or 5000u / --minor 5000 in minor units.

    BANK_URL is the bank's load page (e.g. http://127.0.0.1:8083/v1/load). First finishes any
    load of this card an interruption left in the journal, asking the card what happened.
    Exit code 1 if the load was refused or ended "not loaded" (the account is re-credited).
    Interrupted (Ctrl-C, SIGTERM: exit 130), or a server unreachable or busy past --retry-for
    (exit 11), it says what state the journal holds; `svcard load --resume --card SPEC`
    finishes it.
    """
    from ..terminal.journal import Journal, default_journal
    from . import client as LC

    book = Journal(journal or default_journal())
    # a refusal is exit 1 (handled); busy, unreachable or interrupted: journalled_run says
    finish = resume_command("load", card_spec, journal, aid)
    with handled(), journalled_run(book, finish, retry_for), \
            http_client(timeout, retry_for) as http, readers(("card", card_spec)) as (card_r,):
        resumed = LC.resume_loads(card_r, journal=book, http=http, aid=aid)
        # a PC/SC transaction: no other program's command comes between SELECT and CREDIT
        with card_r.transaction():
            info = T.select_purse(card_r, aid)  # the card's currency places the amount
            outcome = LC.load(bank_url, card_r, account=account, secret=secret,
                              amount=info.minor_units(amount), journal=book, http=http,
                              aid=aid)
    money = info.money
    text = "\n".join(
        [f"resumed {r['txn_id']}: {r['outcome']}" for r in resumed]
        + [f"{outcome.outcome} {money(outcome.amount)} "
           f"({outcome.round_trips} round trips): {outcome.reason}",
           f"  card balance {money(outcome.balance_before)} -> {money(outcome.balance_after)}",
           f"  bank: {_bank_text(outcome.bank, money)}"])
    emit(as_json, {"resumed": resumed, "load": outcome.to_json()}, text)
    if outcome.outcome != "loaded":
        sys.exit(EXIT_DECLINED)


def _bank_text(bank: dict[str, Any], money: Callable[[int], str]) -> str:
    """What the bank answered, for a person: "registered loaded, account balance CNY 75.00"."""
    parts = [("registered " if bank.get("registered") else "") + str(bank.get("outcome", ""))]
    if isinstance(bank.get("refunded"), int) and bank["refunded"]:
        parts.append(f"refunded {money(bank['refunded'])}")
    if isinstance(bank.get("account_balance"), int):
        parts.append(f"account balance {money(bank['account_balance'])}")
    return ", ".join(p for p in parts if p.strip())


# --- svcard serve load / svcard serve bank --------------------------------------------------
@click.command("load")
@click.option("--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML: terminal id, banks and their shared keys, db "
                   "(see fixtures/load-demo.toml).")
@click.option("--hsm", "hsm_specs", multiple=True, required=True, metavar="SPEC",
              help="A load HSM (repeat for a pool): virtual:hsm.json, pcsc:NAME, ...")
@click.option("--db", "db_url", default=None, help="Database URL (overrides the config).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8084, show_default=True, type=click.IntRange(1, 65535))
@node_options("HSM")
@serve_options
def serve_load(config_path: Path, hsm_specs: tuple[str, ...], db_url: str | None, host: str,
               port: int, node: str | None, lease_seconds: str | None, log_level: str,
               drain_seconds: float) -> None:
    """The load server: load requests in, load commands (the HSM's S2) out, confirmations
    sealed for the bank. As one of several nodes (--node, or node_name in the config) it
    opens an HSM only while it leases it (docs/deploy-nodes.md)."""
    from ..kit.config import ConfigError
    from ..kit.serving import node_settings
    from ..terminal.reader_specs import node_readers
    from .config import load_config
    from .server.app import LoadServer

    try:
        config = node_settings(load_config(config_path, db_url), node, lease_seconds)
    except ConfigError as exc:
        fail(str(exc), EXIT_DEVICE)
    with handled():
        hsms = (node_readers(hsm_specs, "--hsm") if config.node_name   # another node may
                else [open_reader(spec) for spec in hsm_specs])        # hold one now
        server = LoadServer(config, hsms)
    sys.exit(serve_app(server.app(), host=host, port=port, log_level=log_level,
                       drain=server.drain, drain_seconds=drain_seconds))


@click.command("bank")
@click.option("--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML: bank id, the key shared with the load server, load server URL "
                   "(see fixtures/bank-demo.toml).")
@click.option("--db", "db_url", default=None, help="Database URL (overrides the config).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8083, show_default=True, type=click.IntRange(1, 65535))
@serve_options
def serve_bank(config_path: Path, db_url: str | None, host: str, port: int, log_level: str,
               drain_seconds: float) -> None:
    """The bank: debits customer accounts for loads, registers the load server's
    confirmations (a "not loaded" one re-credits the account)."""
    from ..kit.config import ConfigError
    from .bank.server import BankServer
    from .config import bank_config

    try:
        config = bank_config(config_path, db_url)
    except ConfigError as exc:
        fail(str(exc), EXIT_DEVICE)
    bank_server = BankServer(config)
    sys.exit(serve_app(bank_server.app(), host=host, port=port, log_level=log_level,
                       drain=bank_server.drain, drain_seconds=drain_seconds))
