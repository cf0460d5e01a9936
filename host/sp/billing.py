"""The billing unit (seed FIG. 1 unit 112, FIG. 3A bill 313): every micropayment the SP made for a
customer becomes a bill line, and a customer's open lines become one aggregated bill at the end
of the billing period or as soon as their total reaches the configured maximum.

A line records the retail price (the SP's catalogue), the wholesale amount (what the purse
paid the merchant), the fee and the discount passed on (``config.py`` says how), and what is
billed: ``retail + fee - discount``. Each step is one database transaction that WRITES first
(so SQLite takes its write lock at the first statement and PostgreSQL locks the rows it
changes): an order is billed only by the transaction that moves it ``paid -> billed``, and a
bill takes exactly the open lines its own ``UPDATE`` marked.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, update

from ..kit.db import now_ms, reading, step
from ..terminal.money import format_money
from . import db as D
from .config import Item

DAY_MS = 86_400_000


@dataclass(frozen=True)
class LineAmounts:
    retail: int
    wholesale: int
    fee: int
    discount: int
    billed: int


def amounts(item: Item, wholesale: int) -> LineAmounts:
    """The line of ``item`` bought for ``wholesale``: the merchant's discount (retail -
    wholesale, never below 0) passed on at ``pass_on_percent``, rounded down."""
    discount = max(0, item.retail - wholesale) * item.pass_on_percent // 100
    return LineAmounts(item.retail, wholesale, item.fee, discount,
                       item.retail + item.fee - discount)


def reservation(item: Item) -> int:
    """The credit an order of ``item`` holds while it is paid: the most it can be billed."""
    return item.retail + item.fee


def log_event(conn: Connection, order_ref: str, customer: str, event: str,
              at: int, **detail: Any) -> None:
    """Append one event to the merchandising log (in the caller's transaction)."""
    conn.execute(insert(D.order_log).values(
        order_ref=order_ref, customer=customer, event=event,
        detail=json.dumps(detail, sort_keys=True, default=str), at=at))


def order_item(order: Any) -> Item:
    """The item as the order froze it when it was taken (prices, fee, discount rule)."""
    return Item(order["merchant"], order["sku"], order["item"], int(order["retail"]),
                int(order["max_wholesale"]), int(order["fee"]), int(order["pass_on_percent"]),
                order["checkout_url"], order["wholesale_agreed"])


def bill_order(engine: Engine, order_ref: str, maximum: int, due_days: int,
               now: int | None = None) -> dict[str, Any] | None:
    """Bill a ``paid`` order at the prices it was taken at: its line, the customer's
    reservation released and open total raised, and a bill issued if the open total reached
    ``maximum``. None when the order is not ``paid`` (billed already, or never paid)."""
    at = now_ms() if now is None else now
    with step(engine) as conn:
        moved = conn.execute(update(D.orders).where(
            D.orders.c.order_ref == order_ref, D.orders.c.state == D.PAID).values(
            state=D.BILLED, updated=at)).rowcount
        if moved != 1:
            return None
        order = conn.execute(select(D.orders).where(
            D.orders.c.order_ref == order_ref)).one()._mapping
        item = order_item(order)
        line = amounts(item, int(order["wholesale"]))
        row = {"order_ref": order_ref, "customer": order["customer"],
               "merchant": order["merchant"], "sku": order["sku"], "item": item.name,
               "retail": line.retail, "wholesale": line.wholesale, "fee": line.fee,
               "discount": line.discount, "billed": line.billed,
               "currency_code": order["currency_code"],
               "merchant_txn": order["merchant_txn"] or "",
               "purse_serial": order["purse_serial"] or "", "created": at}
        conn.execute(insert(D.bill_lines).values(**row))
        conn.execute(update(D.customers).where(D.customers.c.id == order["customer"]).values(
            reserved=D.customers.c.reserved - order["reserved"],
            open_total=D.customers.c.open_total + line.billed, updated=at))
        if line.wholesale > item.max_wholesale:   # paid is paid: billed at retail, kept for review
            log_event(conn, order_ref, order["customer"], "over_price", at,
                      wholesale=line.wholesale, max_wholesale=item.max_wholesale)
        log_event(conn, order_ref, order["customer"], "billed", at, retail=line.retail,
                  wholesale=line.wholesale, fee=line.fee, discount=line.discount,
                  billed=line.billed)
        open_total = conn.execute(select(D.customers.c.open_total).where(
            D.customers.c.id == order["customer"])).scalar_one()
        if int(open_total) >= maximum:
            row["bill_id"] = issue_bill(conn, str(order["customer"]), "maximum", at, due_days)
    return row


def issue_bill(conn: Connection, customer: str, trigger: str, at: int, due_days: int,
               before: int | None = None) -> int | None:
    """Put ``customer``'s open lines (created before ``before``, if given) on a new bill, in
    the caller's transaction; the bill's id, or None (and no bill) when there is no open
    line."""
    bill_id = int(conn.execute(insert(D.bills).returning(D.bills.c.id).values(
        customer=customer, total=0, lines=0, currency_code=0, trigger=trigger,
        period_start=0, issued=at, due=at + due_days * DAY_MS, state=D.ISSUED,
        updated=at)).scalar_one())
    where = [D.bill_lines.c.customer == customer, D.bill_lines.c.bill_id.is_(None)]
    if before is not None:
        where.append(D.bill_lines.c.created < before)
    conn.execute(update(D.bill_lines).where(*where).values(bill_id=bill_id))
    total, count, oldest, currency = conn.execute(select(
        func.coalesce(func.sum(D.bill_lines.c.billed), 0), func.count(),
        func.min(D.bill_lines.c.created), func.max(D.bill_lines.c.currency_code)).where(
        D.bill_lines.c.bill_id == bill_id)).one()
    if not count:
        conn.execute(D.bills.delete().where(D.bills.c.id == bill_id))
        return None
    conn.execute(update(D.bills).where(D.bills.c.id == bill_id).values(
        total=int(total), lines=int(count), currency_code=int(currency),
        period_start=int(oldest)))
    conn.execute(update(D.customers).where(D.customers.c.id == customer).values(
        open_total=D.customers.c.open_total - int(total),
        owed=D.customers.c.owed + int(total), updated=at))
    return bill_id


def period_start(at: int, period: str) -> int:
    """The start (ms, UTC) of the billing period holding ``at``."""
    t = dt.datetime.fromtimestamp(at / 1000, dt.UTC)
    day = dt.datetime(t.year, t.month, t.day, tzinfo=dt.UTC)
    if period == "week":
        day -= dt.timedelta(days=day.weekday())
    elif period == "month":
        day = day.replace(day=1)
    return int(day.timestamp() * 1000)


def close_ended_periods(engine: Engine, period: str, due_days: int,
                        now: int | None = None) -> list[int]:
    """A bill for every customer with open lines from a period that has ended (its lines
    from before the current period); the new bills' ids."""
    at = now_ms() if now is None else now
    start = period_start(at, period)
    with reading(engine) as conn:
        due = conn.execute(select(D.bill_lines.c.customer).where(
            D.bill_lines.c.bill_id.is_(None), D.bill_lines.c.created < start).distinct()
        ).scalars().all()
    issued = []
    for customer in due:
        with step(engine) as conn:
            bill = issue_bill(conn, customer, "period", at, due_days, before=start)
        if bill is not None:
            issued.append(bill)
    return issued


def close_now(engine: Engine, customer: str, due_days: int, now: int | None = None
              ) -> int | None:
    """A bill of every open line of ``customer`` now (``svcard sp bills close``)."""
    at = now_ms() if now is None else now
    with step(engine) as conn:
        return issue_bill(conn, customer, "manual", at, due_days)


def settle_bill(engine: Engine, bill_id: int, now: int | None = None) -> bool:
    """Record that the customer paid bill ``bill_id`` (issued -> paid); False if it is not an
    issued bill."""
    at = now_ms() if now is None else now
    with step(engine) as conn:
        if conn.execute(update(D.bills).where(
                D.bills.c.id == bill_id, D.bills.c.state == D.ISSUED).values(
                state=D.SETTLED, updated=at)).rowcount != 1:
            return False
        bill = conn.execute(select(D.bills).where(D.bills.c.id == bill_id)).one()._mapping
        conn.execute(update(D.customers).where(D.customers.c.id == bill["customer"]).values(
            owed=D.customers.c.owed - bill["total"], updated=at))
    return True


def bill_text(bill: dict[str, Any], lines: list[dict[str, Any]], exponent: int) -> str:
    """A bill a person can read: the header, one line per purchase, the total."""
    code = int(bill["currency_code"])

    def money(v: int) -> str:
        return format_money(int(v), code, exponent)

    def when(ms: int) -> str:
        return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")

    out = [f"BILL {bill['id']}  customer {bill['customer']}",
           f"issued {when(bill['issued'])} ({bill['trigger']}), due {when(bill['due'])}, "
           f"{bill['state']}", ""]
    out.append(f"{'date':<20} {'merchant':<12} {'item':<24} {'price':>12} {'fee':>10} "
               f"{'discount':>10} {'amount':>12}")
    for ln in lines:
        out.append(f"{when(ln['created']):<20} {ln['merchant'][:12]:<12} "
                   f"{ln['item'][:24]:<24} {money(ln['retail']):>12} {money(ln['fee']):>10} "
                   f"{money(-ln['discount']) if ln['discount'] else '':>10} "
                   f"{money(ln['billed']):>12}")
    out += ["", f"{'TOTAL':<90} {money(bill['total']):>12}"]
    return "\n".join(out)
