"""The customer agent's commands (seed 004): ``svcard session open|buy|close|show|price|table``
(``open --purse``: a card pays the deposit; ``load-rest`` loads the rest back), the operator's
``keygen`` and ``customer``, and ``svcard serve trade-*``. ``open`` writes the session (its key
and chain seed, mode 0600) to ``--state``; ``buy`` pays the next link(s) with a signed order;
``close`` is the terminate message and this side's record. A refusal exits 1, an unreachable
server 11, a file that cannot be used 3.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import httpx
from sqlalchemy.exc import IntegrityError

from ..kit.command_line import EXIT_DECLINED, EXIT_INPUT, EXIT_NETWORK, emit, fail, json_option
from ..kit.config import ConfigError
from ..kit.serving import Drain, serve_options
from ..kit.serving import serve as serve_app
from . import customer as C
from . import messages as M
from .config import AccountManagerConfig, AcquirerConfig, MerchantAccountConfig, server_config
from .money import Amount, ExchangeTable, MoneyError, price_in, table_payload
from .server import purse_agent as PA
from .signing import SigningError, new_key, public_from_hex, read_private_key, write_private_key
from .trust import commands as trust_commands

state_option = click.option("--state", "state", required=True, type=click.Path(path_type=Path),
                            help="The session file (written by open, read by buy and close).")

table_option = click.option("--table", "table_path", type=click.Path(path_type=Path),
                            default=None, help="The exchange table this device keeps (a "
                            "missing or expired one is fetched anew, with a warning).")


def account_options(f: Any) -> Any:
    """The account manager whose exchange table the device keeps (to fetch a new one)."""
    for name, what in (("key", "Its public key (hex)."), ("id", "Its id."),
                       ("url", "Your account manager.")):
        f = click.option(f"--account-{name}", default=None, help=what)(f)
    return f


def register(root: click.Group, serve: click.Group) -> None:
    """Add ``svcard session`` to ``svcard`` and the three servers to ``svcard serve``."""
    root.add_command(session)
    for role in ROLES:
        serve.add_command(_serve_command(role))


ROLES = {"account-manager": "the customer account manager (seed 004, 202): takes "
                            "initiations, reserves deposits",
         "acquirer": "the mediating trusted agent (seed 004, 203), the merchant operator's "
                     "value acquirer",
         "merchant": "the merchant agent (seed 004, 200): takes sessions and purchases",
         "merchant-account": "the merchant account manager (seed 004, 204): deposit "
                             "records from the clearing"}


def _serve_command(role: str) -> click.Command:
    @click.command(f"trade-{role}", help=f"Serve {ROLES[role]}.")
    @click.option("--config", "config_path", required=True,
                  type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="TOML: the server's id, key, database and peers (docs/trade.md).")
    @click.option("--db", "db_url", default=None, help="Database URL (overrides the config).")
    @click.option("--host", default="127.0.0.1", show_default=True)
    @click.option("--port", required=True, type=click.IntRange(1, 65535))
    @serve_options
    def command(config_path: Path, db_url: str | None, host: str, port: int, log_level: str,
                drain_seconds: float) -> None:
        from .server.account import AccountManager
        from .server.acquirer import Acquirer
        from .server.merchant import MerchantAgent
        from .server.merchant_account import MerchantAccount

        try:
            config = server_config(role, config_path, db_url)
        except ConfigError as exc:
            fail(str(exc), EXIT_INPUT)
        server: AccountManager | Acquirer | MerchantAgent | MerchantAccount
        if isinstance(config, AccountManagerConfig):
            server = AccountManager(config)
        elif isinstance(config, AcquirerConfig):
            server = Acquirer(config)
        elif isinstance(config, MerchantAccountConfig):
            server = MerchantAccount(config)
        else:
            server = MerchantAgent(config)
        try:
            code = serve_app(server.app(), host=host, port=port, log_level=log_level,
                             drain=Drain(), drain_seconds=drain_seconds)
        finally:
            server.close()
        sys.exit(code)
    return command


@click.command("keygen")
@click.option("--key-out", required=True, type=click.Path(path_type=Path),
              help="Where to write the private key (a new file, mode 0600).")
def keygen_cmd(key_out: Path) -> None:
    """Make an Ed25519 key pair: the private key to a new file, the public key printed."""
    private, public = new_key()
    try:
        write_private_key(key_out, private)
    except (SigningError, OSError) as exc:
        fail(str(exc), EXIT_INPUT)
    click.echo(public.hex())


@click.command("customer")
@click.argument("customer")
@click.option("--db", "db_url", required=True, help="The account manager's database URL.")
@click.option("--public-key", required=True, help="The customer's public key (hex).")
@click.option("--currency", required=True, help="The account's currency (ISO 4217).")
@click.option("--credit-limit", required=True, help="e.g. 100.00")
def customer_cmd(customer: str, db_url: str, public_key: str, currency: str,
                 credit_limit: str) -> None:
    """Register CUSTOMER at an account manager (its database) with a credit limit."""
    from .db import am_engine
    from .server.account import add_customer

    if not M.IDENT(customer):
        fail(f"customer: {customer!r} is not 1-32 letters, digits or _.@-", EXIT_INPUT)
    try:
        limit = Amount.parse(credit_limit, currency)
        public = public_from_hex(public_key, "--public-key")
    except (MoneyError, SigningError) as exc:
        fail(str(exc), EXIT_INPUT)
    engine = am_engine(db_url)
    try:
        add_customer(engine, customer, public, currency, limit.minor)
    except IntegrityError:
        fail(f"customer {customer}: exists already", EXIT_INPUT)
    finally:
        engine.dispose()
    click.echo(f"customer {customer}: credit limit {limit}")


@click.group()
def session() -> None:
    """Deposit-backed trading sessions (seed 004): open one, buy inside it, close it."""


def _load(path: Path) -> C.Session:
    try:
        return C.load(path)
    except C.TradeError as exc:
        fail(str(exc), EXIT_INPUT)


def _summary(s: C.Session) -> dict[str, object]:
    return {"session": s.session, "merchant": s.merchant, "pseudonym": s.pseudonym,
            "deposit": str(Amount(s.deposit, s.currency)),
            "deposit_merchant": str(Amount(s.deposit_merchant, s.currency_merchant)),
            "rate": s.rate, "unit": s.unit, "links": s.length, "spent": s.spent,
            "left": str(s.left()), "expires": s.expires, "purse_order": s.purse_order or None}


session.add_command(keygen_cmd)
session.add_command(customer_cmd)
trust_commands.register(session)     # FIG. 4: product, dispute-verify
PA.register(session)                 # point 7: load-rest


@session.command("open")
@click.argument("account_url")
@click.option("--account-id", required=True, help="The account manager's id.")
@click.option("--account-key", required=True, help="The account manager's public key (hex).")
@click.option("--customer", required=True, help="Your customer id at the account manager.")
@click.option("--key", "key_file", required=True, type=click.Path(path_type=Path),
              help="Your private key file (64 hex digits).")
@click.option("--merchant", required=True, help="The merchant's id.")
@click.option("--merchant-url", required=True, help="The merchant agent's URL.")
@click.option("--operator", required=True, help="The merchant's operator id.")
@click.option("--deposit", required=True, help="The deposit, e.g. 10.00.")
@click.option("--currency", required=True, help="Your account's currency (ISO 4217).")
@click.option("--unit", type=click.IntRange(1, 10**9), default=None,
              help="Minor units of the merchant's currency per link (default: the smallest).")
@state_option
@table_option
@PA.purse_options
@json_option
def open_cmd(account_url: str, account_id: str, account_key: str, customer: str,
             key_file: Path, merchant: str, merchant_url: str, operator: str, deposit: str,
             currency: str, unit: int | None, state: Path, table_path: Path | None,
             card_spec: str | None, journal: Path, resume: bool, as_json: bool) -> None:
    """Open a trading session through your account manager."""
    if state.exists():
        fail(f"{state}: exists; a session file is never overwritten", EXIT_INPUT)
    try:
        amount = Amount.parse(deposit, currency)
        am_public = public_from_hex(account_key, "--account-key")
        private = read_private_key(key_file)
    except (MoneyError, SigningError) as exc:
        fail(str(exc), EXIT_INPUT)
    if table_path is not None:     # the device's table renewed on the way (seed 004)
        _device_table(table_path, account_url, account_id, account_key)
    try:
        with httpx.Client(timeout=30) as http:
            s = PA.open_any(http, card_spec, journal, resume, account_url.rstrip("/"),
                            account_id, am_public, customer, private, merchant,
                            merchant_url.rstrip("/"), operator, amount, unit)
    except C.TradeError as exc:
        fail(str(exc), EXIT_DECLINED)
    except httpx.HTTPError as exc:
        fail(f"{account_url}: {type(exc).__name__}: {exc}", EXIT_NETWORK)
    C.save(state, s)
    data = _summary(s)
    emit(as_json, data, f"session {s.session} open: deposit {data['deposit']} = "
                        f"{data['deposit_merchant']} at {s.rate}; {s.length} links of "
                        f"{s.unit}")


@session.command("buy")
@click.argument("item")
@click.option("--units", type=click.IntRange(1, 10_000), default=1, show_default=True)
@state_option
@table_option
@json_option
def buy_cmd(item: str, units: int, state: Path, table_path: Path | None,
            as_json: bool) -> None:
    """Buy ITEM inside the session: pay the next link(s) with a signed order. The price is
    shown in your currency at the session's rate, fixed when it opened."""
    s = _load(state)
    if table_path is not None:
        _device_table(table_path, s.account_url, s.opened.get("account_manager"),
                      s.account_key or None)
    try:
        with httpx.Client(timeout=30) as http:
            message = C.purchase(s, item, units)
            C.save(state, s)          # the link counts as spent from now on
            answer = http.post(f"{s.merchant_url}/v1/sessions/{s.session}/purchases",
                               json=message)
    except C.TradeError as exc:
        fail(str(exc), EXIT_DECLINED)
    except httpx.HTTPError as exc:
        fail(f"{s.merchant_url}: {type(exc).__name__}: {exc}", EXIT_NETWORK)
    if answer.status_code != 200:
        fail(f"the merchant refused the purchase (HTTP {answer.status_code}): "
             f"{C.reason_of(answer)}", EXIT_DECLINED)
    got = answer.json()
    mine = C.in_customer_currency(s, int(got["amount"]))
    emit(as_json, {**got, "in_your_currency": str(mine)},
         f"bought {item}: {Amount(got['amount'], got['currency'])}; "
         f"{Amount(got['left'], got['currency'])} left in session {s.session} (the price: "
         f"{mine} at most, at the session's rate)")


@session.command("close")
@state_option
@json_option
def close_cmd(state: Path, as_json: bool) -> None:
    """End the session: the terminate message to the merchant, then this side's record
    through the account manager to the mediating agent (run it again after a lost answer)."""
    s = _load(state)
    try:
        with httpx.Client(timeout=30) as http:
            try:
                got = C.close(http, s)
            finally:
                C.save(state, s)       # the record made, so a second run sends the same
    except C.TradeError as exc:
        fail(str(exc), EXIT_DECLINED)
    except httpx.HTTPError as exc:
        fail(f"{type(exc).__name__}: {exc}", EXIT_NETWORK)
    c = got.get("clearing")
    if c is None:
        emit(as_json, got, f"session {s.session}: record {got.get('taken')}; the mediating "
                           "agent clears it when the merchant's record is in")
        return
    emit(as_json, got, f"session {s.session} cleared ({c['outcome']}): paid "
                       f"{Amount(c['paid'], c['currency_merchant'])}, charged "
                       f"{Amount(c['withdrawal'], c['currency_customer'])}, returned "
                       f"{Amount(c['returned'], c['currency_customer'])}")


def _device_table(path: Path, account_url: str | None, account_id: str | None,
                  account_key: str | None, fetch: bool = False) -> ExchangeTable:
    """The device's table at ``path``; warns when it has none or it has expired, and then
    fetches a new one from the account manager (exit 1 without one to ask)."""
    now = int(time.time() * 1000)
    warning = C.table_warning(path, now)
    if warning:
        click.echo(f"svcard: warning: {warning}", err=True)
    try:
        public = public_from_hex(account_key, "--account-key") if account_key else None
        with httpx.Client(timeout=30) as http:
            table, _ = C.device_table(http, path, (account_url or "").rstrip("/"),
                                      account_id, public, now, fetch)
    except SigningError as exc:
        fail(str(exc), EXIT_INPUT)
    except C.TradeError as exc:
        fail(str(exc), EXIT_DECLINED)
    except httpx.HTTPError as exc:
        fail(f"{account_url}: {type(exc).__name__}: {exc}", EXIT_NETWORK)
    if warning or fetch:
        click.echo(f"svcard: fetched a new exchange table of {table.issuer} from "
                   f"{account_id} (valid until {C.when(table.expires)})", err=True)
    return table


@session.command("price")
@click.argument("amount")
@click.argument("currency")
@click.option("--in", "into", required=True, help="Your currency (ISO 4217).")
@click.option("--table", "table_path", required=True, type=click.Path(path_type=Path),
              help="The exchange table this device keeps (made or renewed here).")
@account_options
@json_option
def price_cmd(amount: str, currency: str, into: str, table_path: Path,
              account_url: str | None, account_id: str | None, account_key: str | None,
              as_json: bool) -> None:
    """A merchant's price AMOUNT CURRENCY in your currency, at your bank's exchange table
    (seed 004: the device keeps the table with its lifespan stamp and warns when it has
    expired)."""
    try:
        price = Amount.parse(amount, currency)
        Amount(0, into)
    except MoneyError as exc:
        fail(str(exc), EXIT_INPUT)
    table = _device_table(table_path, account_url, account_id, account_key)
    try:
        shown = price_in(price, into, table, int(time.time() * 1000))
    except MoneyError as exc:
        fail(f"{table_path}: {exc}", EXIT_DECLINED)
    emit(as_json, {"price": str(price), "shown": str(shown), "issuer": table.issuer,
                   "expires": table.expires},
         f"{price} = {shown} (at most; table of {table.issuer}, valid until "
         f"{C.when(table.expires)})")


@session.command("table")
@click.option("--table", "table_path", required=True, type=click.Path(path_type=Path),
              help="The exchange table this device keeps.")
@account_options
@click.option("--fetch", is_flag=True, help="Fetch a new table even if the kept one is valid.")
@json_option
def table_cmd(table_path: Path, account_url: str | None, account_id: str | None,
              account_key: str | None, fetch: bool, as_json: bool) -> None:
    """Show the exchange table this device keeps; fetch a new one from your account manager
    when there is none, it has expired (with a warning) or --fetch says so."""
    t = _device_table(table_path, account_url, account_id, account_key, fetch)
    data = table_payload(t)
    emit(as_json, data, f"exchange table of {t.issuer}: 1 {t.base} = " + ", ".join(
        f"{r} {c}" for c, r in dict(data["rates"]).items()) +   # type: ignore[call-overload]
        f"; valid {C.when(t.issued)} to {C.when(t.expires)}")


@session.command("show")
@state_option
@json_option
def show_cmd(state: Path, as_json: bool) -> None:
    """The session in the file, without its secrets."""
    s = _load(state)
    data = _summary(s)
    emit(as_json, data, "\n".join(f"{k}: {v}" for k, v in data.items()))


@session.command("merchant-end")
@click.argument("session_id", metavar="SESSION")
@click.option("--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The merchant agent's TOML file (its key, database and acquirer).")
@click.option("--db", "db_url", default=None, help="Database URL (overrides the config).")
@json_option
def merchant_end_cmd(session_id: str, config_path: Path, db_url: str | None,
                     as_json: bool) -> None:
    """The merchant ends SESSION: no more purchases; its signed record goes to the mediating
    agent (which also asks for it itself at the session's end)."""
    import asyncio

    from .server.merchant import MerchantAgent

    try:
        config = server_config("merchant", config_path, db_url)
    except ConfigError as exc:
        fail(str(exc), EXIT_INPUT)
    assert not isinstance(config, (AccountManagerConfig, AcquirerConfig, MerchantAccountConfig))
    agent = MerchantAgent(config)
    try:
        got = asyncio.run(agent.closer.end(session_id)) if M.SESSION(session_id) else None
    finally:
        agent.close()
    if got is None:
        fail(f"session {session_id}: not a session of this merchant", EXIT_DECLINED)
    record = json.loads(got[0])
    emit(as_json, record, f"session {session_id} ended ({record['ended']}): "
                          f"{record['count']} purchases, "
                          f"{Amount(record['total'], record['currency'])}")
