"""The commands of FIG. 3B and the merchant's copy (registered by ``sp/cli.py``):
``svcard sp merchant-key MERCHANT --public-key HEX --db URL`` (the key a merchant signs its PON
answers and order copies with) and ``svcard sp pon SP_URL --customer ID --key FILE --merchant M
--pon PON`` (the customer's purchase order for a merchant's payment order number)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import click

from ...kit.command_line import EXIT_DECLINED, EXIT_INPUT, EXIT_NETWORK, emit, fail, json_option

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_PON = re.compile(r"[0-9a-f]{32}")


@click.command("merchant-key")
@click.argument("merchant")
@click.option("--public-key", "public_hex", required=True,
              help="The merchant's Ed25519 public key (64 hex digits).")
@click.option("--db", "db_url", required=True, help="The SP database URL, e.g. sqlite:///sp.db.")
@json_option
def merchant_key_cmd(merchant: str, public_hex: str, db_url: str, as_json: bool) -> None:
    """Set the key MERCHANT signs its PON answers and order copies with (FIG. 3B): without one
    the SP takes no PON or copy from that merchant."""
    from .. import db as D
    from ..signing import SigningError, public_from_hex
    from .pon import set_merchant_key

    if not _NAME.fullmatch(merchant):
        fail(f"merchant: {merchant[:40]!r} is not a merchant name (1 to 32 of A-Z a-z 0-9 _ . -)",
             EXIT_INPUT)
    try:
        public = public_from_hex(public_hex)
    except SigningError as exc:
        fail(f"--public-key: {exc}", EXIT_INPUT)
    engine = D.make_engine(db_url)
    try:
        set_merchant_key(engine, merchant, public, int(time.time() * 1000))
    finally:
        engine.dispose()
    emit(as_json, {"merchant": merchant, "public_key": public.hex()},
         f"merchant {merchant}: PON answers and order copies checked with key {public.hex()}")


@click.command("pon")
@click.argument("sp_url")
@click.option("--customer", required=True)
@click.option("--key", "key_file", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The customer's private key file (from `sp customer add --key-out`).")
@click.option("--merchant", required=True)
@click.option("--pon", required=True, help="The merchant's payment order number (32 hex).")
@click.option("--max-amount", type=click.IntRange(0, 2**40 - 1), default=None,
              help="Required: the most you agree to be billed for the PON, in minor units "
                   "(e.g. 125 for 1.25): the merchant's amount, plus the SP's fee.")
@click.option("--sp", "sp_name", default="svcard-sp", show_default=True,
              help="The SP's name (its `name` setting), signed into the order: an order for "
                   "one SP is refused by any other.")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(1, 600))
@json_option
def pon_cmd(sp_url: str, customer: str, key_file: Path, merchant: str, pon: str,
            max_amount: int | None, sp_name: str, timeout: float, as_json: bool) -> None:
    """Have the SP at SP_URL pay MERCHANT's payment order number PON (FIG. 3B); the merchant
    then gives you the goods for the PON and its pick-up secret."""
    import httpx

    from ...terminal.money import format_money
    from ..signing import SigningError, read_private_key, signed_pon_order

    if not _PON.fullmatch(pon):
        fail(f"--pon: {pon[:40]!r} is not a payment order number (32 lower-case hex)",
             EXIT_INPUT)
    if max_amount is None:   # never a blank cheque: the SP bills what the merchant asks
        fail("--max-amount: required: the most you agree to be billed for this PON, in minor "
             "units (the merchant told you its amount with the PON; the SP may add its fee)",
             EXIT_INPUT)
    if not _NAME.fullmatch(sp_name):
        fail(f"--sp: {sp_name[:40]!r} is not an SP name (1 to 32 of A-Z a-z 0-9 _ . -)",
             EXIT_INPUT)
    try:
        key = read_private_key(key_file)
        body, headers = signed_pon_order(key, customer, merchant, pon, max_amount=max_amount,
                                         sp=sp_name)
    except SigningError as exc:
        fail(str(exc), EXIT_INPUT)
    try:
        with httpx.Client(timeout=timeout) as http:
            answer = http.post(sp_url.rstrip("/") + "/v1/orders/pon", content=body,
                               headers=headers)
    except httpx.HTTPError as exc:
        fail(f"{sp_url}: no answer ({type(exc).__name__})", EXIT_NETWORK)
    try:
        data = answer.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        data = {"reason": answer.text[:200]}
    if answer.status_code != 200:
        fail(f"the SP refused ({answer.status_code}): {data.get('reason', '')}",
             EXIT_NETWORK if answer.status_code >= 500 else EXIT_DECLINED)
    line = data.get("line") or {}
    emit(as_json, data, f"PON {pon} paid (order {data.get('order')})"
         + (f", billed {format_money(line['billed'], line['currency_code'])}" if line else "")
         + ": pick the goods up at the merchant with the PON's secret")
