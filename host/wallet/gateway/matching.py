"""Embodiment 1's match (seed 003 FIG. 4 steps b5-b8), as database steps.

:func:`store_choice` keeps what the member's wallet sent (the card chosen and the purchase
information the mall's page gave it). :func:`match` takes the mall's own view of the purchase
and, in ONE conditional UPDATE, moves the one purchase whose every field equals it (mall,
order, the customer's id at the mall, product-list digest, amount, currency, nonce, expiry)
from ``chosen`` (and not expired) to ``approving``. A purchase left ``approving`` longer than
:data:`STALE_MS` (the process asking for its debit stopped) matches again, so the same debit
ref is asked again and never a second debit; one still in flight does not (a concurrent copy
of the request is refused). :func:`settle` records the financial system's answer,
compare-and-set; :func:`in_flight` lists what a restart must ask about again.

**Mall-signed orders.** The purchase information the mall's page hands the wallet carries the
mall's ``signature``: an HMAC-SHA256, under a key derived from the mall <-> gateway link key
(:data:`ORDER_DOMAIN`), over every field the match compares (:func:`order_mac`). The gateway
stores a choice or a fill only for a purchase its mall signed (:func:`signed_purchase`), so a
member cannot file a purchase the mall never made, nor alter one. And each customer id at a
mall is bound to the first member whose wallet filed a signed purchase for it
(``wg_customers``, in the same database step that stores the purchase): another member
filing that customer's orders, even with a copy of the signed purchase, is refused (403)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    String,
    Table,
    and_,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from ...kit.db import now_ms, reading, step
from ...kit.http import Refused
from ..links import purchase as read_purchase
from . import db as D

STALE_MS = 10_000
MAX_OPEN = 50            # a member's purchases chosen or filled, unpaid and not expired
FIELDS = {"mall": "mall", "order": "mall_order", "customer": "customer",
          "products_digest": "products_digest", "amount": "amount", "currency": "currency",
          "nonce": "nonce", "expires": "expires"}
ORDER_DOMAIN = b"svcard-wallet-order-v1"
SIGNATURE = re.compile(r"^[0-9a-f]{64}$")

customers = Table(       # a customer id at a mall -> the member whose wallet uses it
    "wg_customers", D.metadata,
    Column("mall", String(40), primary_key=True),
    Column("customer", String(40), primary_key=True),
    Column("member", String(40), nullable=False),
    Column("bound", BigInteger, nullable=False),
)


def order_mac(mall_key: bytes, p: Mapping[str, Any]) -> str:
    """The mall's signature over a purchase as :func:`links.purchase` reads it: every field
    the match compares (mall, order, customer, the products' digest, amount, currency,
    nonce, expiry), under a key derived from the mall's link key with the gateway."""
    key = hmac.new(mall_key, ORDER_DOMAIN, hashlib.sha256).digest()
    message = "\n".join(str(p[name]) for name in FIELDS)
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def sign_order(mall_key: bytes, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The purchase as the mall's page hands it to the wallet: ``raw`` and its signature."""
    return {**raw, "signature": order_mac(mall_key, read_purchase(dict(raw)))}


def signed_purchase(mall_keys: Mapping[str, bytes], raw: Any) -> dict[str, Any]:
    """The purchase a member's wallet sent, read (:func:`links.purchase`) and its mall's
    signature checked: 400 a malformed purchase or a mall not served here, 403 a purchase
    its mall did not sign (no signature, another key's, or any field changed)."""
    if not isinstance(raw, dict):
        raise Refused(400, 400, "purchase: not an object")
    p = read_purchase({k: v for k, v in raw.items() if k != "signature"})
    key = mall_keys.get(p["mall"])
    if key is None:
        raise Refused(400, 400, "purchase.mall: not a mall this gateway serves")
    given = raw.get("signature")
    if not isinstance(given, str) or not SIGNATURE.fullmatch(given) or \
            not hmac.compare_digest(given.encode(), order_mac(key, p).encode()):
        raise Refused(403, 403, "purchase.signature: the purchase is not signed by its mall")
    return p


def store_choice(engine: Engine, member: str, card: str, p: dict[str, Any],
                 state: str = D.CHOSEN) -> str | None:
    """The new purchase's id, or None if the mall's order has a purchase already. ``state``:
    ``chosen`` (embodiment 1) or ``filled`` (2 and 3: the secret is checked later). Refused
    (429) when the member has :data:`MAX_OPEN` open purchases already (counted in the step),
    and (403) when the purchase's customer id at the mall is another member's (bound to this
    member, in the same step, if it was no one's yet)."""
    for _ in range(2):
        try:
            return _store(engine, member, card, p, state)
        except IntegrityError:
            # the order has its purchase already, or (a concurrent first purchase of the same
            # customer id) the binding was just made: asked again, it is seen
            if by_order(engine, p["mall"], p["order"]) is not None:
                return None
    return None


def _store(engine: Engine, member: str, card: str, p: dict[str, Any], state: str) -> str:
    pid = secrets.token_hex(16)
    now = now_ms()
    c, k = D.purchases.c, customers.c
    with step(engine) as conn:
        holder = conn.execute(select(k.member).where(
            k.mall == p["mall"], k.customer == p["customer"])).scalar()
        if holder is not None and holder != member:
            raise Refused(403, 403, "purchase.customer: this customer id at the mall "
                                    "is another wallet's")
        if conn.execute(select(func.count()).select_from(D.purchases).where(
                c.member == member, c.state.in_((D.CHOSEN, D.FILLED)),
                c.expires > now)).scalar_one() >= MAX_OPEN:
            raise Refused(429, 429, f"at most {MAX_OPEN} open purchases per member: "
                                    "pay or let some expire first")
        if holder is None:
            conn.execute(insert(customers).values(mall=p["mall"], customer=p["customer"],
                                                  member=member, bound=now))
        conn.execute(insert(D.purchases).values(
            id=pid, member=member, card=card, state=state, reason="", created=now,
            updated=now, **{column: p[name] for name, column in FIELDS.items()}))
    return pid


def match(engine: Engine, p: dict[str, Any], now: int, state: str = D.CHOSEN,
          extra: dict[str, str] | None = None) -> tuple[str, dict[str, Any] | None]:
    """(``matched``, the purchase) or (why not, the purchase by mall and order or None):
    ``none``, ``approved``, ``declined``, ``approving`` (in flight), ``expired``,
    ``mismatch``. Only a purchase in ``state`` matches (a ``filled`` one never matches an
    embodiment-1 request, which carries no secret), and ``extra`` columns must be equal too
    (embodiment 2: the purchase id in the profile token and the card)."""
    c = D.purchases.c
    wanted = {column: p[name] for name, column in FIELDS.items()} | (extra or {})
    equal = [c[column] == value for column, value in wanted.items()]
    with step(engine) as conn:
        done = conn.execute(update(D.purchases).where(
            *equal, or_(and_(c.state == state, c.expires > now),
                        and_(c.state == D.APPROVING, c.updated < now - STALE_MS))).values(
            state=D.APPROVING, updated=now)).rowcount
        row = conn.execute(select(D.purchases).where(
            c.mall == p["mall"], c.mall_order == p["order"])).first()
    found = dict(row._mapping) if row is not None else None
    if done == 1:
        return "matched", found
    if found is None:
        return "none", None
    same = all(found[column] == value for column, value in wanted.items())
    if found["state"] in (D.APPROVED, D.DECLINED) or (same and found["state"] == D.APPROVING):
        return found["state"], found
    if same and found["state"] == state and found["expires"] <= now:
        return "expired", found
    return "mismatch", found


def settle(engine: Engine, pid: str, approved: bool, reason: str) -> bool:
    c = D.purchases.c
    with step(engine) as conn:
        return bool(conn.execute(update(D.purchases).where(
            c.id == pid, c.state == D.APPROVING).values(
            state=D.APPROVED if approved else D.DECLINED, reason=reason[:200],
            updated=now_ms())).rowcount == 1)


def by_order(engine: Engine, mall: str, order: str) -> dict[str, Any] | None:
    c = D.purchases.c
    with reading(engine) as conn:
        row = conn.execute(select(D.purchases).where(c.mall == mall,
                                                     c.mall_order == order)).first()
    return dict(row._mapping) if row is not None else None


def purchase(engine: Engine, pid: str) -> dict[str, Any] | None:
    with reading(engine) as conn:
        row = conn.execute(select(D.purchases).where(D.purchases.c.id == pid)).first()
    return dict(row._mapping) if row is not None else None


def in_flight(engine: Engine) -> list[dict[str, Any]]:
    """Purchases matched whose debit's outcome was never recorded."""
    with reading(engine) as conn:
        rows = conn.execute(select(D.purchases).where(
            D.purchases.c.state == D.APPROVING)).all()
    return [dict(r._mapping) for r in rows]
