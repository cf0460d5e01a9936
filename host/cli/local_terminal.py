"""``svcard terminal``: the local terminal (seed FIG. 2), a card slot beside a PSAM or load
HSM slot: balance, log, purchase, load, the composite purchase (capp), the goods list and the
validator (redeem)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from ...card.storage import ProfileError
from ...protocols import goods as G
from ...protocols import purse as P
from ..goods import redeem as R
from ..kit.command_line import EXIT_USAGE, emit, fail, json_option
from ..terminal import capp as C
from ..terminal import purse as T
from ..terminal import unload as U
from ..terminal.card_commands import (
    AMOUNT_HELP,
    amount_option,
    at_option,
    card_option,
    handled,
    parse_amount_option,
    pin_option,
    purse_option,
    readers,
    trace_option,
)
from ..terminal.goods_key import GoodsKeyService
from ..terminal.journal import Journal
from ..terminal.money import Amount
from ..terminal.points import points_commands


@click.group()
def terminal() -> None:
    """A local terminal (seed FIG. 2): a card slot plus a PSAM or load HSM slot."""


terminal.add_command(points_commands)   # svcard terminal points (host/terminal/points.py)


@terminal.command("balance")
@card_option
@purse_option
@pin_option
@json_option
@trace_option
def terminal_balance(card_spec: str, aid: bytes, purse: str, pin: str | None, as_json: bool,
                     trace_out: Path | None) -> None:
    """Read a purse's balance (GET BALANCE)."""
    with handled(), readers(("card", card_spec), trace_out=trace_out) as (card_r,):
        info, balance = T.read_balance(card_r, T.purse_id(purse), pin, aid)
    emit(as_json, {"card_serial": info.app_serial, "purse": purse.upper(), "balance": balance,
                   "currency_code": info.currency_code,
                   "currency_exponent": info.currency_exponent},
         f"{purse.upper()} balance: {info.money(balance)} (card {info.app_serial})")


@terminal.command("log")
@card_option
@json_option
@trace_option
def terminal_log(card_spec: str, aid: bytes, as_json: bool, trace_out: Path | None) -> None:
    """Read the transaction log (READ RECORD, newest first)."""
    with handled(), readers(("card", card_spec), trace_out=trace_out) as (card_r,):
        info, entries = T.read_log_info(card_r, aid)
    def shown(e: T.LogEntry) -> str:   # an overdraft update shows the new limit, not amount 0
        if e.txn_type == P.TYPE_OVERDRAFT_UPDATE:
            return f"limit {info.money(e.overdraft_limit)}"
        return info.money(e.amount)
    lines = [f"{e.date} {e.time}  {e.type_name:<22} {shown(e):>20}  counter "
             f"{e.counter:<5} terminal {e.terminal_id}" for e in entries] or ["(empty log)"]
    emit(as_json, [e.__dict__ for e in entries], "\n".join(lines))


@terminal.command("purchase")
@card_option
@click.option("--psam", "psam_spec", required=True, metavar="SPEC",
              help="Reader spec of the PSAM, e.g. virtual:psam.json.")
@amount_option
@purse_option
@pin_option
@click.option("--key-index", default=1, show_default=True, type=click.IntRange(0, 255))
@click.option("--issuer-factor", is_flag=True,
              help="Use the 24-byte INIT SAM form (issuer id as a second diversification).")
@json_option
@trace_option
@at_option
def terminal_purchase(card_spec: str, aid: bytes, psam_spec: str, amount: Amount, purse: str,
                      pin: str | None, key_index: int, issuer_factor: bool,
                      as_json: bool, trace_out: Path | None, at: dt.datetime | None) -> None:
    """Pay the amount from the card: card <-> PSAM, MAC1/MAC2/TAC, the PSAM records it.

    The amount is --amount 12.34 in the card's currency (read from the card first) or
    1234u / --minor 1234 in minor units."""
    with handled(), readers(("card", card_spec), ("psam", psam_spec),
                            trace_out=trace_out) as (card_r, psam_r):
        r = T.purchase(card_r, psam_r, amount, purse=T.purse_id(purse), key_index=key_index,
                       pin=pin, issuer_factor=issuer_factor, when=at, card_aid=aid)
    emit(as_json, r.to_json(), r.text())


@terminal.command("load")
@card_option
@click.option("--hsm", "hsm_spec", required=True, metavar="SPEC",
              help="Reader spec of the load HSM, e.g. virtual:hsm.json.")
@amount_option
@purse_option
@pin_option
@click.option("--terminal-id", default="000000000001", show_default=True,
              help="The loading terminal's 6-byte id, hex.")
@click.option("--key-index", default=1, show_default=True, type=click.IntRange(0, 255))
@json_option
@trace_option
@at_option
def terminal_load(card_spec: str, aid: bytes, hsm_spec: str, amount: Amount, purse: str,
                  pin: str | None, terminal_id: str, key_index: int, as_json: bool,
                  trace_out: Path | None, at: dt.datetime | None) -> None:
    """Load the amount onto the card: S1 from the card, S2 from the HSM, S3 checked.

    The amount is --amount 12.34 in the card's currency (read from the card first) or
    1234u / --minor 1234 in minor units."""
    try:
        tid = bytes.fromhex(terminal_id)
    except ValueError:
        fail("--terminal-id must be hex", EXIT_USAGE)
    with handled(), readers(("card", card_spec), ("hsm", hsm_spec),
                            trace_out=trace_out) as (card_r, hsm_r):
        r = T.load(card_r, hsm_r, amount, terminal_id=tid, purse=T.purse_id(purse),
                   key_index=key_index, pin=pin, when=at, card_aid=aid)
    emit(as_json, r.to_json(), r.text())


def _terminal_id(value: str) -> bytes:
    try:
        tid = bytes.fromhex(value)
    except ValueError:
        fail("--terminal-id must be hex", EXIT_USAGE)
    if len(tid) != 6:
        fail("--terminal-id must be 6 bytes of hex", EXIT_USAGE)
    return tid


_hsm_option = click.option("--hsm", "hsm_spec", required=True, metavar="SPEC",
                           help="Reader spec of the issuer's load HSM, e.g. virtual:hsm.json.")
_terminal_id_option = click.option("--terminal-id", default="000000000001", show_default=True,
                                   help="The terminal's 6-byte id, hex.")
_key_index_option = click.option("--key-index", default=1, show_default=True,
                                 type=click.IntRange(0, 255))


@terminal.command("unload")
@card_option
@_hsm_option
@amount_option
@pin_option
@_terminal_id_option
@_key_index_option
@json_option
@trace_option
@at_option
def terminal_unload(card_spec: str, aid: bytes, hsm_spec: str, amount: Amount,
                    pin: str | None, terminal_id: str, key_index: int, as_json: bool,
                    trace_out: Path | None, at: dt.datetime | None) -> None:
    """Unload the amount from the ED passbook (needs --pin): MAC1 from the card, MAC2 from
    the HSM, the card's MAC3 checked."""
    tid = _terminal_id(terminal_id)
    with handled(), readers(("card", card_spec), ("hsm", hsm_spec),
                            trace_out=trace_out) as (card_r, hsm_r):
        r = U.unload(card_r, hsm_r, amount, terminal_id=tid, pin=pin, key_index=key_index,
                     when=at, card_aid=aid)
    emit(as_json, r.to_json(), r.text())


@terminal.command("overdraft")
@card_option
@_hsm_option
@click.option("--limit", "limit", required=True, callback=parse_amount_option,
              help="The new overdraft limit: " + AMOUNT_HELP)
@pin_option
@_terminal_id_option
@_key_index_option
@json_option
@trace_option
@at_option
def terminal_overdraft(card_spec: str, aid: bytes, hsm_spec: str, limit: Amount,
                       pin: str | None, terminal_id: str, key_index: int, as_json: bool,
                       trace_out: Path | None, at: dt.datetime | None) -> None:
    """Set the ED passbook's overdraft limit (needs --pin); the ED balance moves by the
    change. MAC1 from the card, MAC2 from the HSM, the card's TAC checked."""
    tid = _terminal_id(terminal_id)
    with handled(), readers(("card", card_spec), ("hsm", hsm_spec),
                            trace_out=trace_out) as (card_r, hsm_r):
        r = U.update_overdraft(card_r, hsm_r, limit, terminal_id=tid, pin=pin,
                               key_index=key_index, when=at, card_aid=aid)
    emit(as_json, r.to_json(), r.text())


def _records(ctx: click.Context, param: click.Parameter,
             values: tuple[str, ...]) -> list[C.GoodsWrite]:
    try:
        return [C.GoodsWrite.parse(v) for v in values]
    except T.TerminalCheckFailed as exc:
        raise click.BadParameter(str(exc).removeprefix("--record: ")) from None


def _goods_keys(ctx: click.Context, param: click.Parameter,
                value: Path | None) -> GoodsKeyService | None:
    if value is None:
        return None
    from ...card.personalise import load_issuer  # pydantic: only when --goods-keys is given

    try:
        return GoodsKeyService.from_issuer(load_issuer(value))
    except (ProfileError, ValueError) as exc:
        raise click.BadParameter(f"{value}: {exc}", ctx, param) from None


goods_issuer_option = click.option(
    "--goods-issuer", "goods_keys", type=click.Path(dir_okay=False, path_type=Path),
    callback=_goods_keys, default=None, metavar="FILE",
    help="The issuer file whose [goods_key] MACs each record (84 DE, the form a card takes "
         "by default). Without it the records go as the plain 80 DC, which only a card "
         "personalised with capp_plain_update takes.")


@terminal.command("capp")
@card_option
@click.option("--psam", "psam_spec", required=True, metavar="SPEC",
              help="Reader spec of the PSAM, e.g. virtual:psam.json.")
@amount_option
@click.option("--record", "records", multiple=True, callback=_records, metavar="SFI[:N]:HEX",
              help="A goods record to write with the debit (repeatable): SFI:HEX by its tag "
                   "(the same good's record, else the first empty one), SFI:N:HEX into "
                   "record N. Layouts: docs/protocol.md.")
@click.option("--key-index", default=1, show_default=True, type=click.IntRange(0, 255))
@goods_issuer_option
@json_option
@trace_option
@at_option
def terminal_capp(card_spec: str, aid: bytes, psam_spec: str, amount: Amount,
                  records: list[C.GoodsWrite], key_index: int,
                  goods_keys: GoodsKeyService | None, as_json: bool,
                  trace_out: Path | None, at: dt.datetime | None) -> None:
    """A composite (CAPP) purchase: pay the amount from the EP and write the goods records
    onto the card in the same step (both or neither); the PSAM records it as type 09."""
    with handled(), readers(("card", card_spec), ("psam", psam_spec),
                            trace_out=trace_out) as (card_r, psam_r):
        r = C.capp_purchase(card_r, psam_r, amount, records, key_index=key_index, when=at,
                            card_aid=aid, goods_keys=goods_keys)
    emit(as_json, r.to_json(), r.text())


@terminal.command("goods")
@card_option
@json_option
@trace_option
def terminal_goods(card_spec: str, aid: bytes, as_json: bool, trace_out: Path | None) -> None:
    """List the goods on the card (READ RECORD of the goods files 11-14)."""
    with handled(), readers(("card", card_spec), trace_out=trace_out) as (card_r,):
        goods = [g.to_json() for g in C.read_goods(card_r, aid)]
    emit(as_json, goods, "\n".join(C.goods_lines(goods)))


def _id_option(ctx: click.Context, param: click.Parameter, value: str | None) -> bytes | None:
    if value is None:
        return None
    try:
        return R.parse_id(value, f"--{param.name}")
    except ValueError as exc:
        raise click.BadParameter(str(exc).split(": ", 1)[1], ctx, param) from None


@terminal.command("redeem")
@card_option
@click.option("--psam", "psam_spec", required=True, metavar="SPEC",
              help="Reader spec of the validator's PSAM, e.g. virtual:psam.json.")
@click.option("--good", callback=_id_option, metavar="GOOD_ID",
              help="The good's id at its issuer (up to 16 hex digits).")
@click.option("--kind", type=click.Choice(sorted(G.KINDS)), default=None,
              help="The kind of good to use (the usable one that expires first).")
@click.option("--issuer", callback=_id_option, metavar="ISSUER_ID",
              help="Only goods of this issuer (up to 16 hex digits).")
@click.option("--fare", callback=parse_amount_option, default=None, metavar="AMOUNT",
              help="The fare charged with it (default 0, a prepaid good): " + AMOUNT_HELP)
@click.option("--key-index", default=1, show_default=True, type=click.IntRange(0, 255))
@click.option("--journal", "journal_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="The validator's journal: a tap is journalled before the "
              "card is written, and a card tapped again after an interrupted tap that went "
              "through passes without a second ride.")
@goods_issuer_option
@json_option
@trace_option
@at_option
def terminal_redeem(card_spec: str, aid: bytes, psam_spec: str, good: bytes | None,
                    kind: str | None, issuer: bytes | None, fare: Amount | None,
                    key_index: int, journal_path: Path | None,
                    goods_keys: GoodsKeyService | None, as_json: bool,
                    trace_out: Path | None, at: dt.datetime | None) -> None:
    """A validator: use a good on the card (a ticket or voucher becomes used, a transit token
    loses one ride) in one composite purchase of the fare, recorded by the PSAM (type 09).
    A good that cannot be used is refused with its reason, and nothing is written."""
    if good is None and kind is None:
        fail("give --good GOOD_ID or --kind KIND (or both)", EXIT_USAGE)
    choice = R.Choice(good_id=good, kind=kind, issuer_id=issuer)
    with handled(), readers(("card", card_spec), ("psam", psam_spec),
                            trace_out=trace_out) as (card_r, psam_r):
        try:
            r = R.redeem(card_r, psam_r, choice, fare if fare is not None else 0,
                         key_index=key_index, when=at, card_aid=aid, goods_keys=goods_keys,
                         journal=Journal(journal_path) if journal_path else None)
        except R.Refused as refused:   # the reason on stdout too; one line on stderr
            if as_json:
                emit(True, refused.to_json(), "")
            raise
    emit(as_json, r.to_json(), r.text())
