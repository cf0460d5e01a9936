"""The service provider's commands: ``svcard sp customer add|block|unblock|limit|list``,
``svcard sp bills`` (and ``bills close``, ``bills paid``), ``svcard sp order`` (the customer's
client) and ``svcard serve sp``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..kit.command_line import (
    EXIT_DECLINED,
    EXIT_INPUT,
    EXIT_NETWORK,
    EXIT_USAGE,
    emit,
    fail,
    json_option,
)
from ..kit.serving import serve as serve_app
from ..kit.serving import serve_options
from ..terminal.card_commands import parse_amount_option
from ..terminal.money import Amount, AmountError, exponent_of, format_money
from .operator_cli import OrderCommand, purses_cmd
from .server.pon_cli import merchant_key_cmd, pon_cmd


def register(root: click.Group, serve: click.Group) -> None:
    """Add the SP's commands to ``svcard`` (``root``) and its server to ``serve``."""
    root.add_command(sp)
    serve.add_command(serve_sp)
    sp.add_command(purses_cmd)


def _bounded(limit: int) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    def check(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None and not 1 <= len(value) <= limit:
            raise click.BadParameter(f"1 to {limit} characters (got {len(value)})",
                                     param=param)
        return value
    return check


db_option = click.option("--db", "db_url", required=True,
                         help="The SP database URL, e.g. sqlite:///sp.db.")
customer_argument = click.argument("customer", callback=_bounded(32))


def _minor(amount: Amount, currency: int) -> int:
    try:
        return amount.minor_units(exponent_of(currency), currency, maximum=2**62)
    except AmountError as exc:
        fail(str(exc), EXIT_USAGE)


@click.group()
def sp() -> None:
    """The service provider of seed 001: customer accounts, bills, and ordering through it."""


sp.add_command(merchant_key_cmd)   # FIG. 3B: a merchant's key, a customer's PON
sp.add_command(pon_cmd)


@sp.group("customer")
def customer_group() -> None:
    """Customer accounts (straight in the SP's database)."""


@customer_group.command("add")
@customer_argument
@db_option
@click.option("--name", default=None, callback=_bounded(100), help="The customer's name.")
@click.option("--credit-limit", "limit", default="100.00", show_default=True,
              callback=parse_amount_option, metavar="AMOUNT",
              help="How much may be open (unbilled, reserved and owed) at once: 12.34 or "
                   "1234u (minor units).")
@click.option("--currency", default=156, show_default=True, type=click.IntRange(1, 998))
@click.option("--public-key", default=None, metavar="HEX",
              help="The customer's Ed25519 public key (64 hex digits), when the customer made "
                   "the key pair.")
@click.option("--key-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Make a key pair and write its private key here (mode 0600), for the "
                   "customer.")
@json_option
def customer_add(customer: str, db_url: str, name: str | None, limit: Amount, currency: int,
                 public_key: str | None, key_out: Path | None, as_json: bool) -> None:
    """Open an account for CUSTOMER with its public key (given, or a new pair)."""
    from . import db as D
    from .customers import CustomerError, add_customer
    from .signing import SigningError, new_key, public_from_hex, write_private_key

    if (public_key is None) == (key_out is None):
        fail("give either --public-key HEX or --key-out FILE", EXIT_USAGE)
    credit = _minor(limit, currency)
    try:
        if public_key is not None:
            public, private = public_from_hex(public_key), None
        else:
            private, public = new_key()
    except SigningError as exc:
        fail(f"--public-key: {exc}", EXIT_USAGE)
    engine = D.make_engine(db_url)
    try:
        add_customer(engine, customer, public, credit, currency, name)
        if private is not None and key_out is not None:
            write_private_key(key_out, private)
    except (CustomerError, SigningError) as exc:
        fail(str(exc), EXIT_DECLINED)
    finally:
        engine.dispose()
    emit(as_json, {"customer": customer, "credit_limit": credit, "currency_code": currency,
                   "public_key": public.hex(), "key_file": str(key_out) if key_out else None},
         f"customer {customer}: credit limit {format_money(credit, currency)}"
         + (f"; private key in {key_out}" if key_out else ""))


def _change(db_url: str, what: Callable[[Any], None]) -> None:
    from . import db as D
    from .customers import CustomerError
    from .records import check_sp_db

    check_sp_db(db_url)
    engine = D.make_engine(db_url)
    try:
        what(engine)
    except CustomerError as exc:
        fail(str(exc), EXIT_DECLINED)
    finally:
        engine.dispose()


@customer_group.command("block")
@customer_argument
@db_option
@click.option("--reason", required=True, callback=_bounded(200),
              help="Why (the customer is told).")
@json_option
def customer_block(customer: str, db_url: str, reason: str, as_json: bool) -> None:
    """Block CUSTOMER: every order refused with the reason, nothing paid."""
    from .customers import set_blocked

    _change(db_url, lambda e: set_blocked(e, customer, True, reason))
    emit(as_json, {"customer": customer, "state": "blocked", "reason": reason},
         f"customer {customer} blocked: {reason}")


@customer_group.command("unblock")
@customer_argument
@db_option
@json_option
def customer_unblock(customer: str, db_url: str, as_json: bool) -> None:
    """Take CUSTOMER's block away."""
    from .customers import set_blocked

    _change(db_url, lambda e: set_blocked(e, customer, False))
    emit(as_json, {"customer": customer, "state": "active"}, f"customer {customer} active")


@customer_group.command("limit")
@customer_argument
@click.argument("amount", callback=parse_amount_option)
@db_option
@json_option
def customer_limit(customer: str, amount: Amount, db_url: str, as_json: bool) -> None:
    """Set CUSTOMER's credit limit to AMOUNT (12.34, or 1234u in minor units)."""
    from .customers import set_credit_limit
    from .records import customers

    rows = {r["id"]: r for r in customers(db_url)}
    currency = int(rows[customer]["currency_code"]) if customer in rows else 156
    credit = _minor(amount, currency)
    _change(db_url, lambda e: set_credit_limit(e, customer, credit))
    emit(as_json, {"customer": customer, "credit_limit": credit},
         f"customer {customer}: credit limit {format_money(credit, currency)}")


@customer_group.command("list")
@db_option
@json_option
def customer_list(db_url: str, as_json: bool) -> None:
    """Every customer: state, credit limit, reserved, open and owed amounts."""
    from .records import customers

    rows = customers(db_url)
    emit(as_json, rows, "\n".join(
        f"{r['id']:<16} {r['state']:<8} limit {format_money(r['credit_limit'], r['currency_code'])}"
        f"  reserved {format_money(r['reserved'], r['currency_code'])}"
        f"  open {format_money(r['open_total'], r['currency_code'])}"
        f"  owed {format_money(r['owed'], r['currency_code'])}"
        + (f"  ({r['block_reason']})" if r["block_reason"] else "") for r in rows)
        or "no customers")


@sp.group("bills", invoke_without_command=True)
@click.option("--db", "db_url", default=None, help="The SP database URL.")
@click.option("--customer", default=None, callback=_bounded(32), help="Only this customer's.")
@json_option
@click.pass_context
def bills_group(ctx: click.Context, db_url: str | None, customer: str | None,
                as_json: bool) -> None:
    """The issued bills, as text a person reads (or --json); `bills close` and `bills paid`."""
    if ctx.invoked_subcommand is not None:
        return
    if db_url is None:
        fail("--db is needed", EXIT_USAGE)
    from .billing import bill_text
    from .records import bills

    found = bills(db_url, customer)
    emit(as_json, found, "\n\n".join(
        bill_text(b, b["items"], exponent_of(b["currency_code"]) or 0) for b in found)
        or "no bills")


@bills_group.command("close")
@db_option
@click.option("--customer", default=None, callback=_bounded(32),
              help="Bill this customer's open lines now.")
@click.option("--period", type=click.Choice(["day", "week", "month"]), default=None,
              help="Bill every customer's lines from ended periods of this length.")
@click.option("--due-days", default=14, show_default=True, type=click.IntRange(1, 366))
@json_option
def bills_close(db_url: str, customer: str | None, period: str | None, due_days: int,
                as_json: bool) -> None:
    """Issue bills now: one customer's open lines, or every ended period's."""
    from . import db as D
    from .billing import close_ended_periods, close_now
    from .records import check_sp_db

    if (customer is None) == (period is None):
        fail("give either --customer ID or --period day|week|month", EXIT_USAGE)
    check_sp_db(db_url)
    engine = D.make_engine(db_url)
    try:
        issued = ([b for b in [close_now(engine, customer, due_days)] if b is not None]
                  if customer is not None else
                  close_ended_periods(engine, str(period), due_days))
    finally:
        engine.dispose()
    emit(as_json, {"bills": issued},
         f"issued bills {', '.join(map(str, issued))}" if issued else "no open lines to bill")


@bills_group.command("paid")
@click.argument("bill_id", type=click.IntRange(1))
@db_option
@json_option
def bills_paid(bill_id: int, db_url: str, as_json: bool) -> None:
    """Record that the customer paid BILL_ID."""
    from . import db as D
    from .billing import settle_bill
    from .records import check_sp_db

    check_sp_db(db_url)
    engine = D.make_engine(db_url)
    try:
        done = settle_bill(engine, bill_id)
    finally:
        engine.dispose()
    if not done:
        fail(f"bill {bill_id} is not an issued, unpaid bill", EXIT_DECLINED)
    emit(as_json, {"bill": bill_id, "state": "paid"}, f"bill {bill_id} paid")


@sp.command("orders")
@db_option
@click.option("--state", default=None,
              type=click.Choice(["rejected", "paying", "paid", "billed", "failed", "in_doubt"]),
              help="Only orders in this state (in_doubt: the payment's outcome is unknown).")
@click.option("--log", "with_log", is_flag=True,
              help="With each order's merchandising log (every event, for disputes).")
@json_option
def orders_cmd(db_url: str, state: str | None, with_log: bool, as_json: bool) -> None:
    """The retail orders (read only), oldest first."""
    from .records import order_log, orders

    rows = orders(db_url, state)
    if with_log:
        events = order_log(db_url)
        for row in rows:
            row["log"] = [e for e in events if e["order_ref"] == row["order_ref"]]
    for row in rows:   # a hash of the signed request: kept in the database for disputes
        row.pop("request_digest", None)
    lines = []
    for r in rows:
        amount = "" if r["wholesale"] is None else f" paid {r['wholesale']}u"
        lines.append(f"{r['order_ref']} {r['customer']:<12} {r['merchant']}/{r['sku']:<10} "
                     f"{r['state']:<8}{amount} {r['reason']}".rstrip())
        lines += [f"    {e['event']:<10} {e['detail']}" for e in r.get("log", [])]
    emit(as_json, rows, "\n".join(lines) or "no orders")


@sp.command("order", cls=OrderCommand)
@click.argument("sp_url")
@click.option("--customer", required=True, callback=_bounded(32))
@click.option("--key", "key_file", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The customer's private key file (from `sp customer add --key-out`).")
@click.option("--merchant", required=True, callback=_bounded(64))
@click.option("--sku", required=True, callback=_bounded(64))
@click.option("--sp", "sp_name", default="svcard-sp", show_default=True,
              callback=_bounded(32),
              help="The SP's name (its `name` setting), signed into the order: an order for "
                   "one SP is refused by any other.")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(1, 600))
@json_option
def order_cmd(sp_url: str, customer: str, key_file: Path, merchant: str, sku: str,
              sp_name: str, timeout: float, as_json: bool) -> None:
    """Buy SKU of MERCHANT through the SP at SP_URL (no card needed): prints the goods."""
    import httpx

    from ..terminal.online import PaymentRefused
    from .client import order
    from .signing import SigningError, read_private_key

    try:
        key = read_private_key(key_file)
    except SigningError as exc:
        fail(str(exc), EXIT_INPUT)
    try:
        with httpx.Client(timeout=timeout) as http:
            answer = order(http, sp_url, customer=customer, key=key, merchant=merchant, sku=sku,
                           sp=sp_name)
    except PaymentRefused as exc:
        fail(str(exc), EXIT_NETWORK if exc.status >= 500 else EXIT_DECLINED)
    line = answer.get("line") or {}
    emit(as_json, answer, f"{answer.get('item')}: {answer.get('goods')}"
         + (f" (billed {format_money(line['billed'], line['currency_code'])})" if line else ""))


@click.command("sp")
@click.option("--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML: the catalogue, billing and the purse pool (see fixtures/sp-demo.toml).")
@click.option("--db", "db_url", default=None, help="Database URL (overrides the config).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8085, show_default=True, type=click.IntRange(1, 65535))
@serve_options
def serve_sp(config_path: Path, db_url: str | None, host: str, port: int, log_level: str,
             drain_seconds: float) -> None:
    """The service provider: takes customers' signed orders, pays merchants from its purse
    pool, bills the customers."""
    from ..kit.config import ConfigError
    from .config import sp_config
    from .server.app import SpServer

    try:
        config = sp_config(config_path, db_url)
    except ConfigError as exc:
        fail(str(exc), EXIT_INPUT)
    if config.purses is None:
        fail(f"{config_path}: purses: the purse pool section is needed to serve", EXIT_INPUT)
    server = SpServer(config, None)
    sys.exit(serve_app(server.app(), host=host, port=port, log_level=log_level,
                       drain=server, drain_seconds=drain_seconds))
