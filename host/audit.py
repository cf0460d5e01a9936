"""``svcard audit``: proves money is conserved across cards, servers, clearing and banks.

Figures (integer minor units): card balances (read through readers, EP purse); proven purchases
(payments the card's MAC2 confirmed, with its TAC) split into settled (cleared by clearing) and
unsettled; loads the load server decided "loaded"; loads whose funds clearing moved to the
issuer's float; the float's ledger balance; bank loads by state. Checks:

1. card balances + unsettled purchases + merchants' settled funds = opening balances + loads;
2. the issuer's float (+ loaded funds not yet moved, + opening balances) = card balances +
   unsettled purchases;
3. bank accounts debited (confirmed loads) = loads confirmed by the load server, load by load;
   a bank load still waiting for its confirmation is listed;
4. with no opening balances, each card's balance = its loads - its purchases.

Every difference is listed as a discrepancy; the audit is clean only if there are none.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from svcard.host import apdus
from svcard.host.bankdb import BankDb
from svcard.host.bankdb import make_engine as make_bank_engine
from svcard.host.clearing import cleared_keys, ledger_balances, records
from svcard.host.clearing import make_engine as make_clearing_engine
from svcard.host.loaddb import LoadDb
from svcard.host.loaddb import make_engine as make_load_engine
from svcard.host.paydb import make_engine as make_pay_engine
from svcard.host.paydb import payments
from svcard.host.terminal import call, select_purse
from svcard.protocols import purse as P
from svcard.reader import Reader


@dataclass
class AuditReport:
    figures: dict[str, int]
    checks: list[dict[str, Any]]
    discrepancies: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.discrepancies

    def to_json(self) -> dict[str, Any]:
        return {"clean": self.clean, "figures": self.figures, "checks": self.checks,
                "discrepancies": self.discrepancies}

    def text(self) -> str:
        lines = ["figures (minor units):"]
        lines += [f"  {k:<28} {v:>14}" for k, v in self.figures.items()]
        lines.append("checks:")
        lines += [f"  [{'ok' if c['ok'] else 'FAIL'}] {c['name']}: {c['left']} vs {c['right']}"
                  for c in self.checks]
        if self.discrepancies:
            lines.append(f"{len(self.discrepancies)} discrepancies:")
            lines += [f"  - {d}" for d in self.discrepancies]
        else:
            lines.append("clean: every unit of money is accounted for")
        return "\n".join(lines)


def card_balances(readers: list[Reader]) -> dict[str, int]:
    """Card serial (lower-case hex) -> EP balance, read through each reader."""
    out = {}
    for reader in readers:
        info = select_purse(reader)
        out[info.app_serial.lower()] = int.from_bytes(
            call(reader, apdus.get_balance(P.PURSE_EP), "GET BALANCE"), "big")
    return out


def audit(cards: dict[str, int], *, payment_dbs: tuple[str, ...] = (),
          load_dbs: tuple[str, ...] = (), bank_dbs: tuple[str, ...] = (),
          clearing_db: str | None = None, opening: int = 0) -> AuditReport:
    bad: list[str] = []
    # proven purchases: (8-byte card serial, card counter) -> (amount, full serial)
    proven: dict[tuple[str, int], tuple[int, str]] = {}
    for url in payment_dbs:
        with make_pay_engine(url).connect() as conn:
            for r in conn.execute(select(payments).where(
                    payments.c.state == "confirmed", payments.c.tac.is_not(None),
                    payments.c.amount > 0)):
                key = (r.card_serial[-16:].lower(), int(r.card_counter))
                if key in proven:
                    bad.append(f"purchase of card {r.card_serial} counter {r.card_counter} "
                               "confirmed twice")
                proven[key] = (int(r.amount), r.card_serial.lower())
    settled_keys: set[tuple[str, int]] = set()
    settled = 0
    ledger: dict[str, int] = {}
    if clearing_db:
        engine = make_clearing_engine(clearing_db)
        settled_keys = cleared_keys(engine)
        ledger = ledger_balances(engine)
        with engine.connect() as conn:
            for r in conn.execute(select(records.c.card_serial, records.c.card_counter,
                                         records.c.amount)):
                settled += int(r.amount)
                if (r.card_serial, r.card_counter) not in proven:
                    bad.append(f"cleared purchase of card {r.card_serial} counter "
                               f"{r.card_counter} has no confirmed payment")
    unsettled = sum(a for k, (a, _) in proven.items() if k not in settled_keys)
    loaded_rows: list[dict[str, Any]] = []
    for url in load_dbs:
        loaded_rows += LoadDb(make_load_engine(url)).rows()
    loaded = sum(int(r["amount"]) for r in loaded_rows if r["state"] == "loaded")
    moved_total = -sum(v for k, v in ledger.items() if k.startswith("bank:"))
    float_balance = sum(v for k, v in ledger.items() if k.startswith("float:"))
    merchants_paid = sum(v for k, v in ledger.items() if k.startswith("merchant:"))
    cards_total = sum(cards.values())
    figures = {"card balances": cards_total, "opening balances": opening,
               "loads confirmed": loaded, "purchases proven": sum(a for a, _ in
                                                                proven.values()),
               "purchases settled": settled, "purchases unsettled": unsettled,
               "merchants paid (ledger)": merchants_paid, "float (ledger)": float_balance,
               "loads moved to float": moved_total,
               "loads not yet moved": loaded - moved_total}
    checks = [
        _check("cards + unsettled + settled = opening + loads",
               cards_total + unsettled + settled, opening + loaded),
        _check("float + unmoved loads + opening = cards + unsettled",
               float_balance + (loaded - moved_total) + opening, cards_total + unsettled),
        _check("merchants paid (ledger) = purchases settled", merchants_paid, settled),
    ]
    if bank_dbs:
        by_txn = {r["txn_id"]: r for r in loaded_rows}
        debited = 0
        for url in bank_dbs:
            for b in BankDb(make_bank_engine(url)).loads():
                row = by_txn.get(b["txn_id"])
                state = row["state"] if row else None
                if b["state"] == "confirmed":
                    debited += int(b["amount"])
                    if state != "loaded":
                        bad.append(f"bank load {b['txn_id']} kept the debit but the load "
                                   f"server says {state or 'nothing'}")
                elif b["state"] == "refunded" and state == "loaded":
                    bad.append(f"bank load {b['txn_id']} was refunded but the card was loaded")
                elif b["state"] == "debited":
                    bad.append(f"bank load {b['txn_id']} ({b['amount']}) awaits its "
                               f"confirmation (load server: {state or 'nothing'})")
        figures["bank accounts debited"] = debited
        checks.append(_check("bank accounts debited = loads confirmed", debited, loaded))
    if opening == 0:
        expected: dict[str, int] = defaultdict(int)
        for load in loaded_rows:
            if load["state"] == "loaded":
                expected[load["card_serial"].lower()] += int(load["amount"])
        for amount, serial in proven.values():
            expected[serial] -= amount
        for serial, balance in sorted(cards.items()):
            if balance != expected.get(serial, 0):
                bad.append(f"card {serial.upper()}: balance {balance}, but loads - purchases "
                           f"= {expected.get(serial, 0)}")
    bad += [f"check failed: {c['name']} ({c['left']} != {c['right']})"
            for c in checks if not c["ok"]]
    return AuditReport(figures, checks, bad)


def _check(name: str, left: int, right: int) -> dict[str, Any]:
    return {"name": name, "left": left, "right": right, "ok": left == right}
