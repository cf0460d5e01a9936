"""The trading-session part of ``svcard demo`` (seed 004): a customer's account manager
reserves a deposit in euros and hands it to the mediating trusted agent, which converts it at
its bank's rate into the merchant's yen and tells the merchant; the customer then buys a few
items inside the deposit with PayWord links (a hash per purchase, no round trip to anyone but
the merchant), and closes the session: both sides' records (their purchase lists sealed) are
compared by the mediating agent, which clears the session: the merchant paid, the customer's
withdrawal, the rest of the deposit returned."""

from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx

from ..trade import customer as C
from ..trade.money import Amount
from ..trade.stack import start_trade
from .system import ask_to_stop

PURCHASES = (("song", 3), ("article", 1), ("map", 5))   # item, PayWord links (10 JPY each)


def run_trade(folder: Path, deposit: int = 5_00) -> tuple[list[str], dict[str, Any]]:
    """Open a session of ``deposit`` euro cents, buy :data:`PURCHASES`, close it: the story's
    lines and data."""
    lines: list[str] = []
    with httpx.Client(timeout=30) as http:
        return lines, _trade(folder, lines, http, deposit)


def _trade(folder: Path, lines: list[str], http: httpx.Client, deposit: int) -> dict[str, Any]:
    started = time.perf_counter()
    stack = start_trade(folder)
    try:
        alice = stack.customer("alice", 50_00, "EUR")
        session = stack.open(http, alice, deposit, unit=10)
        opened_ms = (time.perf_counter() - started) * 1000
        lines.append(
            f"TRADING SESSION (seed 004): account manager {stack.am.url}, mediating agent "
            f"{stack.url('acq1')}, merchant agent 'shop' {stack.url('shop')}: session "
            f"{session.session} opened for a pseudonym ({session.pseudonym}), deposit "
            f"{Amount(session.deposit, session.currency)} reserved and converted to "
            f"{Amount(session.deposit_merchant, session.currency_merchant)} at the bank's rate "
            f"(1 {session.currency} = {float(Fraction(session.rate)):.4f} "
            f"{session.currency_merchant}, fixed for the session); a PayWord chain of "
            f"{session.length} links of "
            f"{Amount(session.unit, session.currency_merchant)}; {opened_ms:.0f} ms")
        bought = []
        for item, units in PURCHASES:
            answer = C.buy(http, session, item, units)
            bought.append({"item": item, **answer})
        lines.append(
            "  purchases, each a hash chain link checked by the merchant alone: " + ", ".join(
                f"{b['item']} {Amount(b['amount'], b['currency'])}" for b in bought)
            + f"; {Amount(bought[-1]['left'], session.currency_merchant)} left")
        closed = C.close(http, session)
        clearing = closed.get("clearing") or {}
        if clearing:
            lines.append(
                f"  closed: both records {clearing['outcome']} at the mediating agent (it saw "
                f"only the lists' hashes); merchant paid "
                f"{Amount(clearing['paid'], clearing['currency_merchant'])}, customer "
                f"withdrawal {Amount(clearing['withdrawal'], clearing['currency_customer'])}, "
                f"returned {Amount(clearing['returned'], clearing['currency_customer'])}, "
                f"rounding {Amount(clearing['rounding'], clearing['currency_customer'])}")
        else:
            lines.append(f"  closed: the mediating agent took the record ({closed.get('taken')});"
                         " it clears once the merchant's record is in")
        return {"session": session.session, "pseudonym": session.pseudonym,
                "deposit": session.deposit, "currency": session.currency,
                "deposit_merchant": session.deposit_merchant,
                "currency_merchant": session.currency_merchant, "rate": session.rate,
                "unit": session.unit, "length": session.length, "purchases": bought,
                "closed": closed, "ms": round((time.perf_counter() - started) * 1000, 1)}
    finally:
        ask_to_stop(p.thread for p in stack.parties.values())
        stack.close()
