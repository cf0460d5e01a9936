"""``svcard audit``: proves money is conserved across cards, servers, clearing and banks.

Figures (integer minor units; whole points with ``unit="points"``, the audit of one loyalty
programme, whose text then says points): card balances (read through readers, EP purse); proven
purchases (payments the card's MAC2 confirmed, with its TAC) split into settled (cleared by
clearing) and unsettled; loads the load server decided "loaded"; loads whose funds clearing
moved to the issuer's float; the float's ledger balance; bank loads by state. Checks:

1. card balances + unsettled purchases + merchants' settled funds = opening balances + loads;
2. the issuer's float (+ loaded funds not yet moved, + opening balances) = card balances +
   unsettled purchases;
3. bank accounts debited (confirmed loads) = loads confirmed by the load server, load by load;
   a bank load still waiting for its confirmation is listed;
4. with no opening balances, each card's balance = its loads - its purchases;
5. every confirmed payment has its PSAM record: cleared, or held by clearing, or in a batch
   not yet cleared, or still in its PSAM's open batch (read from the PSAM when given). One in
   a batch clearing received but absent from it, or whose record clearing refused, is a
   finding; one not yet handed (or handed but not cleared) is listed, and a finding past the
   maximum age (default 7 days);
6. records clearing holds (no card TAC yet), with their age and what the payment database
   says of them; one older than the maximum age is a finding;
7. open loads (S2 issued, outcome not proven), with their age; older than the maximum age is
   a finding;
8. every bank refund has a load the load server decided ``not_loaded`` on named evidence
   (``no-s2``, ``probe``, ``counter-used:<txn>`` whose load is ``loaded`` on the same card);
9. with service provider databases (``sp_dbs``), the SP's three-way closing per currency
   (:mod:`.sp_books`): purse debits = what merchants received, bill lines = payments made +
   fees - discounts, loads = purse debits + balances; its open items listed;
10. with the goods parties' databases (``goods_dbs``, seed 000; :mod:`.goods_books`): bank
   debits = goods paid, every good written or refunded (never both), refunds = bank credits,
   no good twice (also on the cards read, ``card_goods``); goods on their way listed.
11. with the trading-session parties' databases (``trade_dbs``, seed 004; its records module's
   ``audit_trade``): each mediating agent's postings sum to zero and its rounding account holds its
   conversions' leftovers, per currency; each customer and merchant got, per currency, what
   the agents booked to them; every withdrawal and deposit record matches its clearing.

Every difference is listed as a discrepancy; the audit is clean only if there are none, and
only if it read something: an audit of no card and no record at all is not clean (a mistyped
path must never read as "clean"). The lists (held records, open loads, payments not yet
handed) are printed even when clean: a clean audit hides nothing.

Every database is only read, and none is created: each is opened read-only
(:func:`svcard.host.kit.db.open_existing`; see :mod:`.sources`), and :func:`check_sources`
refuses one that does not exist before anything is read.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import select

from ..kit.db import now_ms
from ..load import records as load_records
from ..pay import records as pay_records
from ..trade import records as trade_records
from . import sources
from .db import batches, cleared_keys, ledger_balances, records, uncleared
from .goods_books import audit_goods
from .sources import card_balances, check_sources, clearing_engine, psam_open_batches
from .sp_books import audit_sp

__all__ = ["AuditReport", "audit", "card_balances", "check_sources", "psam_open_batches"]

Unit = Literal["money", "points"]
DAY_MS = 24 * 3600 * 1000
DEFAULT_MAX_AGE_MS = 7 * DAY_MS
NOTHING = ("nothing to audit: no card was read and the databases hold no payment, load, bank "
           "load or cleared record")


@dataclass
class AuditReport:
    figures: dict[str, int]
    checks: list[dict[str, Any]]
    discrepancies: list[str] = field(default_factory=list)
    held: list[dict[str, Any]] = field(default_factory=list)
    open_loads: list[dict[str, Any]] = field(default_factory=list)
    unhanded: list[dict[str, Any]] = field(default_factory=list)
    audited: int = 1   # cards, payments, loads, bank loads and cleared records read
    sp_pending: list[dict[str, Any]] = field(default_factory=list)
    unit: Unit = "money"   # "points": a loyalty programme's audit (whole points, no currency)
    goods_pending: list[dict[str, Any]] = field(default_factory=list)

    @property
    def nothing_audited(self) -> bool:
        return self.audited == 0

    @property
    def clean(self) -> bool:
        return not self.discrepancies and not self.nothing_audited

    def to_json(self) -> dict[str, Any]:
        return {"clean": self.clean, "nothing_audited": self.nothing_audited,
                "figures": self.figures, "checks": self.checks,
                "discrepancies": self.discrepancies, "held_records": self.held,
                "open_loads": self.open_loads, "payments_not_cleared": self.unhanded,
                "sp_pending": self.sp_pending, "unit": self.unit,
                "goods_pending": self.goods_pending}

    def text(self) -> str:
        points = self.unit == "points"
        lines = [f"figures ({'points' if points else 'minor units'}):"]
        lines += [f"  {k:<28} {v:>14}" for k, v in self.figures.items()]
        lines.append("checks:")
        lines += [f"  [{'ok' if c['ok'] else 'FAIL'}] {c['name']}: {c['left']} vs {c['right']}"
                  for c in self.checks]
        for title, items in (("records held by clearing", self.held),
                             ("open loads", self.open_loads),
                             ("confirmed payments not yet cleared", self.unhanded),
                             *([("SP items still open", self.sp_pending)] if self.sp_pending
                               else []),
                             *([("goods on their way", self.goods_pending)]
                               if self.goods_pending else [])):
            lines.append(f"{title}: {len(items) or 'none'}")
            lines += [f"  - {item['text']}" for item in items[:1000]]
            if len(items) > 1000:
                lines.append(f"  ... and {len(items) - 1000} more")
        if self.discrepancies:
            lines.append(f"{len(self.discrepancies)} discrepancies:")
            lines += [f"  - {d}" for d in self.discrepancies]
        elif self.nothing_audited:
            lines.append(NOTHING)
        else:
            lines.append("clean: every point is accounted for" if points
                         else "clean: every unit of money is accounted for")
        return "\n".join(lines)


def _age(now: int, stamp: int | None) -> int:
    return max(0, now - int(stamp or now))


def _days(ms: int) -> str:
    return f"{ms / DAY_MS:.1f} days" if ms >= DAY_MS else f"{ms / 3_600_000:.1f} h"


def audit(cards: dict[str, int], *, payment_dbs: tuple[str, ...] = (),
          load_dbs: tuple[str, ...] = (), bank_dbs: tuple[str, ...] = (),
          clearing_db: str | None = None, opening: int = 0,
          max_age_ms: int = DEFAULT_MAX_AGE_MS, now: int | None = None,
          open_batches: dict[str, set[int]] | None = None,
          sp_dbs: tuple[str, ...] = (), unit: Unit = "money", goods_dbs: tuple[str, ...] = (),
          card_goods: dict[str, list[bytes]] | None = None,
          trade_dbs: tuple[str, ...] = ()) -> AuditReport:
    """``unit``: ``"points"`` when the cards, payments and loads are a loyalty programme's
    (one programme per audit: its figures are points, never summed with money).
    ``open_batches``: what :func:`psam_open_batches` read from the payment servers' PSAMs
    (optional: without it a confirmed payment not yet handed is a finding only past
    ``max_age_ms``). ``now``: the audit's clock in ms (default: now)."""
    now = now_ms() if now is None else now
    bad: list[str] = []
    # proven purchases (with the goods purse's): (8-byte card serial, counter) -> (amount, serial)
    proven: dict[tuple[str, int], tuple[int, str]] = sources.purse_debits(
        goods_dbs if cards or payment_dbs or load_dbs or clearing_db else ())   # purse money
    # every payment that reached a PSAM: (PSAM serial, TTN) -> row; the confirmed ones
    by_psam_ttn: dict[tuple[str, int], dict[str, Any]] = {}
    confirmed: list[dict[str, Any]] = []
    read = len(cards)  # what the audit read: cards and rows
    for url in payment_dbs:
        for r in pay_records.payments(url):
            read += 1
            if r["psam_id"] and r["ttn"] is not None:
                by_psam_ttn[(r["psam_id"].upper(), int(r["ttn"]))] = r
            if r["state"] != "confirmed" or r["tac"] is None or r["amount"] <= 0:
                continue
            confirmed.append(r)
            key = (r["card_serial"][-16:].lower(), int(r["card_counter"]))
            if key in proven:
                bad.append(f"purchase of card {r['card_serial']} counter "
                           f"{r['card_counter']} confirmed twice")
            proven[key] = (int(r["amount"]), r["card_serial"].lower())
    settled_keys: set[tuple[str, int]] = set()
    settled = 0
    ledger: dict[str, int] = {}
    held: list[dict[str, Any]] = []
    unhanded: list[dict[str, Any]] = []
    received: dict[tuple[str, int], tuple[str, str]] = {}  # -> (state, reason)
    handed_batches: set[tuple[str, int]] = set()
    # a clearing database not made yet (no run so far) is read as empty: nothing cleared
    engine = clearing_engine(clearing_db) if clearing_db else None
    if engine is not None:
        try:
            settled_keys = cleared_keys(engine)
            ledger = ledger_balances(engine)
            with engine.connect() as conn:
                for c in conn.execute(select(records.c.card_serial, records.c.card_counter,
                                             records.c.amount, records.c.psam_id, records.c.ttn)):
                    settled += int(c.amount)
                    read += 1
                    if (c.card_serial, c.card_counter) not in proven:
                        bad.append(f"cleared purchase of card {c.card_serial} counter "
                                   f"{c.card_counter} has no confirmed payment")
                    if c.psam_id:
                        received[(c.psam_id.upper(), int(c.ttn))] = ("cleared", "")
                for u in conn.execute(select(uncleared).order_by(uncleared.c.id)):
                    key = (u.psam_id.upper(), int(u.ttn))
                    read += 1
                    if u.state != "cleared":
                        received.setdefault(key, (u.state, u.reason))
                    if u.state == "held":
                        held.append(_held_item(u, by_psam_ttn.get(key) if payment_dbs else None,
                                               now, max_age_ms, bad))
                handed_batches = {(b.psam_id.upper(), int(b.batch_number)) for b in conn.execute(
                    select(batches.c.psam_id, batches.c.batch_number))}
        finally:
            engine.dispose()
    if clearing_db:
        for r in confirmed:
            item = _check_handed(r, settled_keys, received, handed_batches, open_batches,
                                 now, max_age_ms, bad)
            if item is not None:
                unhanded.append(item)
    unsettled = sum(a for k, (a, _) in proven.items() if k not in settled_keys)
    loaded_rows: list[dict[str, Any]] = []
    for url in load_dbs:
        loaded_rows += load_records.loads(url)
    read += len(loaded_rows)
    open_loads = []
    for load in loaded_rows:
        if load["state"] != "authorized":
            continue
        age = _age(now, load["created"])
        text = (f"load {load['txn_id']} of bank {load['bank_id']}: {load['amount']} to card "
                f"{load['card_serial'].upper()} (counter {load['online_counter']}), S2 issued, "
                f"outcome not proven, open for {_days(age)}")
        open_loads.append({"txn_id": load["txn_id"], "bank_id": load["bank_id"],
                           "amount": int(load["amount"]), "age_ms": age, "text": text})
        if age > max_age_ms:
            bad.append(f"{text}: older than the maximum age ({_days(max_age_ms)})")
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
            for b in load_records.bank_loads(url):
                read += 1
                row = by_txn.get(b["txn_id"])
                state = row["state"] if row else None
                if b["state"] == "confirmed":
                    debited += int(b["amount"])
                    if state != "loaded":
                        bad.append(f"bank load {b['txn_id']} kept the debit but the load "
                                   f"server says {state or 'nothing'}")
                elif b["state"] == "refunded":
                    problem = _refund_problem(row, by_txn)
                    if problem:
                        bad.append(f"bank load {b['txn_id']} ({b['amount']}) was refunded "
                                   f"{problem}")
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
    sp = audit_sp(sp_dbs, clearing_db=clearing_db, payment_dbs=payment_dbs,
                  load_dbs=load_dbs, cards=cards)
    figures.update(sp.figures)
    goods = audit_goods(goods_dbs, now=now, max_age_ms=max_age_ms, card_goods=card_goods)
    figures.update(goods.figures)
    trade = trade_records.audit_trade(trade_dbs)
    figures.update(trade.figures)
    return AuditReport(figures, checks + sp.checks + goods.checks + trade.checks,
                       bad + sp.discrepancies + goods.discrepancies + trade.discrepancies,
                       held, open_loads, unhanded,
                       audited=read + sp.read + goods.read + trade.read, sp_pending=sp.pending,
                       unit=unit, goods_pending=goods.pending)


def _held_item(r: Any, payment: dict[str, Any] | None, now: int, max_age_ms: int,
               bad: list[str]) -> dict[str, Any]:
    """A record clearing holds, for the list; past the maximum age, a finding."""
    age = _age(now, r.created)
    what = ""
    if payment is not None:
        what = (f"; payment {payment['merchant_id']}/{payment['txn_id']} is "
                f"{payment['state']}")
        if payment["state"] == "confirmed":
            what += " (its late proof has not cleared it)"
    text = (f"record TTN {r.ttn} of PSAM {r.psam_id} batch {r.batch_number} (card "
            f"{r.card_serial.upper()} counter {r.card_counter}, {r.amount}): held, no card "
            f"TAC, for {_days(age)}{what}")
    if age > max_age_ms:
        bad.append(f"{text}: older than the maximum age ({_days(max_age_ms)})")
    return {"psam_id": r.psam_id, "batch_number": int(r.batch_number), "ttn": int(r.ttn),
            "card_serial": r.card_serial, "card_counter": int(r.card_counter),
            "amount": int(r.amount), "age_ms": age, "text": text}


def _check_handed(r: dict[str, Any], settled_keys: set[tuple[str, int]],
                  received: dict[tuple[str, int], tuple[str, str]],
                  handed_batches: set[tuple[str, int]],
                  open_batches: dict[str, set[int]] | None, now: int, max_age_ms: int,
                  bad: list[str]) -> dict[str, Any] | None:
    """A confirmed payment's PSAM record: where it is. None when cleared; an item for the list
    when it is on its way; findings go to ``bad``."""
    name = (f"confirmed payment {r['merchant_id']}/{r['txn_id']} ({r['amount']}, card "
            f"{r['card_serial'].upper()} counter {r['card_counter']})")
    if (r["card_serial"][-16:].lower(), int(r["card_counter"])) in settled_keys:
        return None
    psam = (r["psam_id"] or "").upper()
    if not psam or r["ttn"] is None:
        bad.append(f"{name} has no PSAM record: no PSAM ever recorded it")
        return None
    ttn = int(r["ttn"])
    where = received.get((psam, ttn))
    if where is not None:
        state, reason = where
        if state == "refused":
            bad.append(f"{name}: clearing refused its PSAM record (PSAM {psam} TTN {ttn}: "
                       f"{reason}); the merchant is not paid")
        elif state == "superseded":
            bad.append(f"{name}: its PSAM record (PSAM {psam} TTN {ttn}) was superseded by "
                       "another cleared record of the same card counter")
        return None  # held: listed with the held records
    age = _age(now, r.get("updated") or r.get("created"))
    batch, number = r.get("batch"), r.get("batch_number")
    if batch is not None and number is None:
        found = _BATCH_NAME.search(str(batch))
        number = int(found.group(1)) if found else None
    if batch is not None:
        if number is not None and (psam, int(number)) in handed_batches:
            bad.append(f"{name} has no PSAM record: PSAM {psam} TTN {ttn} is absent from "
                       f"batch {batch}, which clearing received")
            return None
        text = f"{name}: handed in batch {batch}, not yet cleared, for {_days(age)}"
    elif open_batches is not None and psam in open_batches:
        if ttn not in open_batches[psam]:
            bad.append(f"{name} has no PSAM record: TTN {ttn} is neither in a batch handed "
                       f"to clearing nor in PSAM {psam}'s open batch")
            return None
        text = f"{name}: in PSAM {psam}'s open batch (TTN {ttn}), for {_days(age)}"
    else:
        text = f"{name}: PSAM {psam} TTN {ttn} not yet handed to clearing, for {_days(age)}"
    if age > max_age_ms:
        bad.append(f"{text}: older than the maximum age ({_days(max_age_ms)})")
    return {"merchant_id": r["merchant_id"], "txn_id": r["txn_id"], "amount": int(r["amount"]),
            "psam_id": psam, "ttn": ttn, "batch": batch, "age_ms": age, "text": text}


_BATCH_NAME = re.compile(r"-(\d+)\.json$")


def _refund_problem(row: dict[str, Any] | None, by_txn: dict[str, dict[str, Any]]) -> str:
    """Why a bank refund is not backed by a proven "not loaded" ("" when it is)."""
    if row is None:
        return "but the load server has no such load"
    if row["state"] != "not_loaded":
        return f"but the load server says {row['state']}"
    evidence = str(row.get("evidence") or "")
    if evidence in ("no-s2", "probe"):
        return ""
    if evidence.startswith("counter-used:"):
        other = by_txn.get(evidence.split(":", 1)[1])
        if (other is not None and other["state"] == "loaded"
                and other["card_serial"].lower() == row["card_serial"].lower()
                and other["online_counter"] == row["online_counter"]):
            return ""
        return (f"on evidence {evidence!r}, but that load is not loaded at this card's "
                "counter")
    if not evidence:
        return "on a \"not loaded\" with no evidence made after the attempt"
    return f"on unknown evidence {evidence!r}"


def _check(name: str, left: int, right: int) -> dict[str, Any]:
    return {"name": name, "left": left, "right": right, "ok": left == right}
