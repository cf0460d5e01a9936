"""The payment server of seed 000: it routes the merchant's digital order to the authentication
server, takes the device's authorisation back from it, has the financial institution pay, and
tells the fulfilment server (which answers the write of the good) and the merchant.

``POST /v1/orders`` (merchant, ``DIGITAL_ORDER``): kept as ``routed`` with the merchant's
signed text, then relayed (``ROUTED_ORDER``) to the authentication server; its answer says
whether the device was offered it.
``POST /v1/authorisations`` (authentication server, ``RELAYED_AUTH``): ``routed`` ->
``authorising`` (the card recorded) in one step, then ``PAYMENT`` to the institution; its
signed decision moves the order to ``paid`` or ``declined``. Paid: the fulfilment server gets
``PAID`` with the merchant's digital order and the institution's signed confirmation (it
trusts neither this server's word on the good nor on the payment) and answers the write for
the device's challenge; then the merchant is told. A retried authorisation of an order still
``authorising`` asks the institution again (it pays an order once); of a ``paid`` one, asks
the fulfilment server again (a new challenge, the same good).
``POST /v1/refunds`` (fulfilment, ``REFUND``): the institution refunds a good never written.
"""

from __future__ import annotations

import contextlib
from typing import Any

import httpx
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ....reader import Reader
from ...kit.db import reading, step
from ...kit.http import Refused
from .. import db as D
from .. import wire as W
from .common import REPLY, Unreachable, handled, read_one
from .psam_batches import close_batches
from .psams import GoodsPsamPool
from .purse_pay import PursePayment

DIGITAL_FIELDS: dict[str, W.Checker] = {
    "order": W.ORDER, "merchant": W.IDENT, "sku": W.IDENT, "name": W.text(100),
    "kind": W.pattern(r"ticket|coupon|transit|voucher"), "amount": W.AMOUNT,
    "currency": W.CURRENCY, "device": W.DEVICE, "record": W.RECORD, "created": W.SECONDS}
RELAYED_FIELDS: dict[str, W.Checker] = {
    "order": W.ORDER, "device": W.DEVICE, "approve": W.BOOL, "card": W.SERIAL,
    "issuer": W.ISSUER, "pin": W.SEALED, "challenge": W.CHALLENGE, "created": W.SECONDS}
REFUND_FIELDS: dict[str, W.Checker] = {"order": W.ORDER, "amount": W.AMOUNT,
                                       "created": W.SECONDS}
STATUS_AFTER = 60   # s an order stays ``authorising`` before recovery asks the institution


class PaymentServer(PursePayment):
    role = "payment"
    health_table = D.payment_orders

    def __init__(self, *args: Any, psams: list[Reader] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pool = GoodsPsamPool(psams) if psams else None

    async def starting(self) -> None:
        if self.pool is not None:
            await self.pool.start(self.system.currency_code)

    def stopping(self) -> None:
        if self.pool is not None:
            self.pool.close()

    # --- the digital order ------------------------------------------------------------------
    async def orders(self, request: Request) -> Response:
        async def work() -> Response:
            body, data, _ = await self.authenticated(request, DIGITAL_FIELDS, "digital order",
                                                     W.DIGITAL_ORDER, ("merchant",))
            if data["merchant"] != self.system.peer("merchant").id:
                raise Refused(403, 403, "digital order: a merchant orders in its own name")
            if data["currency"] != self.system.currency_code:
                raise Refused(400, 400, "digital order: not this system's currency")
            signature = request.headers[W.SIGNATURE]
            fresh = await self.sql(self._insert, data, body.decode(), signature)
            if not fresh:
                raise Refused(409, 409, "digital order: this order was routed already")
            offered, reason = await self._route(data["order"], body.decode(), signature,
                                                tell=False)   # it hears from the answer
            return self.reply(W.DIGITAL_ORDER, {"order": data["order"], "offered": offered,
                                                "reason": reason})
        return await handled(work)

    async def _route(self, order: str, text: str, signature: str,
                     http: httpx.AsyncClient | None = None, *, tell: bool = True,
                     ) -> tuple[bool, str]:
        """Route ``order`` to the authentication server: offered (marked so, recovery stops
        routing it), or not (no such device: ``declined``); :class:`Unreachable` leaves it
        ``routed`` and unmarked, for :meth:`tick` to route again."""
        decision = await self.send("auth", "/v1/orders", W.ROUTED_ORDER, {
            "digital_order": text, "merchant_signature": signature,
            "terminal": self.terminal, "created": self.now_ms() // 1000}, http)
        reason = str(decision.get("reason", ""))[:200]
        offered = decision.get("order") == order and (   # offered already: an answer lost
            decision.get("offered") is True or reason == "offered already")
        if offered:
            await self.sql(self._mark_offered, order)
        elif await self.sql(self._set, order, D.ROUTED, D.DECLINED) and tell:
            await self._tell_merchant(order, D.DECLINED, reason or "not offered", http)
        return offered, reason

    def _mark_offered(self, order: str) -> None:
        """An order ``routed`` with ``updated == created`` was never offered (db.py)."""
        t = D.payment_orders
        with step(self.engine) as conn:
            conn.execute(update(t).where(t.c.order_ref == order, t.c.state == D.ROUTED,
                                         t.c.updated == t.c.created)
                         .values(updated=t.c.created + 1))

    def _decline_unrouted(self, order: str) -> bool:
        t = D.payment_orders
        with step(self.engine) as conn:
            done = conn.execute(update(t).where(
                t.c.order_ref == order, t.c.state == D.ROUTED, t.c.updated == t.c.created)
                .values(state=D.DECLINED, updated=self.now_ms()))
        return int(done.rowcount or 0) == 1

    async def route_tick(self, http: httpx.AsyncClient) -> None:
        """Orders whose routing got no answer (the authentication server down): routed again
        for ``route_seconds``, then ``declined`` (no money moved: nothing was authorised);
        orders offered and not authorised for ``offer_seconds``: ``expired``. The merchant is
        told each (signed, as any decline)."""
        t, now = D.payment_orders, self.now_ms()
        with reading(self.engine) as conn:
            unrouted = conn.execute(select(t.c.order_ref, t.c.created, t.c.digital_order,
                                           t.c.merchant_signature).where(
                t.c.state == D.ROUTED, t.c.updated == t.c.created).limit(1000)).all()
            stale = conn.execute(select(t.c.order_ref).where(
                t.c.state == D.ROUTED,
                t.c.created < now - self.system.offer_seconds * 1000).limit(1000)).all()
        for order, created, text, signature in unrouted:
            if created < now - self.system.route_seconds * 1000:
                if await self.sql(self._decline_unrouted, order):
                    await self._tell_merchant(order, D.DECLINED, "never routed: the "
                                              "authentication server did not answer; no "
                                              "money moved", http)
                continue
            with contextlib.suppress(Unreachable):   # still down: the next tick
                await self._route(order, text, signature, http)
        for (order,) in stale:
            if await self.sql(self._set, order, D.ROUTED, D.EXPIRED):
                await self._tell_merchant(order, D.EXPIRED, "not authorised in time; no "
                                          "money moved", http)

    def _insert(self, data: dict[str, Any], text: str, signature: str) -> bool:
        now = self.now_ms()
        try:
            with step(self.engine) as conn:
                conn.execute(insert(D.payment_orders).values(
                    order_ref=data["order"], state=D.ROUTED, merchant=data["merchant"],
                    amount=data["amount"], currency_code=data["currency"],
                    device=data["device"], digital_order=text, merchant_signature=signature,
                    created=now, updated=now))
        except IntegrityError:
            return False
        return True

    def _set(self, order: str, expect: str, state: str, **values: Any) -> bool:
        with step(self.engine) as conn:
            done = conn.execute(update(D.payment_orders).where(
                D.payment_orders.c.order_ref == order, D.payment_orders.c.state == expect)
                .values(state=state, updated=self.now_ms(), **values))
        return int(done.rowcount or 0) == 1

    def _paid(self, order: str, card: str, text: str, signature: str) -> bool:
        """The institution's signed confirmation moves the order to ``paid`` from any state
        before it: a racing authorisation's answer (a wrong PIN put it back to ``routed``, a
        decline, an expiry after that) must not leave a payment made with no paid order (no
        good, no refund)."""
        t = D.payment_orders
        with step(self.engine) as conn:
            done = conn.execute(update(t).where(
                t.c.order_ref == order,
                t.c.state.in_((D.ROUTED, D.AUTHORISING, D.DECLINED, D.EXPIRED)))
                .values(state=D.PAID, card=card, confirmation=text,
                        confirmation_signature=signature, updated=self.now_ms()))
        return int(done.rowcount or 0) == 1

    # --- the authorisation --------------------------------------------------------------------
    async def authorisations(self, request: Request) -> Response:
        async def work() -> Response:
            _, data, _ = await self.authenticated(request, RELAYED_FIELDS, "authorisation",
                                                  W.RELAYED_AUTH, ("auth",))
            return self.reply(W.RELAYED_AUTH, await self._authorise(data))
        return await handled(work)

    async def _authorise(self, data: dict[str, Any]) -> dict[str, Any]:
        order = data["order"]
        row = await self.sql(read_one, self.engine, D.payment_orders, order_ref=order)
        if row is None:
            raise Refused(404, 404, "authorisation: no such order")
        if row["device"] != data["device"]:
            raise Refused(403, 403, "authorisation: not the order's device")
        if row["state"] == D.EXPIRED:
            raise Refused(410, 410, "authorisation: the order expired (not authorised in "
                                    "time)")
        if not data["approve"]:
            if await self.sql(self._set, order, D.ROUTED, D.DECLINED):
                await self._tell_merchant(order, D.DECLINED, "the customer declined")
            return {"order": order, "paid": False, "reason": "the customer declined"}
        if row["state"] == D.ROUTED:
            if not await self.sql(self._set, order, D.ROUTED, D.AUTHORISING, card=data["card"]):
                row = await self.sql(read_one, self.engine, D.payment_orders, order_ref=order)
                assert row is not None
            else:
                row = {**row, "state": D.AUTHORISING, "card": data["card"]}
        if row["card"] != data["card"]:
            raise Refused(409, 409, "authorisation: the order is being paid with another card")
        if row["state"] == D.AUTHORISING:
            decision, text, signature = await self.send_raw("bank", "/v1/payments", W.PAYMENT, {
                "order": order, "card": data["card"], "amount": row["amount"],
                "currency": row["currency_code"], "merchant": row["merchant"],
                "pin": data["pin"], "created": self.now_ms() // 1000})
            if decision.get("order") != order or not isinstance(decision.get("paid"), bool):
                raise Unreachable("bank: a decision about another order")
            if not decision["paid"]:
                reason = str(decision.get("reason", "declined"))[:200]
                if decision.get("final", True) and \
                        await self.sql(self._set, order, D.AUTHORISING, D.DECLINED):
                    await self._tell_merchant(order, D.DECLINED, reason)
                elif not decision.get("final", True):   # a wrong PIN: the device may retry
                    await self.sql(self._set, order, D.AUTHORISING, D.ROUTED, card=None)
                return {"order": order, "paid": False, "reason": reason,
                        "retry": not decision.get("final", True)}
            if decision.get("amount") != row["amount"] or not W.SERIAL(decision.get("card")):
                raise Unreachable("bank: a confirmation of another amount or no card")
            await self.sql(self._paid, order, decision["card"], text, signature)
            row = await self.sql(read_one, self.engine, D.payment_orders, order_ref=order)
            assert row is not None
            await self._tell_merchant(order, D.PAID, "paid by the institution")
        if row["state"] != D.PAID:
            return {"order": order, "paid": False, "reason": f"the order is {row['state']}"}
        write = await self._to_fulfil(row, data["challenge"])
        return {"order": order, "paid": True, "apdu": write.get("apdu"),
                "state": write.get("state")}

    async def _to_fulfil(self, row: dict[str, Any], challenge: str,
                         http: httpx.AsyncClient | None = None) -> dict[str, Any]:
        """Give the fulfilment server the paid good (with a write for ``challenge``, if any);
        once it has it, the order is marked so recovery stops telling it."""
        order = row["order_ref"]
        write = await self.send("fulfil", "/v1/goods", W.PAID, {
            "order": order, "card": row["card"], "device": row["device"],
            "challenge": challenge, "digital_order": row["digital_order"],
            "merchant_signature": row["merchant_signature"],
            "confirmation": row["confirmation"],
            "confirmation_signature": row["confirmation_signature"],
            "created": self.now_ms() // 1000}, http)
        if write.get("order") != order:
            raise Unreachable("fulfil: an answer about another order")
        if row["answer"] is None:
            await self.sql(self._set, order, D.PAID, D.PAID, answer="kept")
        return write

    async def tick(self, http: httpx.AsyncClient) -> None:
        """Orders ``authorising`` for over :data:`STATUS_AFTER` s (the institution's answer
        lost): the institution asked whether it paid; paid orders the fulfilment server was
        never told of (it was down), and outcomes the merchant missed: told now."""
        t = D.payment_orders
        with reading(self.engine) as conn:
            stuck = conn.execute(select(t).where(
                t.c.state == D.AUTHORISING, t.c.updated < self.now_ms() - STATUS_AFTER * 1000)
                .limit(1000)).all()
        for row in stuck:
            with contextlib.suppress(Unreachable):   # the bank down: the next tick asks
                await self._ask_bank(dict(row._mapping), http)
        with reading(self.engine) as conn:
            rows = conn.execute(select(t).where(t.c.state == D.PAID, t.c.answer.is_(None))
                                .limit(1000)).all()
        for row in rows:
            await self._to_fulfil(dict(row._mapping), "", http)
        with reading(self.engine) as conn:
            untold = conn.execute(select(t.c.order_ref, t.c.state).where(
                t.c.state.in_((D.PAID, D.DECLINED, D.REFUNDED, D.PURSE_PAID, D.EXPIRED)),
                t.c.merchant_told.is_(None) | (t.c.merchant_told != t.c.state)).limit(1000)
            ).all()
        for order, state in untold:
            await self._tell_merchant(order, state, "told again", http)
        await self.route_tick(http)
        await self.purse_tick(http)

    async def _ask_bank(self, row: dict[str, Any], http: httpx.AsyncClient) -> None:
        """The institution's word on an order whose payment answer was lost: paid, with its
        signed confirmation (checked here, and again by the fulfilment server) -> ``paid``."""
        order = row["order_ref"]
        status = await self.send("bank", "/v1/payments/status", W.PAYMENT_STATUS, {
            "order": order, "created": self.now_ms() // 1000}, http)
        text, signature = status.get("confirmation"), status.get("confirmation_signature")
        if status.get("order") != order or status.get("paid") is not True or not (
                isinstance(text, str) and W.verify(self.system.peer("bank").public_key,
                                                   REPLY + W.PAYMENT, text.encode(),
                                                   signature)):
            return
        decision = W.canonical_load(text.encode())
        if decision.get("order") != order or decision.get("paid") is not True or \
                decision.get("amount") != row["amount"] or not W.SERIAL(decision.get("card")):
            return
        if await self.sql(self._paid, order, decision["card"], text, str(signature)):
            await self._tell_merchant(order, D.PAID, "paid by the institution (recovered)",
                                      http)

    async def _tell_merchant(self, order: str, state: str, reason: str,
                             http: httpx.AsyncClient | None = None) -> None:
        """Tell the merchant; one it could not reach is told again by :meth:`tick`."""
        with contextlib.suppress(Unreachable):
            await self.send("merchant", "/v1/paid", W.PAID, {
                "order": order, "state": state, "reason": reason,
                "created": self.now_ms() // 1000}, http)
            await self.sql(self._told, order, state)

    def _told(self, order: str, state: str) -> None:
        t = D.payment_orders
        with step(self.engine) as conn:
            conn.execute(update(t).where(t.c.order_ref == order, t.c.state == state)
                         .values(merchant_told=state))

    # --- refunds ------------------------------------------------------------------------------
    async def refunds(self, request: Request) -> Response:
        async def work() -> Response:
            _, data, _ = await self.authenticated(request, REFUND_FIELDS, "refund", W.REFUND,
                                                  ("fulfil",))
            order = data["order"]
            row = await self.sql(read_one, self.engine, D.payment_orders, order_ref=order)
            if row is None or row["state"] not in (D.PAID, D.REFUNDED):
                raise Refused(409, 409, "refund: the order is not paid")
            if row["amount"] != data["amount"]:
                raise Refused(409, 409, "refund: not the amount paid")
            decision = await self.send("bank", "/v1/refunds", W.REFUND, {
                "order": order, "amount": row["amount"], "created": self.now_ms() // 1000})
            if decision.get("order") != order or decision.get("refunded") is not True:
                raise Unreachable("bank: the refund was not confirmed")
            if await self.sql(self._set, order, D.PAID, D.REFUNDED):
                await self._tell_merchant(order, D.REFUNDED, "not picked up in time")
            return self.reply(W.REFUND, {"order": order, "refunded": True})
        return await handled(work)

    async def batches_close(self, request: Request) -> Response:
        """The PSAMs' batches to clearing (:mod:`.psam_batches`)."""
        return await close_batches(self, request)

    def routes(self) -> list[Route]:
        return [Route("/v1/orders", self.orders, methods=["POST"]),
                Route("/v1/batches/close", self.batches_close, methods=["POST"]),
                Route("/v1/authorisations", self.authorisations, methods=["POST"]),
                Route("/v1/purse/debits", self.purse_debits, methods=["POST"]),
                Route("/v1/purse/proofs", self.purse_proofs, methods=["POST"]),
                Route("/v1/refunds", self.refunds, methods=["POST"])]
