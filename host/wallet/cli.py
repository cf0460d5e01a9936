"""The wallet's commands: ``svcard wallet source add`` (a bank account or credit card opened at
the financial system), ``svcard wallet topup`` (a cash agent's top-up of a card), ``svcard
wallet statements`` (the gateway's daily statements, a file per member) and the servers
``svcard serve wallet-fin | wallet-gateway | wallet-web | wallet-van``."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import click

from ..kit.command_line import EXIT_DECLINED, EXIT_INPUT, EXIT_NETWORK, emit, fail, json_option
from ..kit.serving import serve as serve_app
from ..kit.serving import serve_options
from ..terminal.card_commands import parse_amount_option
from ..terminal.money import Amount, AmountError, exponent_of, format_money

config_option = click.option("--config", "config_path", required=True,
                             type=click.Path(exists=True, dir_okay=False, path_type=Path),
                             help="The server's TOML file (see docs/wallet.md).")
db_option = click.option("--db", "db_url", default=None,
                         help="Database URL (overrides the config).")


def register(root: click.Group, serve: click.Group) -> None:
    root.add_command(wallet)
    for command in (serve_fin, serve_gateway, serve_web, serve_van):
        serve.add_command(command)


@click.group()
def wallet() -> None:
    """Anonymous prepaid cards in a browser wallet (seed 003): the financial system's side."""


@wallet.group("source")
def source_group() -> None:
    """Bank accounts and credit cards at the financial system."""


def _minor(amount: Amount, currency: int) -> int:
    """The amount in minor units at ``currency``'s own exponent (0 for JPY, 3 for BHD)."""
    try:
        return amount.minor_units(exponent_of(currency), currency, maximum=10**12)
    except AmountError as exc:
        fail(str(exc), EXIT_INPUT)


@source_group.command("add")
@click.argument("kind", type=click.Choice(["account", "credit"]))
@click.argument("number")
@config_option
@db_option
@click.option("--amount", required=True, callback=parse_amount_option, metavar="AMOUNT",
              help="The account's balance or the credit card's limit: 12.34 or 1234u.")
@click.option("--secret-env", required=True, metavar="NAME",
              help="The environment variable holding its secret (4 to 64 letters or digits).")
def source_add(kind: str, number: str, config_path: Path, db_url: str | None, amount: Amount,
               secret_env: str) -> None:
    """Open a bank account or credit card NUMBER (16 digits) at the financial system."""
    import os

    from .config import fin_config
    from .fin.app import FinServer, add_source
    from .links import NUMBER, SECRET

    secret = os.environ.get(secret_env, "")
    if not NUMBER.fullmatch(number):
        fail(f"NUMBER: 16 digits (got {number!r})", EXIT_INPUT)
    if not SECRET.fullmatch(secret):
        fail(f"{secret_env}: 4 to 64 letters or digits", EXIT_INPUT)
    server = FinServer(fin_config(config_path, db_url))
    try:
        add_source(server, kind, number, secret, _minor(amount, server.config.currency))
    finally:
        server.close()
    click.echo(f"{kind} {number} opened")


@wallet.command("topup")
@click.argument("card")
@click.argument("amount", callback=parse_amount_option)
@click.option("--fin-url", required=True, help="The financial system's address.")
@click.option("--agent", required=True, help="The agent's id at the financial system.")
@click.option("--key-file", required=True, type=click.Path(exists=True, dir_okay=False,
                                                            path_type=Path),
              help="The agent's link key: 64 hex digits.")
@click.option("--currency", type=click.IntRange(1, 999), default=156, show_default=True,
              help="The card's currency (ISO 4217 numeric code): AMOUNT is in its exponent.")
@json_option
def topup(card: str, amount: Amount, fin_url: str, agent: str, key_file: Path,
          currency: int, as_json: bool) -> None:
    """A cash agent charges CARD with AMOUNT (cash taken over the counter)."""
    import httpx

    from .links import LinkClient

    try:
        key = bytes.fromhex(key_file.read_text().strip())
    except ValueError:
        fail(f"{key_file}: not 64 hex digits", EXIT_INPUT)
    if len(key) != 32:
        fail(f"{key_file}: not 64 hex digits", EXIT_INPUT)
    minor = _minor(amount, currency)
    with httpx.Client(timeout=30) as http:
        status, answer = LinkClient(http, fin_url, agent, key).post("/v1/topups", {
            "ref": "cash-" + secrets.token_hex(12), "card": card, "amount": minor,
            "currency": currency})
    if status != 200:
        fail(f"refused: {answer.get('reason', status)}",
             EXIT_NETWORK if status >= 500 else EXIT_DECLINED)
    if answer["result"] != "done":
        fail(f"declined: {answer['reason']}", EXIT_DECLINED)
    emit(as_json, answer, f"card {card}: {format_money(answer['balance'], currency)}")


@wallet.command("statements")
@config_option
@db_option
@click.option("--day", required=True, metavar="YYYY-MM-DD", help="The day (UTC).")
@click.option("--out", "out", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="The folder: DAY/MEMBER.json are written under it.")
def statements(config_path: Path, db_url: str | None, day: str, out: Path) -> None:
    """The gateway writes each member's statement of DAY (every transaction reported that day
    on the member's cards), atomically; run again, the same files, byte for byte."""
    import datetime as dt

    from ..kit.config import ConfigError
    from .config import gateway_config
    from .gateway.db import make_engine
    from .gateway.journal import write_statements

    try:
        dt.date.fromisoformat(day)
    except ValueError:
        fail(f"--day: YYYY-MM-DD (got {day!r})", EXIT_INPUT)
    try:
        config = gateway_config(config_path, db_url)
    except ConfigError as exc:
        fail(str(exc), EXIT_INPUT)
    engine = make_engine(config.db_url)
    try:
        written = write_statements(engine, out, day)
    finally:
        engine.dispose()
    click.echo(f"{len(written)} statements for {day} in {out / day}")


def _serve(kind: str, config_path: Path, db_url: str | None, host: str, port: int,
           log_level: str, drain_seconds: float) -> None:
    from ..kit.config import ConfigError
    from . import config as C
    from .fin.app import FinServer
    from .gateway.app import GatewayServer
    from .van import VanServer
    from .web.app import WebServer

    server: FinServer | GatewayServer | WebServer | VanServer
    try:
        if kind == "fin":
            server = FinServer(C.fin_config(config_path, db_url))
        elif kind == "van":
            server = VanServer(C.van_config(config_path, db_url))
        elif kind == "gateway":
            server = GatewayServer(C.gateway_config(config_path, db_url))
        else:
            server = WebServer(C.web_config(config_path, db_url))
    except ConfigError as exc:
        fail(str(exc), EXIT_INPUT)
    sys.exit(serve_app(server.app(), host=host, port=port, log_level=log_level,
                       drain=server, drain_seconds=drain_seconds))


def _server_command(name: str, kind: str, port: int, doc: str) -> click.Command:
    @click.command(name, help=doc)
    @config_option
    @db_option
    @click.option("--host", default="127.0.0.1", show_default=True)
    @click.option("--port", default=port, show_default=True, type=click.IntRange(1, 65535))
    @serve_options
    def command(config_path: Path, db_url: str | None, host: str, port: int, log_level: str,
                drain_seconds: float) -> None:
        _serve(kind, config_path, db_url, host, port, log_level, drain_seconds)
    return command


serve_fin = _server_command("wallet-fin", "fin", 8095,
                            "The financial system: prepaid card balances, accounts, debits.")
serve_gateway = _server_command("wallet-gateway", "gateway", 8096,
                                "The payment gateway: the members' wallets and the malls' "
                                "approvals (matched against the wallet's purchase).")
serve_web = _server_command("wallet-web", "web", 8097,
                            "The electronic payment web server: members and the wallet page.")
serve_van = _server_command("wallet-van", "van", 8098,
                            "The VAN server (embodiment 3): malls' approvals relayed to the "
                            "financial system.")
