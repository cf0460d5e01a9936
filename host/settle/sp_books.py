"""The service provider's part of ``svcard audit`` (seed 001): its money closes three ways, to
the minor unit, per currency.

(a) **Purse debits = what the merchants received.** Every debit of a provider purse (a pool
    payment ``paid`` or ``disputed``: the card paid) is found, by the purse's serial and offline
    counter, among the records clearing cleared (the merchant was paid) or, not yet cleared,
    among the payments a payment server confirmed (in transit, listed). A debit found in
    neither, a merchant record for a provider purse with no debit in the SP's books, and an
    amount that differs are findings. Checked when a clearing or payment database is given.
(b) **Bill lines = payments made for the customer + fees - discounts.** Each line is checked
    against its order (retail price and fee frozen when it was taken, the discount rule) and
    against the purse payment made for it (the wholesale amount): ``billed = retail + fee -
    discount``, the discount the merchant's (retail - wholesale) passed on at the order's
    ``pass_on_percent``. Every billed order has one line and every paid purse payment a billed
    order (or one still open, listed); each bill's total is the sum of its lines; each
    customer's open total and amount owed are the sums of its open lines and issued bills.
(c) **Loads from the provider's bank = purse debits + purse balances** (- the purses'
    opening balances). With load databases, every load the pool booked ``loaded`` is
    that load server's ``loaded`` load of the same card and amount, and no load of a provider
    purse is missing from the pool's books. With cards read, a provider purse's balance on
    the card is the balance in the books.

The SP's database is read only through :mod:`svcard.host.sp.records`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from ..load import records as load_records
from ..pay import records as pay_records
from ..sp import records as sp_records
from .db import records as cleared_records
from .sources import clearing_engine

DEBITED = ("paid", "disputed")     # a pool payment the card paid
OPEN_ORDER = ("paying", "paid", "in_doubt")

Key = tuple[str, int]   # (the card serial's last 16 hex digits, lower case; offline counter)


@dataclass
class SpBooks:
    figures: dict[str, int] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    discrepancies: list[str] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    read: int = 0


def _key(serial: str, counter: int) -> Key:
    return (str(serial)[-16:].lower(), int(counter))


def _check(name: str, left: int, right: int) -> dict[str, Any]:
    return {"name": name, "left": left, "right": right, "ok": left == right}


def merchant_side(clearing_db: str | None, payment_dbs: tuple[str, ...]
                  ) -> tuple[dict[Key, int], dict[Key, tuple[str, int]]]:
    """(cleared record amounts, confirmed payments not yet cleared: their name) by key."""
    cleared: dict[Key, int] = {}
    engine = clearing_engine(clearing_db) if clearing_db else None
    if engine is not None:
        try:
            with engine.connect() as conn:
                for r in conn.execute(select(cleared_records.c.card_serial,
                                             cleared_records.c.card_counter,
                                             cleared_records.c.amount)):
                    cleared[_key(r.card_serial, r.card_counter)] = int(r.amount)
        finally:
            engine.dispose()
    confirmed: dict[Key, tuple[str, int]] = {}
    for url in payment_dbs:
        for p in pay_records.payments(url):
            if p["state"] == "confirmed" and p["tac"] is not None and p["amount"] > 0:
                confirmed[_key(p["card_serial"], p["card_counter"])] = (
                    f"{p['merchant_id']}/{p['txn_id']}", int(p["amount"]))
    return cleared, confirmed


def audit_sp(sp_dbs: tuple[str, ...], *, clearing_db: str | None = None,
             payment_dbs: tuple[str, ...] = (), load_dbs: tuple[str, ...] = (),
             cards: dict[str, int] | None = None) -> SpBooks:
    """The three-way closing of every SP database in ``sp_dbs`` (see the module text)."""
    out = SpBooks()
    if not sp_dbs:
        return out
    cleared, confirmed = merchant_side(clearing_db, payment_dbs)
    loads_by_txn: dict[str, dict[str, Any]] = {}
    for url in load_dbs:
        for row in load_records.loads(url):
            loads_by_txn[str(row["txn_id"])] = row
    for url in sp_dbs:
        books = sp_records.books(url)
        out.read += sum(len(rows) for rows in books.values())
        merchants = clearing_db is not None or bool(payment_dbs)
        _debits_received(books, cleared, confirmed, merchants, out)
        _bills(books, out)
        _loads(books, loads_by_txn if load_dbs else None, cards or {}, out)
    out.discrepancies += [f"check failed: {c['name']} ({c['left']} != {c['right']})"
                          for c in out.checks if not c["ok"]]
    return out


def _debits_received(books: dict[str, list[dict[str, Any]]], cleared: dict[Key, int],
                     confirmed: dict[Key, tuple[str, int]], merchants: bool,
                     out: SpBooks) -> None:
    """(a) provider purse debits = what the merchants' POS received (cleared + in transit)."""
    serials = {str(p["serial"])[-16:].lower(): p for p in books["purses"]}
    debits: dict[int, int] = defaultdict(int)
    received: dict[int, int] = defaultdict(int)
    booked: dict[Key, str] = {}   # each card debit (purse, counter): the order it paid
    bad = out.discrepancies
    for pay in books["purse_payments"]:
        if pay["state"] not in DEBITED:
            continue
        code, amount = int(pay["currency_code"]), int(pay["amount"] or 0)
        debits[code] += amount
        if pay["counter"] is None:
            bad.append(f"purse debit of order {pay['order_ref']} (purse {pay['purse_serial']}, "
                       f"{amount}) has no card counter")
            continue
        key = _key(pay["purse_serial"], pay["counter"])
        name = (f"purse debit of order {pay['order_ref']} (purse {pay['purse_serial']} "
                f"counter {pay['counter']}, {amount})")
        if key in booked:   # one card transaction pays one order
            bad.append(f"{name}: the same card debit as order {booked[key]}'s")
        booked.setdefault(key, str(pay["order_ref"]))
        if key in cleared:
            got = cleared[key]
            where = "clearing paid the merchant"
        elif key in confirmed:
            txn, got = confirmed[key]
            where = f"payment {txn} confirmed, not yet cleared"
            out.pending.append({"order_ref": pay["order_ref"], "purse": pay["purse_serial"],
                                "counter": pay["counter"], "amount": amount,
                                "text": f"{name}: {where}"})
        else:
            if merchants:
                bad.append(f"{name} reached no merchant: no payment server confirmed it and "
                           f"clearing holds no record of it")
            continue
        received[code] += got
        if got != amount:
            bad.append(f"{name}: the merchant received {got}")
    if merchants:
        for key in sorted(set(cleared) | set(confirmed)):
            if key[0] in serials and key not in booked:
                got = cleared[key] if key in cleared else confirmed[key][1]
                bad.append(f"a merchant received {got} from provider purse "
                           f"{serials[key[0]]['serial']} counter {key[1]}, but the SP's books "
                           f"hold no purse debit for it")
                code = int(serials[key[0]]["currency_code"])
                received[code] += got
    for code in sorted(set(debits) | set(received)):
        out.figures[f"sp {code} purse debits"] = debits[code]
        if merchants:
            out.figures[f"sp {code} merchants received"] = received[code]
            out.checks.append(_check(f"sp {code}: purse debits = what the merchants received",
                                     debits[code], received[code]))


def _bills(books: dict[str, list[dict[str, Any]]], out: SpBooks) -> None:
    """(b) each customer's bill lines = payments made for them + fees - discounts."""
    bad = out.discrepancies
    orders = {o["order_ref"]: o for o in books["orders"]}
    pays = {p["order_ref"]: p for p in books["purse_payments"]}
    lines = {ln["order_ref"]: ln for ln in books["bill_lines"]}
    sums: dict[int, dict[str, int]] = {}
    for ref, ln in lines.items():
        code = int(ln["currency_code"])
        s = sums.setdefault(code, dict.fromkeys(
            ("billed", "retail", "fees", "discounts", "wholesale", "payments"), 0))
        s["billed"] += int(ln["billed"])
        s["retail"] += int(ln["retail"])
        s["fees"] += int(ln["fee"])
        s["discounts"] += int(ln["discount"])
        s["wholesale"] += int(ln["wholesale"])
        name = f"bill line of order {ref} (customer {ln['customer']}, billed {ln['billed']})"
        pay = pays.get(ref)
        if pay is None or pay["state"] != "paid":
            bad.append(f"{name}: no purse payment was made for it "
                       f"({pay['state'] if pay else 'none'})")
        else:
            s["payments"] += int(pay["amount"] or 0)
            if int(pay["amount"] or 0) != int(ln["wholesale"]):
                bad.append(f"{name}: wholesale {ln['wholesale']}, but purse "
                           f"{pay['purse_serial']} paid {pay['amount']}")
        order = orders.get(ref)
        if order is None:
            bad.append(f"{name}: no such order")
            continue
        if order["state"] != "billed" or order["customer"] != ln["customer"]:
            bad.append(f"{name}: the order is {order['state']}, customer {order['customer']}")
        wholesale = int(ln["wholesale"])
        discount = max(0, int(order["retail"]) - wholesale) * int(order["pass_on_percent"]) \
            // 100
        expect = {"retail": int(order["retail"]), "fee": int(order["fee"]),
                  "discount": discount, "currency_code": int(order["currency_code"]),
                  "wholesale": int(order["wholesale"] or 0),
                  "billed": int(order["retail"]) + int(order["fee"]) - discount}
        for column, value in expect.items():
            if int(ln[column]) != value:
                bad.append(f"{name}: {column} {ln[column]}, but the order makes it {value}")
    for ref, order in orders.items():
        if order["state"] == "billed" and ref not in lines:
            bad.append(f"order {ref} (customer {order['customer']}) is billed but has no bill "
                       f"line")
        elif order["state"] in OPEN_ORDER:
            out.pending.append({"order_ref": ref, "customer": order["customer"],
                                "text": f"order {ref} of {order['customer']} is "
                                        f"{order['state']}: not billed yet"})
    for ref, pay in pays.items():
        order = orders.get(ref)
        if pay["state"] in DEBITED and (order is None or order["state"] not in (
                "billed", *OPEN_ORDER)):
            bad.append(f"purse {pay['purse_serial']} paid {pay['amount']} for order {ref}, "
                       f"which is {order['state'] if order else 'unknown'}: paid and never "
                       f"billed")
    _bill_totals(books, out)
    for code, s in sorted(sums.items()):
        for what, value in s.items():
            out.figures[f"sp {code} bill lines {what}"] = value
        out.checks.append(_check(f"sp {code}: bill lines = retail + fees - discounts",
                                 s["billed"], s["retail"] + s["fees"] - s["discounts"]))
        out.checks.append(_check(f"sp {code}: bill lines' wholesale = payments made for them",
                                 s["wholesale"], s["payments"]))


def _bill_totals(books: dict[str, list[dict[str, Any]]], out: SpBooks) -> None:
    """Each bill = the sum of its lines; each customer's open total and amount owed."""
    bad = out.discrepancies
    on_bill: dict[int, list[int]] = defaultdict(list)
    open_lines: dict[str, int] = defaultdict(int)
    for ln in books["bill_lines"]:
        if ln["bill_id"] is None:
            open_lines[ln["customer"]] += int(ln["billed"])
        else:
            on_bill[int(ln["bill_id"])].append(int(ln["billed"]))
    ids = {int(bill["id"]) for bill in books["bills"]}
    for ln in books["bill_lines"]:
        if ln["bill_id"] is not None and int(ln["bill_id"]) not in ids:
            bad.append(f"bill line of order {ln['order_ref']} (customer {ln['customer']}, "
                       f"billed {ln['billed']}) is on bill {ln['bill_id']}: no such bill")
    owed: dict[str, int] = defaultdict(int)
    for bill in books["bills"]:
        items = on_bill.get(int(bill["id"]), [])
        if int(bill["total"]) != sum(items) or int(bill["lines"]) != len(items):
            bad.append(f"bill {bill['id']} of {bill['customer']}: total {bill['total']} over "
                       f"{bill['lines']} lines, but its lines sum to {sum(items)} over "
                       f"{len(items)}")
        if bill["state"] == "issued":
            owed[bill["customer"]] += int(bill["total"])
    for c in books["customers"]:
        if int(c["open_total"]) != open_lines.get(c["id"], 0):
            bad.append(f"customer {c['id']}: open total {c['open_total']}, but the open bill "
                       f"lines sum to {open_lines.get(c['id'], 0)}")
        if int(c["owed"]) != owed.get(c["id"], 0):
            bad.append(f"customer {c['id']}: owes {c['owed']}, but the issued bills sum to "
                       f"{owed.get(c['id'], 0)}")


def _loads(books: dict[str, list[dict[str, Any]]], by_txn: dict[str, dict[str, Any]] | None,
           cards: dict[str, int], out: SpBooks) -> None:
    """(c) loads from the provider's bank = purse debits + balances - opening."""
    bad = out.discrepancies
    sums: dict[int, dict[str, int]] = {}

    def slot(code: Any) -> dict[str, int]:
        return sums.setdefault(int(code), dict.fromkeys(
            ("loaded", "opening", "debits", "balances"), 0))

    serials: dict[str, dict[str, Any]] = {}
    for p in books["purses"]:
        serials[str(p["serial"])[-16:].lower()] = p
        s = slot(p["currency_code"])
        s["opening"] += int(p["opening_balance"])
        s["balances"] += int(p["balance"])
        seen = cards.get(str(p["serial"]).lower())
        if seen is not None and seen != int(p["balance"]):
            bad.append(f"provider purse {p['serial']}: the card holds {seen}, the SP's books "
                       f"say {p['balance']}")
    for pay in books["purse_payments"]:
        if pay["state"] in DEBITED:
            slot(pay["currency_code"])["debits"] += int(pay["amount"] or 0)
    booked: set[str] = set()
    for load in books["purse_loads"]:
        if load["state"] != "loaded":
            continue
        slot(load["currency_code"])["loaded"] += int(load["amount"])
        booked.add(str(load["txn_id"]))
        if by_txn is None:
            continue
        row = by_txn.get(str(load["txn_id"]))
        if row is None or row["state"] != "loaded" or int(row["amount"]) != int(
                load["amount"]) or str(row["card_serial"])[-16:].lower() != str(
                load["purse_serial"])[-16:].lower():
            bad.append(f"top-up {load['txn_id']} of purse {load['purse_serial']} "
                       f"({load['amount']}) is loaded in the SP's books, but the load server "
                       f"says {_load_text(row)}")
    for txn, row in sorted((by_txn or {}).items()):
        if row["state"] == "loaded" and str(row["card_serial"])[-16:].lower() in serials and \
                txn not in booked:
            bad.append(f"load {txn} of {row['amount']} to provider purse "
                       f"{str(row['card_serial']).upper()} is not in the SP's books")
    for code, s in sorted(sums.items()):
        for what, value in s.items():
            out.figures[f"sp {code} purse {what}"] = value
        out.checks.append(_check(
            f"sp {code}: loads + opening = purse debits + balances",
            s["loaded"] + s["opening"], s["debits"] + s["balances"]))


def _load_text(row: dict[str, Any] | None) -> str:
    if row is None:
        return "nothing of it"
    return f"{row['state']}, {row['amount']} to card {str(row['card_serial']).upper()}"
