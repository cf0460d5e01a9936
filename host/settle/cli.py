"""The settlement system's commands: ``svcard clearing run`` and ``svcard clearing verify``
(seed FIG. 3), and ``svcard audit`` (is money conserved, is anything hidden)."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import click

from ...protocols import purse as P
from ..kit.command_line import EXIT_DECLINED, EXIT_INPUT, EXIT_USAGE, emit, fail, json_option
from ..terminal.card_commands import handled, parse_aid, readers
from ..terminal.money import format_money


def register(root: click.Group, serve: click.Group) -> None:
    """Add the settlement commands to ``svcard`` (``root``); settlement serves nothing, so
    ``serve`` gets no command."""
    root.add_command(clearing)
    root.add_command(audit_cmd)


@click.group()
def clearing() -> None:
    """Clear PSAM batches, move loaded funds to the float, pay merchants (seed FIG. 3)."""


@clearing.command("run")
@click.option("--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML: issuers (TAC keys), terminals (batch keys, merchant, acquirer), "
                   "settlement key (see fixtures/clearing-demo.toml).")
@click.option("--batches", "batch_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="The concentration point folder the payment servers write batches to "
                   "(must exist; read only).")
@click.option("--load-db", "load_dbs", multiple=True, metavar="URL",
              help="A load server's database: its confirmed loads fund the float (repeat; "
                   "must exist; read only).")
@click.option("--db", "db_url", required=True,
              help="The clearing database URL (created on the first run).")
@click.option("--out", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where the settlement file and its JSON Lines twin go (created if missing).")
@json_option
def clearing_run(config_path: Path, batch_dir: Path, load_dbs: tuple[str, ...], db_url: str,
                 out_dir: Path, as_json: bool) -> None:
    """One clearing run over every batch in the folder. Exit code 1 if any batch or record
    was refused (the rest is still cleared; refused ones are listed with their reason); 3 if
    an input (configuration, batch folder, load database) is missing or unusable: then nothing
    is written."""
    from ..kit.config import ConfigError
    from ..kit.db import sqlite_file
    from ..load.records import check_load_db
    from .clearing import run_clearing
    from .config import clearing_config
    from .db import make_engine
    from .sources import check_sources

    try:
        config = clearing_config(config_path)
    except ConfigError as exc:
        fail(str(exc), EXIT_INPUT)
    # the inputs are read, never created: check them all before the outputs are made
    if not batch_dir.is_dir():
        fail(f"--batches {batch_dir}: no such folder (the concentration folder the payment "
             "servers hand their batches to)", EXIT_INPUT)
    for url in load_dbs:
        check_load_db(url)
    # its own database: a new one, or an existing clearing database, never another kind's
    path = sqlite_file(db_url)
    if path is not None and path.is_file() and path.stat().st_size > 0:
        check_sources(clearing_db=db_url)
    report = run_clearing(config, batch_dir, make_engine(db_url), out_dir,
                          load_db_urls=load_dbs)
    refused = [b for b in report.batches if b["state"] == "refused"
               or b["counts"].get("refused")]
    refused += [p for p in report.proofs if p["state"] == "refused" or p["counts"].get("refused")]
    money = partial(format_money, currency_code=config.currency_code)
    text = [f"run {report.run_number}: {report.records_cleared} records cleared, "
            f"{money(report.total_paid)} paid to merchants; {report.loads_moved} loads "
            f"({money(report.total_loaded)}) moved to the float",
            f"  settlement file {report.settlement_file} (+ .jsonl)"]
    for b in report.batches:
        text.append(f"  {b['file']}: {b['state']} ({b['reason']}) {_counts(b['counts'])}")
        text += [f"    record {p['index']}: {p['state']}: {p['reason']}" for p in b["problems"]]
    for pf in report.proofs:
        text.append(f"  {pf['file']}: {pf['state']} ({pf['reason']}) {_counts(pf['counts'])}")
        text += [f"    batch {p['batch_number']} TTN {p['terminal_txn_number']}: {p['state']}: "
                 f"{p['reason']}" for p in pf["problems"]]
    emit(as_json, report.to_json(), "\n".join(text))
    if refused:
        sys.exit(EXIT_DECLINED)


@clearing.command("verify")
@click.argument("settlement_file", type=click.Path(exists=True, dir_okay=False,
                                                   path_type=Path))
@click.option("--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
def clearing_verify(settlement_file: Path, config_path: Path, as_json: bool) -> None:
    """Check a settlement file's MAC and layout and print its lines."""
    from ..kit.config import ConfigError
    from .config import clearing_config
    from .settlement_file import ClearingError, verify_settlement_file

    try:
        key = clearing_config(config_path).settlement_key
    except ConfigError as exc:
        fail(str(exc), EXIT_INPUT)
    try:
        data = verify_settlement_file(key, settlement_file.read_bytes())
    except ClearingError as exc:
        fail(str(exc), EXIT_DECLINED)
    emit(as_json, data, "\n".join([f"run {data['run_number']}: MAC verified"] + [
        f"  kind {ln['kind']} {ln['payer']} -> {ln['payee']}: {ln['count']} x, "
        f"{ln['amount']} minor units"
        for ln in data["lines"]]))


def _counts(counts: dict[str, int]) -> str:
    """``{'cleared': 3, 'held': 1}`` for a person: "3 cleared, 1 held"."""
    return ", ".join(f"{n} {state}" for state, n in counts.items()) or "no records"


@click.command("audit")
@click.option("--card", "card_specs", multiple=True, metavar="SPEC",
              help="A card (reader spec, or an image path): its balance counts (repeat).")
@click.option("--aid", "aid", default=P.DEFAULT_IEP_AID.hex().upper(), show_default=True,
              metavar="HEX", callback=lambda _ctx, _param, value: parse_aid(value),
              help="AID of the purse application to SELECT on every --card (5 to 16 bytes of "
                   "hex), as for every command that takes a purse card.")
@click.option("--payment-db", "payment_dbs", multiple=True, metavar="URL",
              help="A payment server's database (repeat).")
@click.option("--load-db", "load_dbs", multiple=True, metavar="URL",
              help="A load server's database (repeat).")
@click.option("--bank-db", "bank_dbs", multiple=True, metavar="URL",
              help="A bank's database (repeat).")
@click.option("--clearing-db", default=None, metavar="URL", help="The clearing database.")
@click.option("--sp-db", "sp_dbs", multiple=True, metavar="URL",
              help="A service provider's database: its three-way closing (purse debits = "
                   "merchants received, bill lines = payments + fees - discounts, loads = "
                   "debits + balances) is checked too (repeat).")
@click.option("--goods-db", "goods_dbs", multiple=True, metavar="URL",
              help="A goods party's database (seed 000: give the institution's and the "
                   "fulfilment server's, and the payment server's and merchant's to compare): "
                   "bank debits = goods paid, every good written or refunded, never twice; "
                   "the goods on every --card are checked too (repeat).")
@click.option("--trade-db", "trade_dbs", multiple=True, metavar="URL",
              help="A trading-session party's database (seed 004: each mediating agent's, "
                   "the customers' and the merchants' account managers'): every operator's "
                   "postings, rounding, customer and merchant accounts close per currency "
                   "(repeat).")
@click.option("--opening", default=0, show_default=True, type=click.IntRange(0, None),
              help="Balances the cards were personalised with (minor units, in total).")
@click.option("--psam", "psam_specs", multiple=True, metavar="SPEC",
              help="A payment server's PSAM (reader spec or image path): its open batch is read, "
                   "so a confirmed payment with no PSAM record is found at once (repeat).")
@click.option("--max-age", "max_age_days", default=7.0, show_default=True,
              type=click.FloatRange(0, None),
              help="Days after which a held record, an open load or a confirmed payment not "
                   "yet cleared fails the audit.")
@json_option
def audit_cmd(card_specs: tuple[str, ...], aid: bytes, payment_dbs: tuple[str, ...],
              load_dbs: tuple[str, ...], bank_dbs: tuple[str, ...], clearing_db: str | None,
              sp_dbs: tuple[str, ...], goods_dbs: tuple[str, ...], trade_dbs: tuple[str, ...],
              opening: int,
              psam_specs: tuple[str, ...],
              max_age_days: float, as_json: bool) -> None:
    """Prove money is conserved and nothing is hidden: cards + unsettled purchases + settled =
    loads; the float = cards + unsettled; bank debits = confirmed loads; every confirmed payment
    has a PSAM record; every refund a proven "not loaded"; held records, open loads and
    uncleared payments listed, and failing past --max-age. Exit code 1 on any finding.

    Every database is read, never written or created: one that does not exist (a mistyped
    path) is an error, exit code 3. An audit with nothing to audit (no card, and no row in any
    database) is never clean: exit code 2 when no card or database is given, 3 when they hold
    nothing."""
    from .audit import (
        DAY_MS,
        NOTHING,
        Unit,
        audit,
        card_balances,
        check_sources,
        psam_open_batches,
    )
    from .sources import states_points

    def spec(s: str) -> str:
        return s if ":" in s else f"virtual:{s}"

    if not (card_specs or payment_dbs or load_dbs or bank_dbs or clearing_db or sp_dbs
            or goods_dbs or trade_dbs):
        fail("nothing to audit: give --card, --payment-db, --load-db, --bank-db, "
             "--clearing-db, --sp-db, --goods-db or --trade-db (see svcard audit --help)",
             EXIT_USAGE)
    check_sources(payment_dbs=payment_dbs, load_dbs=load_dbs, bank_dbs=bank_dbs,
                  clearing_db=clearing_db)
    from ..goods.records import check_goods_db
    from ..sp.records import check_sp_db
    from ..trade.records import check_trade_db
    from .goods_books import card_goods

    for url in sp_dbs:
        check_sp_db(url)
    for url in goods_dbs:
        check_goods_db(url)
    for url in trade_dbs:
        check_trade_db(url)
    with handled(), readers(*[("card", spec(s)) for s in card_specs]) as card_readers:
        cards = card_balances(card_readers, aid)
        goods_on_cards = card_goods(card_readers, aid) if goods_dbs else None
        try:
            unit: Unit = "points" if states_points(card_readers, aid) else "money"
        except ValueError as exc:
            fail(str(exc), EXIT_INPUT)
    open_batches = None
    if psam_specs:
        with handled(), readers(*[("psam", spec(s)) for s in psam_specs]) as psam_readers:
            open_batches = psam_open_batches(psam_readers)
    report = audit(cards, payment_dbs=payment_dbs, load_dbs=load_dbs, bank_dbs=bank_dbs,
                   clearing_db=clearing_db, opening=opening,
                   max_age_ms=int(max_age_days * DAY_MS), open_batches=open_batches,
                   sp_dbs=sp_dbs, unit=unit, goods_dbs=goods_dbs, card_goods=goods_on_cards,
                   trade_dbs=trade_dbs)
    emit(as_json, report.to_json(), report.text())
    if report.nothing_audited:
        fail(NOTHING, EXIT_INPUT)
    if not report.clean:
        sys.exit(EXIT_DECLINED)
