"""The merchant server of seed 000 (claim 1: it takes a purchase order and makes the digital
order; claim 23: the order names the customer's communication device).

``POST /v1/orders`` (the customer, JSON ``{"sku", "device", "customer_ref"}``; unauthenticated,
so nothing in it is trusted but the device it names, which must then authorise the payment
itself): the price, the kind of good and the goods record come from the merchant's catalogue.
The digital order (order id, merchant, item, amount, currency, device id, the goods record) is
signed by the merchant and sent to the payment server, which routes it on. The answer tells
the customer the order id and whether the device was offered it.

``POST /v1/paid`` (the payment server, signed): the order was paid, declined or refunded.
``GET /v1/orders/{order}``: the order's state.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

from sqlalchemy import insert, update
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ....protocols import goods as G
from ....protocols import purse as P
from ...kit.db import step
from ...kit.http import Refused, read_json
from .. import db as D
from .. import wire as W
from ..config import Item
from .common import PartyServer, handled, read_one, take_quota

PAID_FIELDS = {"order": W.ORDER, "state": W.pattern(r"paid|declined|refunded|purse_paid|expired"),
               "reason": W.text(200), "created": W.SECONDS}


def good_record(item: Item, issuer: bytes, order: str, today: dt.date) -> bytes:
    """The goods record of ``item`` for ``order`` (its good id: the order id's first 8 bytes),
    valid from ``today`` for the item's days."""
    head: dict[str, Any] = {
        "issuer_id": issuer, "good_id": bytes.fromhex(order)[:8],
        "valid_from": P.bcd_date(today),
        "valid_to": P.bcd_date(today + dt.timedelta(days=item.valid_days - 1))}
    if item.kind == "ticket":
        return G.build("ticket", **head, value=item.value, reference=bytes(8))
    if item.kind == "coupon":
        return G.build("coupon", **head, value=item.value, min_spend=0)
    if item.kind == "transit":
        return G.build("transit", **head, rides_left=item.rides, rides_total=item.rides,
                       fare=item.price // item.rides)
    return G.build("voucher", **head, value=item.value, code=secrets.token_bytes(10))


class MerchantServer(PartyServer):
    role = "merchant"
    health_table = D.merchant_orders

    async def order(self, request: Request) -> Response:
        return await handled(lambda: self._order(request))

    async def _order(self, request: Request) -> Response:
        if self.draining:
            raise Refused(503, 503, "the server is shutting down; retry")
        data = await read_json(request, 1024)
        if not isinstance(data, dict) or set(data) - {"sku", "device", "customer_ref"}:
            raise Refused(400, 400, "an order is {sku, device, customer_ref}")
        if not W.DEVICE(data.get("device")):
            raise Refused(400, 400, "device: a device id (32 hex digits)")
        ref = data.get("customer_ref", "")
        if not isinstance(ref, str) or len(ref) > 64 or not ref.isprintable():
            raise Refused(400, 400, "customer_ref: at most 64 printable characters")
        item = self.system.items.get(data.get("sku")) if isinstance(data.get("sku"), str) \
            else None
        if item is None:
            raise Refused(404, 404, "no such item")
        order = secrets.token_hex(16)
        now = self.now_ms()
        record = good_record(item, self.system.merchant_issuer, order,
                             dt.datetime.fromtimestamp(now / 1000).date())
        await self.sql(self._insert, order, item, data["device"], ref, now)
        digital = {"order": order, "merchant": self.me, "sku": item.sku,
                   "name": item.name or item.sku, "kind": item.kind, "amount": item.price,
                   "currency": self.system.currency_code, "device": data["device"],
                   "record": record.hex().upper(), "created": now // 1000}
        decision = await self.send("payment", "/v1/orders", W.DIGITAL_ORDER, digital)
        offered = decision.get("order") == order and decision.get("offered") is True
        if not offered:
            await self.sql(self._set, order, D.ROUTED, D.DECLINED)
        return JSONResponse({"order": order, "offered": offered, "amount": item.price,
                             "currency": self.system.currency_code,
                             "reason": str(decision.get("reason", ""))[:200]},
                            status_code=200 if offered else 409)

    def _insert(self, order: str, item: Item, device: str, ref: str, now: int) -> None:
        with step(self.engine) as conn:
            if not take_quota(conn, D.merchant_quotas, device, self.system.orders_per_device,
                              now):
                raise Refused(429, 429, f"at most {self.system.orders_per_device} orders "
                                        "naming one device a minute; retry later",
                              {"Retry-After": "60"})
            conn.execute(insert(D.merchant_orders).values(
                order_ref=order, state=D.ROUTED, sku=item.sku, amount=item.price,
                currency_code=self.system.currency_code, device=device, customer_ref=ref,
                created=now, updated=now))

    def _set(self, order: str, expect: str, state: str) -> bool:
        with step(self.engine) as conn:
            done = conn.execute(update(D.merchant_orders).where(
                D.merchant_orders.c.order_ref == order, D.merchant_orders.c.state == expect)
                .values(state=state, updated=self.now_ms()))
        return int(done.rowcount or 0) == 1

    async def paid(self, request: Request) -> Response:
        async def work() -> Response:
            _body, data, _role = await self.authenticated(
                request, PAID_FIELDS, "paid notice", W.PAID, ("payment",))
            # paid also after declined: the payment server takes the institution's signed
            # "paid" even when a racing authorisation's decline came first
            # purse_paid also after expired: a late proof of the card's debit still pays
            expects = {D.REFUNDED: (D.PAID,), D.PAID: (D.ROUTED, D.DECLINED, D.EXPIRED),
                       D.PURSE_PAID: (D.ROUTED, D.EXPIRED)}.get(data["state"], (D.ROUTED,))
            changed = False
            for expect in expects:
                if await self.sql(self._set, data["order"], expect, data["state"]):
                    changed = True
                    break
            return self.reply(W.PAID, {"order": data["order"], "changed": changed})
        return await handled(work)

    async def show(self, request: Request) -> Response:
        order = request.path_params["order"]
        if not W.ORDER(order):
            return JSONResponse({"reason": "no such order"}, status_code=404)
        row = await self.sql(read_one, self.engine, D.merchant_orders, order_ref=order)
        if row is None:
            return JSONResponse({"reason": "no such order"}, status_code=404)
        return JSONResponse({k: row[k] for k in ("order_ref", "state", "sku", "amount",
                                                 "currency_code", "device")})

    def routes(self) -> list[Route]:
        return [Route("/v1/orders", self.order, methods=["POST"]),
                Route("/v1/orders/{order}", self.show, methods=["GET"]),
                Route("/v1/paid", self.paid, methods=["POST"])]
