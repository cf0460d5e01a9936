"""The SP operator's commands: ``svcard sp order settle ORDER_REF`` (decide an order left
``in_doubt`` from evidence: :mod:`.operator`) and ``svcard sp purses`` (the pool's purses:
state, balance, counters, and why one retired, with what it left on the card).

``svcard sp order`` is the customer's command (``sp order SP_URL --customer ...``); its first
word ``settle`` names the operator's command instead (:class:`OrderCommand`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..kit.command_line import EXIT_DECLINED, EXIT_INPUT, emit, fail, json_option


class OrderCommand(click.Command):
    """``sp order SP_URL ...``, or ``sp order settle ORDER_REF ...`` (the operator's)."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        if args and args[0] == "settle":
            return order_settle.make_context("order settle", args[1:], parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        formatter.write_paragraph()
        formatter.write_text("The operator's `svcard sp order settle ORDER_REF --db URL` decides "
                             "an order left in_doubt (see its --help).")


def _journal_and_billing(config_path: Path | None, journal_dir: Path | None
                         ) -> tuple[Path | None, int, int]:
    if config_path is None:
        return journal_dir, 2**62, 14
    from ..kit.config import ConfigError
    from .config import sp_config

    try:
        config = sp_config(config_path)
    except ConfigError as exc:
        fail(str(exc), EXIT_INPUT)
    return (journal_dir or config.journal_dir, config.billing.maximum,
            config.billing.due_days)


@click.command("settle")
@click.argument("order_ref")
@click.option("--db", "db_url", required=True, help="The SP database URL, e.g. sqlite:///sp.db.")
@click.option("--config", "config_path", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The SP's configuration: its journal folder and billing settings.")
@click.option("--journal-dir", default=None,
              type=click.Path(file_okay=False, path_type=Path),
              help="The purses' journal folder (default: the configuration's).")
@click.option("--payment-db", "payment_dbs", multiple=True, metavar="URL",
              help="The merchant's payment server database: whether it confirmed a payment "
                   "the card made (repeat; read only).")
@json_option
def order_settle(order_ref: str, db_url: str, config_path: Path | None,
                 journal_dir: Path | None, payment_dbs: tuple[str, ...], as_json: bool) -> None:
    """Decide ORDER_REF, an order the SP left in_doubt, from evidence: the pool's record of
    the payment, the purse's journal, the payment server's record carrying the card's TAC.
    Paid: billed, its goods relayed through the customer's lookup. Not paid: failed, the
    customer's credit given back. Evidence missing, conflicting or not final: nothing changes
    and exit code 1 with the reason."""
    from ..kit.db import DatabaseError
    from . import db as D
    from .operator import NotDecided, settle_order
    from .records import check_sp_db

    if len(order_ref) > 64:
        fail("ORDER_REF: at most 64 characters", EXIT_INPUT)
    check_sp_db(db_url)
    journal, maximum, due_days = _journal_and_billing(config_path, journal_dir)
    engine = D.make_engine(db_url)
    try:
        decision = settle_order(engine, order_ref, journal_dir=journal,
                                payment_dbs=payment_dbs, maximum=maximum, due_days=due_days)
    except NotDecided as exc:
        fail(f"not decided: {exc}", EXIT_DECLINED)
    except DatabaseError as exc:
        fail(str(exc), EXIT_INPUT)
    finally:
        engine.dispose()
    emit(as_json, decision.to_json(), decision.text())


@click.command("purses")
@click.option("--db", "db_url", required=True, help="The SP database URL, e.g. sqlite:///sp.db.")
@json_option
def purses_cmd(db_url: str, as_json: bool) -> None:
    """The provider's purses (read only): state, balance as last seen, counters, and why a
    retired one retired (with the balance it left on the card)."""
    from .records import purses

    rows = purses(db_url)
    for row in rows:
        row.pop("lease_owner", None)
    lines = [f"{p['serial']} {p['state']:<8} balance {p['balance']:>10}u  counters "
             f"{p['offline_counter']}/{p['online_counter']}  {p['reason']}".rstrip()
             for p in rows]
    emit(as_json, rows, "\n".join(lines) or "no purses")
