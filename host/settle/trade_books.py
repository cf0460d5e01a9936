"""The trading sessions' part of ``svcard audit`` (seed 004): the books of the mediating
agents (one per merchant operator), the customers' account managers and the merchant account
managers close exactly, per currency and per account.

Each ``--trade-db`` is opened read only (:func:`..kit.db.open_existing`); which party it
belongs to is read from its tables. A merchant agent's database is accepted and counted, but
its purchases are not books (the mediating agent's evidence check already decided what each
merchant is paid). The checks are :func:`svcard.host.trade.records.books`: each agent's
postings sum to zero per currency; its rounding account holds what its conversions left;
every cleared session's deposit account is empty; each withdrawal and deposit record matches
its clearing; each customer's ``reserved`` is its open deposits; and, with every clearing
delivered, each merchant and each customer got, per currency, what the agents booked to them.
Every finding is one line naming the session or the account and the currency.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, func, inspect, select

from ..kit.db import DatabaseError, masked_url, open_existing
from ..trade import db as D
from ..trade import records

TRADE_DB = "trading-session party database"
ROLES: dict[str, Any] = {           # the table that tells each party's database
    "acquirer": D.acq_postings, "account-manager": D.am_withdrawals,
    "merchant-account": D.mam_deposits, "merchant": D.ma_purchases}


@dataclass
class TradeBooks:
    figures: dict[str, int] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    discrepancies: list[str] = field(default_factory=list)
    read: int = 0


def _role(engine: Engine, url: str) -> str:
    with engine.connect() as conn:
        inspector = inspect(conn)
        found = [role for role, table in ROLES.items() if inspector.has_table(table.name)]
    if len(found) != 1:
        raise DatabaseError(f"{masked_url(url)}: not a {TRADE_DB} (no mediating agent, "
                            "account manager, merchant account manager or merchant tables)")
    return found[0]


def check_trade_db(url: str) -> str:
    """The party whose database ``url`` is; DatabaseError if it is none (read only)."""
    engine = open_existing(url, (), TRADE_DB)
    try:
        return _role(engine, url)
    finally:
        engine.dispose()


@contextmanager
def _opened(urls: tuple[str, ...]) -> Iterator[dict[str, list[Engine]]]:
    by_role: dict[str, list[Engine]] = {role: [] for role in ROLES}
    with ExitStack() as stack:
        for url in urls:
            engine = open_existing(url, (), TRADE_DB)
            stack.callback(engine.dispose)
            by_role[_role(engine, url)].append(engine)
        yield by_role


def audit_trade(trade_dbs: tuple[str, ...]) -> TradeBooks:
    """The trading sessions' books (see the module text); empty when ``trade_dbs`` is."""
    out = TradeBooks()
    if not trade_dbs:
        return out
    with _opened(trade_dbs) as by_role:
        if not by_role["acquirer"]:
            out.discrepancies.append("trade: the audit needs the mediating agents' databases "
                                     "(--trade-db, one per operator)")
            return out
        b = records.books(by_role["acquirer"], by_role["account-manager"],
                          by_role["merchant-account"])
        for engine in by_role["acquirer"]:
            with engine.connect() as conn:
                out.read += int(conn.execute(select(func.count()).select_from(
                    D.acq_sessions)).scalar_one())
    out.discrepancies += [f"trade: {p}" for p in b.problems]
    for code, minor in sorted(b.withdrawals.items()):
        out.figures[f"trade withdrawals {code}"] = minor
    for code, minor in sorted(b.deposits.items()):
        out.figures[f"trade paid to merchants {code}"] = minor
    for code, minor in sorted(b.held.items()):
        out.figures[f"trade deposits held {code}"] = minor
    for code, accounts in sorted(b.acquirer.items()):
        out.checks.append({"name": f"trade postings {code} sum to 0",
                           "left": sum(accounts.values()), "right": 0,
                           "ok": not sum(accounts.values())})
    return out
