"""Read-only views of the trading-session books, for the audit (nothing here writes).

:func:`books` adds up, per currency, what the parties' databases say: the customers' side (the
withdrawals of cleared sessions and the deposits still held for open ones, from the
account managers), the merchants' side (the deposit records at the merchant account
managers), the mediating agents' rounding and exchange accounts and the deposits they still
hold. :func:`audit` checks that they close exactly:

* each mediating agent's postings sum to zero in each currency;
* every cleared session's deposit account is empty, and its clearing information was turned
  into exactly one withdrawal record (amount = ``withdrawal``) and one deposit record
  (amount = ``paid``) once both receipts came, each row holding exactly the signed clearing
  it was made from (its text, signature, amounts, outcome; the session's own customer);
* what the mediating agent booked to each account manager and merchant equals the records
  those account managers hold, per currency;
* each customer's ``reserved`` is the sum of the deposits of its sessions not yet ended;
* each purse-funded deposit is tied to the session of its own initiation, and the rest due
  back to its card is what that session's clearing returned (all of it if it never opened);
* per account and currency, each line naming both: each mediating agent's own postings sum to
  zero (each operator's books close), its ``rounding`` account holds exactly the leftovers its
  conversions left (at initiation and at clearing), and, once every clearing is delivered,
  each merchant (``merchant:ID``) was paid what its deposit records say and each customer
  what its withdrawal records and open deposits say.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, inspect, select

from ..kit.db import DatabaseError, masked_url, open_existing
from . import db as D


def _rows(engine: Engine, table: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(table)).all()]


@dataclass
class Books:
    """Per currency: account -> balance in minor units, from every database given."""

    acquirer: dict[str, dict[str, int]] = field(default_factory=dict)
    withdrawals: dict[str, int] = field(default_factory=dict)    # charged to customers
    deposits: dict[str, int] = field(default_factory=dict)       # paid to merchants
    held: dict[str, int] = field(default_factory=dict)           # open sessions' deposits
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems


def _name(engine: Engine) -> str:
    """A database's name for a finding: its file's stem (SQLite) or its database name."""
    return Path(str(engine.url.database or "?")).stem


def _own_books(engine: Engine, postings: list[dict[str, Any]],
               cleared: list[dict[str, Any]], out: Books) -> None:
    """One mediating agent (one operator): its postings sum to zero per currency, and its
    rounding account holds what its conversions left, per currency."""
    name = _name(engine)
    total: dict[str, int] = defaultdict(int)
    booked: dict[str, int] = defaultdict(int)
    for p in postings:
        total[p["currency"]] += p["minor"]
        if p["account"] == "rounding":
            booked[p["currency"]] += p["minor"]
    left: dict[str, int] = defaultdict(int)
    for s in _rows(engine, D.acq_sessions):
        if s["state"] != D.REFUSED:          # a refusal reversed the deposit's postings
            left[s["currency_customer"]] += s["rounding"]
    for c in cleared:
        left[c["currency_merchant"]] += c["rounding"]
    for code in sorted(set(total) | set(booked) | set(left)):
        if total.get(code, 0):
            out.problems.append(f"{name} {code}: its postings sum to {total[code]}, not 0")
        if booked.get(code, 0) != left.get(code, 0):
            out.problems.append(f"{name} account rounding {code}: {booked.get(code, 0)} "
                                f"booked; its conversions left {left.get(code, 0)}")


def books(acquirers: list[Engine], account_managers: list[Engine],
          merchant_accounts: list[Engine]) -> Books:
    out = Books()
    acq: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    per_session: dict[tuple[str, str], int] = defaultdict(int)
    taken: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))  # session: am:*
    paid_to: dict[tuple[str, str], int] = defaultdict(int)       # (merchant, currency)
    clearings: dict[str, dict[str, Any]] = {}
    for engine in acquirers:
        postings = _rows(engine, D.acq_postings)
        for p in postings:
            acq[p["currency"]][p["account"]] += p["minor"]
            if p["account"].startswith("deposit:"):
                per_session[(p["session"], p["currency"])] += p["minor"]
            elif p["account"].startswith("am:"):
                taken[p["session"]][p["currency"]] -= p["minor"]
            elif p["account"].startswith("merchant:"):
                paid_to[(p["account"].split(":", 1)[1], p["currency"])] += p["minor"]
        cleared = [{**c, **json.loads(c["info"])} for c in _rows(engine, D.acq_clearings)]
        for c in cleared:
            clearings[c["session"]] = c
        _own_books(engine, postings, cleared, out)
    out.acquirer = {code: dict(accounts) for code, accounts in acq.items()}
    for code, accounts in acq.items():
        if sum(accounts.values()):
            out.problems.append(f"{code}: the mediating agents' postings sum to "
                                f"{sum(accounts.values())}, not 0")
    for (session, code), minor in per_session.items():
        if session in clearings and minor:
            out.problems.append(f"{session}: cleared but {minor} {code} still in its deposit")
    withdrawals: dict[str, int] = defaultdict(int)
    held: dict[str, int] = defaultdict(int)
    seen: set[str] = set()
    customers: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])  # took, charged
    for engine in account_managers:
        sessions = _rows(engine, D.am_sessions)
        for s in sessions:
            if s["session"] in taken:
                customers[(s["customer"], s["currency"])][0] += taken[s["session"]].get(
                    s["currency"], 0)
            if s["state"] == D.OPEN:
                customers[(s["customer"], s["currency"])][1] += s["deposit"]
        owners = {s["session"]: s["customer"] for s in sessions}
        for w in _rows(engine, D.am_withdrawals):
            seen.add(w["session"])
            withdrawals[w["currency"]] += w["amount"]
            customers[(w["customer"], w["currency"])][1] += w["amount"]
            cw = clearings.get(w["session"])
            owner = owners.get(w["session"])
            if cw is None or (cw["deposit_customer"], cw["returned"], cw["withdrawal"],
                              cw["currency_customer"], cw["outcome"], cw["info"],
                              cw["signature"], owner) != (
                    w["deposit"], w["returned"], w["amount"], w["currency"], w["outcome"],
                    w["info"], w["signature"], w["customer"]):
                out.problems.append(f"{w['session']}: a withdrawal record the clearing does "
                                    "not match")
        _purse(engine, sessions, out)
        reserved: dict[str, int] = defaultdict(int)
        for s in sessions:
            if s["state"] in D.RESERVING:
                reserved[s["customer"]] += s["deposit"]
                if s["state"] == D.OPEN:
                    held[s["currency"]] += s["deposit"]
        for cu in _rows(engine, D.am_customers):
            if cu["reserved"] != reserved.get(cu["id"], 0):
                out.problems.append(f"customer {cu['id']}: reserved {cu['reserved']}, its "
                                    f"open sessions hold {reserved.get(cu['id'], 0)}")
    deposits: dict[str, int] = defaultdict(int)
    paid: set[str] = set()
    merchants: dict[tuple[str, str], int] = defaultdict(int)
    for engine in merchant_accounts:
        for d in _rows(engine, D.mam_deposits):
            paid.add(d["session"])
            deposits[d["currency"]] += d["amount"]
            merchants[(d["merchant"], d["currency"])] += d["amount"]
            cd = clearings.get(d["session"])
            if cd is None or (cd["merchant"], cd["acquirer"], cd["paid"],
                              cd["currency_merchant"], cd["outcome"], cd["info"],
                              cd["signature"]) != (
                    d["merchant"], d["acquirer"], d["amount"], d["currency"], d["outcome"],
                    d["info"], d["signature"]):
                out.problems.append(f"{d['session']}: a deposit record the clearing does not "
                                    "match")
    for session, c in clearings.items():
        if c["am_done"] and session not in seen:
            out.problems.append(f"{session}: acknowledged but no withdrawal record")
        if c["mam_done"] and session not in paid:
            out.problems.append(f"{session}: acknowledged but no deposit record")
    out.withdrawals, out.deposits, out.held = dict(withdrawals), dict(deposits), dict(held)
    if account_managers and merchant_accounts and all(
            c["am_done"] and c["mam_done"] for c in clearings.values()):
        _close(out, acq)
        for (merchant, code) in sorted(set(paid_to) | set(merchants)):
            if paid_to.get((merchant, code), 0) != merchants.get((merchant, code), 0):
                out.problems.append(f"account merchant:{merchant} {code}: the agents paid "
                                    f"{paid_to.get((merchant, code), 0)}; its deposit records "
                                    f"say {merchants.get((merchant, code), 0)}")
        for (customer, code), (took, charged) in sorted(customers.items()):
            if took != charged:
                out.problems.append(f"account customer:{customer} {code}: the agents took "
                                    f"{took}; its withdrawals + open deposits are {charged}")
    return out


def _purse(engine: Engine, sessions: list[dict[str, Any]], out: Books) -> None:
    """Each purse-funded deposit (``trade_am_purse``): an open order is tied to the session of
    its own initiation (customer, txn, digest, deposit), and the rest due back to its card is
    what that session's clearing returned (0 before it), the whole payment when the session
    never opened, 0 while unpaid or in doubt."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(D.am_purse.name):
            return
    by_id = {s["session"]: s for s in sessions}
    returned = {w["session"]: w["returned"] for w in _rows(engine, D.am_withdrawals)}
    for p in _rows(engine, D.am_purse):
        name = f"purse order {p['order_id']} ({p['currency']})"
        if p["state"] == "open" or (p["state"] == "paid" and p["session"]):
            s = by_id.get(p["session"] or "")     # paid: linked by a clearing before it opened
            if s is None or (s["customer"], s["txn"], s["digest"], s["deposit"],
                             s["currency"]) != (p["customer"], p["txn"], p["digest"],
                                                p["amount"], p["currency"]):
                out.problems.append(f"{name}: not the session its card paid for "
                                    f"({p['session']})")
                continue
            due = returned.get(p["session"], 0)
        else:
            due = p["amount"] if p["state"] == "refused" else 0
        if p["rest"] != due or (p["load_state"] == "none") != (due == 0):
            out.problems.append(f"{name}: {p['rest']} due back to the card "
                                f"({p['load_state']}); its clearing says {due}")


def _close(out: Books, acq: dict[str, dict[str, int]]) -> None:
    """With every clearing delivered: what the agents booked to account managers and
    merchants is what those hold, per currency."""
    for code, accounts in acq.items():
        booked_am = -sum(v for a, v in accounts.items() if a.startswith("am:"))
        booked_m = sum(v for a, v in accounts.items() if a.startswith("merchant:"))
        am_side = out.withdrawals.get(code, 0) + out.held.get(code, 0)
        if booked_am != am_side:
            out.problems.append(f"{code}: the agents took {booked_am} from account managers; "
                                f"withdrawals + open deposits are {am_side}")
        if booked_m != out.deposits.get(code, 0):
            out.problems.append(f"{code}: the agents paid merchants {booked_m}; deposit "
                                f"records say {out.deposits.get(code, 0)}")


def clearings(engine: Engine) -> list[dict[str, Any]]:
    """A mediating agent's clearings, each with its clearing information unpacked."""
    return [{**c, **json.loads(c["info"])} for c in _rows(engine, D.acq_clearings)]


def rounding(engine: Engine) -> dict[str, int]:
    """A mediating agent's rounding account, per currency."""
    out: dict[str, int] = defaultdict(int)
    for p in _rows(engine, D.acq_postings):
        if p["account"] == "rounding":
            out[p["currency"]] += p["minor"]
    return dict(out)


# --- the trading sessions' part of ``svcard audit`` (host/settle/audit.py) ---------------
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
        b = books(by_role["acquirer"], by_role["account-manager"],
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
