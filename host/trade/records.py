"""Read-only views of the trading-session books, for the audit (nothing here writes).

:func:`books` adds up, per currency, what the parties' databases say: the customers' side (the
withdrawals of cleared sessions and the deposits still held for open ones, from the
account managers), the merchants' side (the deposit records at the merchant account
managers), the mediating agents' rounding and exchange accounts and the deposits they still
hold. :func:`audit` checks that they close exactly:

* each mediating agent's postings sum to zero in each currency;
* every cleared session's deposit account is empty, and its clearing information was turned
  into exactly one withdrawal record (amount = ``withdrawal``) and one deposit record
  (amount = ``paid``) once both receipts came;
* what the mediating agent booked to each account manager and merchant equals the records
  those account managers hold, per currency;
* each customer's ``reserved`` is the sum of the deposits of its sessions not yet ended.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select

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


def books(acquirers: list[Engine], account_managers: list[Engine],
          merchant_accounts: list[Engine]) -> Books:
    out = Books()
    acq: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    per_session: dict[tuple[str, str], int] = defaultdict(int)
    clearings: dict[str, dict[str, Any]] = {}
    for engine in acquirers:
        for p in _rows(engine, D.acq_postings):
            acq[p["currency"]][p["account"]] += p["minor"]
            if p["account"].startswith("deposit:"):
                per_session[(p["session"], p["currency"])] += p["minor"]
        for c in _rows(engine, D.acq_clearings):
            clearings[c["session"]] = {**c, **json.loads(c["info"])}
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
    for engine in account_managers:
        sessions = _rows(engine, D.am_sessions)
        for w in _rows(engine, D.am_withdrawals):
            seen.add(w["session"])
            withdrawals[w["currency"]] += w["amount"]
            cw = clearings.get(w["session"])
            if cw is None or cw["withdrawal"] != w["amount"] or \
                    cw["currency_customer"] != w["currency"]:
                out.problems.append(f"{w['session']}: a withdrawal record the clearing does "
                                    "not match")
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
    for engine in merchant_accounts:
        for d in _rows(engine, D.mam_deposits):
            paid.add(d["session"])
            deposits[d["currency"]] += d["amount"]
            cd = clearings.get(d["session"])
            if cd is None or cd["paid"] != d["amount"] or \
                    cd["currency_merchant"] != d["currency"]:
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
    return out


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
