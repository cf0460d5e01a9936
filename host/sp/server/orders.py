"""Step 1 of a retail order (seed FIG. 2 steps 201-204, 210): the customer's request is read,
authenticated and checked for billability, and the SP's intent to pay is recorded.

The request is bounded JSON (:data:`MAX_ORDER_BODY`) with exactly the fields of
:func:`svcard.host.sp.signing.order_body`, signed by the customer's Ed25519 key. Then ONE
database transaction decides: a conditional ``UPDATE`` of the customer's row reserves the most
the order can be billed (retail + fee) only if the account is active, has no overdue bill and
stays within its credit limit with what is already owed, open and reserved; the order's row is
written in the same transaction, ``paying`` (the intent, under a fresh unique ``order_ref``) or
``rejected`` with the reason. Two concurrent orders cannot both pass a limit only one fits: the
second ``UPDATE`` sees the first's reservation (SQLite: one writer; PostgreSQL: the row lock,
the ``WHERE`` checked again on the updated row). A replayed ``(customer, order_key)`` hits the
unique key, the whole transaction is undone, and the request is refused with the order it
repeats.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, and_, exists, insert, select, update
from sqlalchemy.exc import IntegrityError

from ...kit.db import first_row, step
from ...kit.http import Refused, check_json_shape
from .. import db as D
from ..billing import log_event, reservation
from ..config import Item

MAX_ORDER_BODY = 2048
_CUSTOMER = re.compile(r"[A-Za-z0-9_.@-]{1,32}")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ORDER_KEY = re.compile(r"[0-9a-fA-F]{16,64}")
FIELDS = frozenset({"customer", "merchant", "sku", "sp", "order_key", "created"})
LOOKUP_FIELDS = frozenset({"customer", "sp", "order_key", "created"})


@dataclass(frozen=True)
class OrderRequest:
    customer: str
    merchant: str
    sku: str
    order_key: str
    created: int


def parse_fields(body: bytes, fields: frozenset[str]) -> dict[str, Any]:
    """The JSON object ``body`` with exactly ``fields``, the common ones checked (400 naming
    the field)."""
    check_json_shape(body, max_depth=2, max_items=16)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise Refused(400, 400, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise Refused(400, 400, "the body is not a JSON object")
    if set(data) != fields:
        missing, extra = sorted(fields - set(data)), sorted(set(data) - fields)
        raise Refused(400, 400, f"fields: missing {missing}, unknown {extra[:4]}")
    for name, pattern in (("customer", _CUSTOMER), ("merchant", _NAME), ("sku", _NAME),
                          ("sp", _NAME), ("order_key", _ORDER_KEY)):
        value = data.get(name, "")
        if name in fields and (not isinstance(value, str) or not pattern.fullmatch(value)):
            raise Refused(400, 400, f"{name}: not a valid value")
    created = data["created"]
    if not isinstance(created, int) or isinstance(created, bool) or not 0 < created < 2**40:
        raise Refused(400, 400, "created: not a time (whole seconds since 1970)")
    return data


def parse_order(body: bytes) -> OrderRequest:
    """The order's fields, each checked (400 naming the field)."""
    data = parse_fields(body, FIELDS)
    return OrderRequest(data["customer"], data["merchant"], data["sku"],
                        data["order_key"].lower(), data["created"])


def customer_key(engine: Engine, customer: str) -> bytes | None:
    row = first_row(engine, D.customers, id=customer)
    return None if row is None else bytes.fromhex(row["public_key"])


@dataclass(frozen=True)
class Admission:
    order_ref: str
    state: str          # paying | rejected | replay
    reason: str = ""
    kind: str = ""      # why rejected: blocked | currency | bad_history | credit_limit


def _overdue(customer: str, now: int) -> Any:
    return exists().where(and_(D.bills.c.customer == customer, D.bills.c.state == D.ISSUED,
                               D.bills.c.due < now))


def admit(engine: Engine, req: OrderRequest, item: Item, digest: str, currency_code: int,
          now: int) -> Admission:
    """Check billability and reserve credit, and record the order, in ONE transaction."""
    order_ref = "spo-" + secrets.token_hex(12)
    amount = reservation(item)
    c = D.customers.c
    row = {"order_ref": order_ref, "customer": req.customer, "order_key": req.order_key,
           "request_digest": digest, "merchant": item.merchant, "sku": item.sku,
           "item": item.name, "pass_on_percent": item.pass_on_percent,
           "max_wholesale": item.max_wholesale, "wholesale_agreed": item.wholesale,
           "checkout_url": item.checkout_url,
           "retail": item.retail, "fee": item.fee,
           "currency_code": currency_code, "attempts": 0, "created": now, "updated": now}
    try:
        with step(engine) as conn:
            reserved = conn.execute(update(D.customers).where(
                c.id == req.customer, c.state == D.ACTIVE, c.currency_code == currency_code,
                c.owed + c.open_total + c.reserved + amount <= c.credit_limit,
                ~_overdue(req.customer, now)).values(
                reserved=c.reserved + amount, updated=now)).rowcount == 1
            if reserved:
                conn.execute(insert(D.orders).values(state=D.PAYING, reason="", reserved=amount,
                                                     **row))
                log_event(conn, order_ref, req.customer, "ordered", now, merchant=item.merchant,
                          sku=item.sku, retail=item.retail, fee=item.fee, reserved=amount,
                          order_key=req.order_key)
                return Admission(order_ref, D.PAYING)
            kind, reason = _why_not(conn, req.customer, amount, now, currency_code)
            conn.execute(insert(D.orders).values(state=D.REJECTED, reason=reason, reserved=0,
                                                 **row))
            log_event(conn, order_ref, req.customer, "rejected", now, merchant=item.merchant,
                      sku=item.sku, kind=kind, reason=reason, order_key=req.order_key)
            return Admission(order_ref, D.REJECTED, reason, kind)
    except IntegrityError:
        pass
    first = first_row(engine, D.orders, customer=req.customer, order_key=req.order_key)
    if first is None:   # a unique key said no, yet no such order: not a replay
        raise Refused(409, 409, "the order could not be recorded; send it again with a new "
                                "order key")
    return Admission(first["order_ref"], "replay", first["state"])


def _why_not(conn: Any, customer: str, amount: int, now: int,
             currency_code: int) -> tuple[str, str]:
    row = conn.execute(select(D.customers).where(D.customers.c.id == customer)).first()
    if row is None:
        return "no_account", "no account with this service provider"
    r = row._mapping
    if r["state"] != D.ACTIVE:
        return "blocked", f"the account is blocked: {r['block_reason']}"
    if int(r["currency_code"]) != currency_code:   # its limit and bills are in another one
        return "currency", (f"the account is kept in currency {r['currency_code']}, the SP "
                            f"bills in {currency_code}")
    if conn.execute(select(_overdue(customer, now))).scalar():
        return "bad_history", "bad history: a bill is overdue"
    used = int(r["owed"]) + int(r["open_total"]) + int(r["reserved"])
    return "credit_limit", (f"over the credit limit: {used} in use + {amount} for this order "
                            f"> {int(r['credit_limit'])} (minor units)")
