"""Seed 001 FIG. 3B and "the merchant sends a copy of the order": the SP only pays.

``POST /v1/orders/pon`` (FIG. 3B, purchase order 341): the customer placed a tentative order at
the merchant and got a payment order number (PON). Its purchase order to the SP, signed with
its key under :data:`~..signing.PON_DOMAIN`, names the merchant, the PON and optionally the
most it agrees to be billed (``max_amount``). The SP asks the merchant about the PON with a
fresh nonce; the answer must be signed with the merchant's key as the SP holds it
(``sp_merchant_keys``), echo the nonce, name this customer, be unpaid and in the SP's currency.

``POST /v1/orders/copy`` (the alternative): the customer ordered at the merchant, signing the
order with its SP key under :data:`~..signing.MERCHANT_ORDER_DOMAIN`; the merchant sends the SP
a copy (that order, the customer's signature and the PON's terms) signed with the merchant's
key under :data:`~..signing.COPY_DOMAIN`. Both signatures must verify and agree.

Either way the price is the merchant's amount unless the SP's catalogue lists the item (then
its retail price, fee, discount rule, agreed wholesale price and ceiling apply, as in FIG. 3A);
the purse pays exactly the merchant's amount at the PON's own checkout, and the bill line is
made as for any order. A PON is paid once: ``(merchant, PON)`` is unique in
``sp_merchant_orders``, written in the same step that admits the order (a row whose order
failed with nothing paid is taken over). The SP sends no wholesale order and relays no goods:
the merchant gives them to the customer, who holds the PON's pick-up secret.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ...kit.db import first_row, step
from ...kit.http import Refused, json_refusal, read_body, request_digest, shutting_down
from ...kit.request_log import note
from .. import db as D
from ..billing import log_event, reservation
from ..config import Item, SpConfig
from ..signing import (
    COPY_DOMAIN,
    MAX_SKEW,
    MERCHANT_HEADER,
    MERCHANT_ORDER_DOMAIN,
    MERCHANT_PON_DOMAIN,
    PON_DOMAIN,
    verify,
)
from . import orders as O

if TYPE_CHECKING:
    from .app import SpServer

PON_FIELDS = frozenset({"customer", "merchant", "pon", "max_amount", "sp", "order_key",
                        "created"})
ORDER_FIELDS = frozenset({"customer", "merchant", "sku", "max_amount", "sp", "order_key",
                          "created"})
COPY_FIELDS = frozenset({"merchant", "pon", "sku", "item", "amount", "currency_code",
                         "created", "order", "customer_signature"})
QUOTE_FIELDS = frozenset({"merchant", "pon", "sku", "item", "amount", "currency_code",
                          "customer", "state", "expires", "nonce"})
MAX_COPY = 4096
MAX_QUOTE = 4096
_PON = re.compile(r"[0-9a-f]{32}")
_SKU = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TAKEN = "taken"   # an Admission's state: the PON is another order's


def set_merchant_key(engine: Engine, merchant: str, public_key: bytes, now: int) -> None:
    """Set (or replace) the Ed25519 public key ``merchant`` signs its PON answers and order
    copies with."""
    with step(engine) as conn:
        k = D.merchant_keys.c
        if conn.execute(update(D.merchant_keys).where(k.merchant == merchant).values(
                public_key=public_key.hex(), updated=now)).rowcount == 0:
            conn.execute(insert(D.merchant_keys).values(
                merchant=merchant, public_key=public_key.hex(), updated=now))


def merchant_key(engine: Engine, merchant: str) -> bytes | None:
    row = first_row(engine, D.merchant_keys, merchant=merchant)
    return None if row is None else bytes.fromhex(row["public_key"])


def merchant_base(config: SpConfig, merchant: str) -> tuple[str, Item] | None:
    """The merchant's server (its checkout URL up to ``/v1/checkout``) and one of its catalogue
    items (for its fee and discount rule); None if the SP has no such merchant."""
    item = next((i for (m, _s), i in config.items.items() if m == merchant), None)
    if item is None:
        return None
    url = item.checkout_url
    if "/v1/checkout" in url:
        return url.split("/v1/checkout", 1)[0], item
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}", item


def priced(config: SpConfig, merchant: str, base: str, any_item: Item, pon: str, sku: str,
           name: str, amount: int) -> tuple[Item, tuple[str, str] | None]:
    """The order's terms, and why it must be refused (kind, reason) if it must: the catalogue's
    item if listed (its agreed price must be the merchant's amount, its ceiling not passed),
    else the merchant's amount as retail price with the merchant's fee and discount rule. The
    purse pays the merchant's amount exactly, at the PON's checkout."""
    listed = config.item(merchant, sku)
    checkout = f"{base}/v1/pon/{pon}/checkout"
    refuse = None
    if listed is None:
        item = Item(merchant, sku, name[:200] or sku, amount, amount, any_item.fee,
                    any_item.pass_on_percent, checkout, amount)
    else:
        item = Item(merchant, sku, listed.name, listed.retail, amount, listed.fee,
                    listed.pass_on_percent, checkout, amount)
        if listed.wholesale is not None and listed.wholesale != amount:
            refuse = ("price", f"the merchant asks {amount}, the agreed price of {sku} is "
                               f"{listed.wholesale} (minor units)")
        elif amount > listed.max_wholesale:
            refuse = ("price", f"the merchant asks {amount}, more than the SP pays for {sku} "
                               f"({listed.max_wholesale})")
    return item, refuse


def admit(engine: Engine, customer: str, order_key: str, item: Item, pon: str, kind: str,
          digest: str, currency_code: int, now: int,
          refuse: tuple[str, str] | None) -> O.Admission:
    """FIG. 2 step 203 for a merchant's order, in ONE step: billability and credit as in
    :func:`.orders.admit`, the merchant's order claimed (``(merchant, PON)`` unique), the
    order's row and its log event; or the order recorded ``rejected`` (``refuse``, or not
    billable) with the PON left unclaimed."""
    order_ref = "spo-" + secrets.token_hex(12)
    amount = reservation(item)
    c, mo = D.customers.c, D.merchant_orders.c
    row = {"order_ref": order_ref, "customer": customer, "order_key": order_key,
           "request_digest": digest, "merchant": item.merchant, "sku": item.sku,
           "item": item.name, "pass_on_percent": item.pass_on_percent,
           "max_wholesale": item.max_wholesale, "wholesale_agreed": item.wholesale,
           "checkout_url": item.checkout_url, "retail": item.retail, "fee": item.fee,
           "currency_code": currency_code, "attempts": 0, "created": now, "updated": now}
    log = {"merchant": item.merchant, "sku": item.sku, "pon": pon, "via": kind,
           "order_key": order_key, "merchant_amount": item.wholesale}
    try:
        with step(engine) as conn:
            reserved = refuse is None and conn.execute(update(D.customers).where(
                c.id == customer, c.state == D.ACTIVE, c.currency_code == currency_code,
                c.owed + c.open_total + c.reserved + amount <= c.credit_limit,
                ~O._overdue(customer, now)).values(
                reserved=c.reserved + amount, updated=now)).rowcount == 1
            if reserved:
                failed = select(D.orders.c.order_ref).where(D.orders.c.state == D.FAILED)
                claim = {"order_ref": order_ref, "kind": kind, "amount": item.wholesale,
                         "created": now}
                if conn.execute(update(D.merchant_orders).where(
                        mo.merchant == item.merchant, mo.merchant_ref == pon,
                        mo.order_ref.in_(failed)).values(**claim)).rowcount != 1:
                    conn.execute(insert(D.merchant_orders).values(
                        merchant=item.merchant, merchant_ref=pon, **claim))
                conn.execute(insert(D.orders).values(state=D.PAYING, reason="",
                                                     reserved=amount, **row))
                log_event(conn, order_ref, customer, "ordered", now, retail=item.retail,
                          fee=item.fee, reserved=amount, **log)
                return O.Admission(order_ref, D.PAYING)
            why, reason = refuse or O._why_not(conn, customer, amount, now, currency_code)
            conn.execute(insert(D.orders).values(state=D.REJECTED, reason=reason[:300],
                                                 reserved=0, **row))
            log_event(conn, order_ref, customer, "rejected", now, kind=why, reason=reason,
                      **log)
            return O.Admission(order_ref, D.REJECTED, reason, why)
    except IntegrityError:
        pass
    first = first_row(engine, D.orders, customer=customer, order_key=order_key)
    if first is not None:
        return O.Admission(first["order_ref"], "replay", first["state"])
    claimed = first_row(engine, D.merchant_orders, merchant=item.merchant, merchant_ref=pon)
    if claimed is None:
        raise Refused(409, 409, "the order could not be recorded; send it again with a new "
                                "order key")
    return O.Admission(claimed["order_ref"], TAKEN, "this PON is paid (or being paid) by "
                                                    "another order")


def earlier(engine: Engine, customer: str, order_key: str, merchant: str,
            pon: str) -> O.Admission | None:
    """An order this one repeats (its order key) or that holds its PON (not failed), read
    before the merchant is asked; :func:`admit` decides again in its own step."""
    first = first_row(engine, D.orders, customer=customer, order_key=order_key)
    if first is not None:
        return O.Admission(first["order_ref"], "replay", first["state"])
    claimed = first_row(engine, D.merchant_orders, merchant=merchant, merchant_ref=pon)
    if claimed is not None:
        holder = first_row(engine, D.orders, order_ref=claimed["order_ref"])
        if holder is None or holder["state"] != D.FAILED:
            return O.Admission(claimed["order_ref"], TAKEN, "this PON is paid (or being "
                                                            "paid) by another order")
    return None


def _max_amount(data: dict[str, Any]) -> int | None:
    value = data["max_amount"]
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or not 0 <= value < 2**40):
        raise Refused(400, 400, "max_amount: minor units (a whole number), or null")
    return value


def _fresh(created: Any, now_ms: int, what: str) -> None:
    if not isinstance(created, int) or abs(now_ms // 1000 - created) > MAX_SKEW:
        raise Refused(401, 401, f"{what} was made more than {MAX_SKEW} s from the SP's "
                                "clock: make it again")


def _refusal(admission: O.Admission) -> Response:
    """The answer to an order not paid: a replay or a PON taken (409), not billable (402)."""
    note(reason=admission.reason)
    if admission.state == D.REJECTED:
        return JSONResponse({"order": admission.order_ref, "state": D.REJECTED,
                             "kind": admission.kind, "reason": admission.reason},
                            status_code=402)
    replay = admission.state == "replay"
    return JSONResponse({"reason": "this order key was used already: the order is not taken "
                                   "twice" if replay else admission.reason,
                         "order": admission.order_ref,
                         "state": admission.reason if replay else TAKEN}, status_code=409)


class PonOrders:
    """The two routes of an :class:`~.app.SpServer` for orders the merchant already holds."""

    def __init__(self, server: SpServer) -> None:
        self.server = server

    async def _guarded(self, request: Request, handler: Any) -> Response:
        if self.server.draining:
            return json_refusal(shutting_down())
        try:
            return await handler(request)   # type: ignore[no-any-return]
        except Refused as exc:
            return json_refusal(exc)

    async def pon_order(self, request: Request) -> Response:
        return await self._guarded(request, self._pon_order)

    async def copy(self, request: Request) -> Response:
        return await self._guarded(request, self._copy)

    def _merchant(self, merchant: str) -> tuple[str, Item]:
        found = merchant_base(self.server.config, merchant)
        if found is None:
            raise Refused(404, 404, f"the SP pays no merchant {merchant}")
        return found

    async def _key(self, merchant: str) -> bytes:
        key = await self.server.sql(merchant_key, self.server.engine, merchant)
        if key is None:
            raise Refused(403, 403, f"the SP holds no key of merchant {merchant}: it takes no "
                                    "PONs or order copies from it")
        return key

    # --- FIG. 3B -------------------------------------------------------------------------
    async def _pon_order(self, request: Request) -> Response:
        s = self.server
        body, data, now = await s._authenticated(request, PON_FIELDS, PON_DOMAIN)
        pon, limit = data["pon"], _max_amount(data)
        if not isinstance(pon, str) or not _PON.fullmatch(pon):
            raise Refused(400, 400, "pon: 16 bytes of lower-case hex")
        base, any_item = self._merchant(data["merchant"])
        key = await self._key(data["merchant"])
        seen = await s.sql(earlier, s.engine, data["customer"], data["order_key"].lower(),
                           data["merchant"], pon)
        if seen is not None:
            return _refusal(seen)
        quote = await self._quote(base, data["merchant"], key, pon)
        if quote["customer"] != data["customer"]:
            raise Refused(403, 403, "the merchant made this PON for another customer")
        return await self._admit_and_pay(data["customer"], data["order_key"].lower(), pon,
                                         "pon", quote, base, any_item, limit,
                                         request_digest(body), now)

    async def _quote(self, base: str, merchant: str, key: bytes, pon: str) -> dict[str, Any]:
        """The merchant's signed answer about ``pon``, fresh (the SP's nonce), checked."""
        nonce = secrets.token_hex(16)
        url = f"{base}/v1/pon/{pon}"

        def ask() -> tuple[httpx.Response, bytes]:   # read at most MAX_QUOTE + 1 bytes
            deadline = time.monotonic() + 30
            with self.server.http.stream("GET", url, params={"nonce": nonce},
                                         timeout=30) as answer:
                got = bytearray()
                for chunk in answer.iter_bytes():
                    got += chunk
                    if len(got) > MAX_QUOTE or time.monotonic() > deadline:
                        break
                return answer, bytes(got)
        try:
            answer, signed = await asyncio.get_running_loop().run_in_executor(
                self.server.payments, ask)
        except Exception as exc:   # the merchant is down: nothing was paid
            raise Refused(502, 502, f"the merchant did not answer about the PON "
                                    f"({type(exc).__name__})") from None
        if answer.status_code == 404:
            raise Refused(404, 404, f"merchant {merchant} knows no such PON")
        if answer.status_code != 200 or len(signed) > MAX_QUOTE or not verify(
                key, signed, answer.headers.get(MERCHANT_HEADER), MERCHANT_PON_DOMAIN):
            raise Refused(502, 502, "the merchant's answer about the PON is not signed with "
                                    "its key: nothing paid")
        try:   # signed by the merchant, and still checked field by field
            quote = json.loads(signed)
        except (ValueError, RecursionError):
            quote = None
        if not isinstance(quote, dict) or set(quote) != QUOTE_FIELDS or \
                (quote["merchant"], quote["pon"], quote["nonce"]) != (merchant, pon, nonce) \
                or not isinstance(quote["expires"], int) or \
                not isinstance(quote["customer"], str):
            raise Refused(502, 502, "the merchant's answer is not about this PON or not fresh")
        if quote["state"] != "tentative":
            raise Refused(409, 409, "the merchant says this PON is paid already")
        if quote["expires"] <= self.server.now_ms() // 1000:
            raise Refused(410, 410, "the merchant says this PON has expired")
        return quote

    async def _admit_and_pay(self, customer: str, order_key: str, pon: str, kind: str,
                             terms: dict[str, Any], base: str, any_item: Item,
                             limit: int | None, digest: str, now: int) -> Response:
        s = self.server
        amount, sku = terms["amount"], terms["sku"]
        if not isinstance(amount, int) or isinstance(amount, bool) or not 0 < amount < 2**32 \
                or not isinstance(sku, str) or not _SKU.fullmatch(sku) \
                or not isinstance(terms["item"], str):
            raise Refused(502, 502, "the merchant's terms are malformed (sku, item, amount)")
        if terms["currency_code"] != s.config.currency_code:
            raise Refused(409, 409, f"the merchant asks currency {terms['currency_code']}, "
                                    f"the SP pays in {s.config.currency_code}")
        item, refuse = priced(s.config, any_item.merchant, base, any_item, pon, sku,
                              terms["item"], amount)
        if refuse is None and limit is not None and reservation(item) > limit:
            refuse = ("over_max", f"this order can be billed up to {reservation(item)}, more "
                                  f"than the {limit} the customer signed (minor units)")
        admission = await s.sql(admit, s.engine, customer, order_key, item, pon, kind, digest,
                                s.config.currency_code, now, refuse)
        note(txn=admission.order_ref, step=f"order-{kind}")
        if admission.state != D.PAYING:
            return _refusal(admission)
        return await s._pay(admission.order_ref)

    # --- the merchant's copy ------------------------------------------------------------------
    async def _copy(self, request: Request) -> Response:
        s = self.server
        if request.headers.get(MERCHANT_HEADER) is None:
            raise Refused(401, 401, f"a copy is signed by the merchant ({MERCHANT_HEADER})")
        body = await read_body(request, MAX_COPY)
        copy = O.parse_fields(body, COPY_FIELDS)   # merchant, sku and created checked there
        base, any_item = self._merchant(copy["merchant"])
        key = await self._key(copy["merchant"])
        if not verify(key, body, request.headers.get(MERCHANT_HEADER), COPY_DOMAIN):
            raise Refused(401, 401, "the copy is not signed with the merchant's key")
        now = s.now_ms()
        _fresh(copy["created"], now, "the copy")
        pon, order_text = copy["pon"], copy["order"]
        if not isinstance(pon, str) or not _PON.fullmatch(pon):
            raise Refused(400, 400, "pon: 16 bytes of lower-case hex")
        if not isinstance(order_text, str) or not isinstance(copy["customer_signature"], str):
            raise Refused(400, 400, "order, customer_signature: strings")
        try:
            order = order_text.encode()
        except UnicodeEncodeError:
            raise Refused(400, 400, "order: not UTF-8 text") from None
        data = O.parse_fields(order, ORDER_FIELDS)
        note(party=data["customer"])
        customer_key = await s.sql(O.customer_key, s.engine, data["customer"])
        if customer_key is None:
            raise Refused(403, 403, "no account with this service provider")
        if not verify(customer_key, order, copy["customer_signature"], MERCHANT_ORDER_DOMAIN):
            raise Refused(401, 401, "the customer's signature on the order does not verify")
        s.check_sp(data["sp"])
        _fresh(data["created"], now, "the customer's order")
        if (data["merchant"], data["sku"]) != (copy["merchant"], copy["sku"]):
            raise Refused(400, 400, "the copy does not match the customer's signed order "
                                    "(merchant, sku)")
        return await self._admit_and_pay(data["customer"], data["order_key"].lower(), pon,
                                         "copy", copy, base, any_item, _max_amount(data),
                                         request_digest(order), now)
