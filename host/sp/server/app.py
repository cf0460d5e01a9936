"""The service provider's server (seed 001, FIG. 1 computer 110, FIG. 3A proxy server 302).

``POST /v1/orders``: a customer's signed retail order (``orders.py``) is checked for
billability with its credit reserved, then paid as a wholesale order at the merchant's checkout
by the SP's purse pool and billed (``payment.py``, ``billing.py``); the answer relays the
merchandise and the merchant's receipt with the bill line. ``GET /v1/catalogue``: what the SP
sells, at its retail prices. ``GET /v1/health``, ``GET /openapi.json``. ``POST /v1/orders/pon``
(FIG. 3B) and ``POST /v1/orders/copy`` (the merchant's copy): orders the merchant already holds,
only paid and billed here (``pon.py``).

Answers (JSON): 200 billed (``goods``, ``receipt``, ``line``); 400 a malformed request; 401 a
signature that does not verify or a request too old or too new; 402 not billable (``kind``:
``blocked``, ``bad_history``, ``credit_limit``), nothing paid; 403 no account; 404 no such
item; 409 a replayed order key (the order it repeats and its state); 502 the payment's outcome
is unknown (the order is kept and finished by recovery; never paid twice); 503 the SP could not
pay (nothing paid) or is shutting down or its database is unavailable.

Every order's steps are database rows; at start (and every ``billing.check_seconds``) the
server bills what was paid and not billed, asks the pool again about orders whose payment's
outcome is unknown, and issues the bills of ended periods.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...kit.db import first_row
from ...kit.health import HealthCheck, database_check
from ...kit.http import (
    JSON_STORAGE_ERROR_HANDLERS,
    Refused,
    SqlRunner,
    json_refusal,
    openapi_route,
    read_body,
    request_digest,
    shutting_down,
)
from ...kit.request_log import RequestLog, note
from ...kit.serving import with_writer_drained
from .. import db as D
from ..billing import bill_order, close_ended_periods
from ..config import SpConfig
from ..purses.pool import PursePool
from ..signing import DOMAIN, HEADER, LOOKUP_DOMAIN, MAX_SKEW, verify
from . import orders as O
from .payment import MAX_ATTEMPTS, Payer, open_orders, pay_order, record_failed
from .pon import PonOrders

log = logging.getLogger("svcard.sp")
LINE_FIELDS = ("retail", "wholesale", "fee", "discount", "billed", "currency_code")
# an order left ``paying`` (the SP stopped before any pool claimed it) is paid at a restart
# only while its request would still be taken (MAX_SKEW): later, it fails with nothing paid
STALE_MS = MAX_SKEW * 1000


class SpServer:
    def __init__(self, config: SpConfig, payer: Payer | None, *, pay_workers: int = 16,
                 clock: Callable[[], float] = time.time,
                 http: httpx.Client | None = None) -> None:
        self.config = config
        self.clock = clock
        self.engine = D.make_engine(config.db_url)
        self.http = http or httpx.Client(timeout=30)
        self.pool: PursePool | None = None
        if payer is None:   # the configured purse pool, sharing the SP's database; what an
            try:            # interruption left open in its journals is finished now
                if config.purses is None:
                    raise ValueError("purses: no purse pool configured")
                self.pool = PursePool.open(config.purses, self.engine,
                                           journal_dir=config.journal_dir, http=self.http)
            except BaseException:
                if http is None:
                    self.http.close()
                self.engine.dispose()
                raise
            payer = self.pool
        self.payer: Payer = payer
        self.sql = SqlRunner(config.db_url)
        self.payments = ThreadPoolExecutor(pay_workers, thread_name_prefix="sp-pay")
        self.draining = False
        self.in_flight = 0
        self.health_check = HealthCheck(
            "sp", {"database": database_check(self.engine, D.customers)},
            lambda: {"orders_in_flight": self.in_flight}, lambda: self.draining)

    # --- the drain (kit/serving.py) -----------------------------------------------------
    def begin_drain(self) -> None:
        self.draining = True

    def pending(self) -> int:
        return self.in_flight

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def close(self) -> None:
        self.payments.shutdown(wait=True)
        if self.sql.executor is not None:
            self.sql.executor.shutdown(wait=True)
        self.http.close()
        if self.pool is not None:
            self.pool.close()
        self.engine.dispose()

    # --- recovery and the billing clock ---------------------------------------------------
    def recover(self, states: tuple[str, ...] = (D.PAID, D.PAYING, D.IN_DOUBT)) -> dict[str, int]:
        """Bill every ``paid`` order; ask the pool again about each ``paying``/``in_doubt``
        one (same ``order_ref``: its recorded payment, never a second) and bill it if paid;
        issue the bills of ended periods. Counts of what was done."""
        b = self.config.billing
        done = {"billed": 0, "paid": 0, "failed": 0, "in_doubt": 0, "bills": 0}
        for order in open_orders(self.engine, tuple(s for s in states if s != D.PAID)):
            if int(order["attempts"]) >= MAX_ATTEMPTS:
                done["in_doubt"] += 1
                continue
            if order["state"] == D.PAYING and order["created"] < self.now_ms() - STALE_MS and \
                    record_failed(self.engine, order["order_ref"], "the SP stopped before "
                                  "paying it, and the order is too old to pay now"):
                done["failed"] += 1   # never claimed by a pool: nothing paid, credit back
                continue
            state, _outcome, _reason = pay_order(self.engine, self.payer, self.http, order)
            if state in (D.PAID, D.FAILED, D.IN_DOUBT):
                done[state] += 1
        if D.PAID in states or done["paid"]:
            for order in open_orders(self.engine, (D.PAID,)):
                if bill_order(self.engine, order["order_ref"], b.maximum, b.due_days,
                              self.now_ms()) is not None:
                    done["billed"] += 1
        done["bills"] = len(close_ended_periods(self.engine, b.period, b.due_days,
                                                self.now_ms()))
        return done

    async def _clock(self) -> None:
        while True:
            await asyncio.sleep(self.config.billing.check_seconds)
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self.payments, lambda: self.recover((D.PAID, D.IN_DOUBT)))
            except Exception:   # the next tick tries again; never kills the server
                log.exception("billing clock")

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        done = await asyncio.get_running_loop().run_in_executor(self.payments, self.recover)
        if any(done.values()):
            log.info("recovered: %s", done, extra=done)
        task = asyncio.create_task(self._clock())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- POST /v1/orders ------------------------------------------------------------------
    async def order(self, request: Request) -> Response:
        if self.draining:
            return json_refusal(shutting_down())
        try:
            return await self._order(request)
        except Refused as exc:
            return json_refusal(exc)

    async def _authenticated(self, request: Request, fields: frozenset[str],
                             domain: bytes) -> tuple[bytes, dict[str, Any], int]:
        """A customer's request: bounded, its fields checked, signed by the customer's key
        (``domain`` tells an order's signature from a lookup's), made within MAX_SKEW of the
        SP's clock. (body, fields, now in ms)."""
        body = await read_body(request, O.MAX_ORDER_BODY)
        data = O.parse_fields(body, fields)
        note(party=data["customer"])
        key = await self.sql(O.customer_key, self.engine, data["customer"])
        if key is None:
            raise Refused(403, 403, "no account with this service provider")
        if not verify(key, body, request.headers.get(HEADER), domain):
            raise Refused(401, 401, "the request's signature does not verify")
        self.check_sp(data["sp"])
        now = self.now_ms()
        if abs(now // 1000 - int(data["created"])) > MAX_SKEW:
            raise Refused(401, 401, f"the request was made more than {MAX_SKEW} s from the "
                                    "SP's clock: make it again")
        return body, data, now

    def check_sp(self, named: str) -> None:
        """A customer's signed request names the SP it is for: this one, or 401 (one key at
        two SPs: an order for one is never paid by the other)."""
        if named != self.config.name:
            raise Refused(401, 401, f"the request is signed for service provider {named!r}, "
                                    f"not this one ({self.config.name!r})")

    async def _order(self, request: Request) -> Response:
        body, _data, now = await self._authenticated(request, O.FIELDS, DOMAIN)
        req = O.parse_order(body)
        item = self.config.item(req.merchant, req.sku)
        if item is None:
            raise Refused(404, 404, f"the SP sells no {req.sku} of {req.merchant}")
        admission = await self.sql(O.admit, self.engine, req, item, request_digest(body),
                                   self.config.currency_code, now)
        note(txn=admission.order_ref, step="order")
        if admission.state == "replay":
            return JSONResponse({"reason": "this order key was used already: the order is "
                                           "not taken twice", "order": admission.order_ref,
                                 "state": admission.reason}, status_code=409)
        if admission.state == D.REJECTED:
            note(reason=admission.reason)
            return JSONResponse({"order": admission.order_ref, "state": D.REJECTED,
                                 "kind": admission.kind, "reason": admission.reason},
                                status_code=402)
        return await self._pay(admission.order_ref)

    async def _pay(self, order_ref: str) -> Response:
        self.in_flight += 1
        try:
            order = await self.sql(first_row, self.engine, D.orders, order_ref=order_ref)
            assert order is not None
            loop = asyncio.get_running_loop()
            state, outcome, reason = await loop.run_in_executor(
                self.payments, pay_order, self.engine, self.payer, self.http, order)
            if state == D.FAILED:
                return JSONResponse({"order": order_ref, "state": state, "reason": reason},
                                    status_code=503, headers={"Retry-After": "5"})
            if state not in (D.PAID, D.BILLED) or outcome is None:
                return JSONResponse({"order": order_ref, "state": state, "reason": reason
                                     or "the payment's outcome is not known yet"},
                                    status_code=502)
            b = self.config.billing
            line = await self.sql(bill_order, self.engine, order_ref, b.maximum, b.due_days,
                                  self.now_ms())
            if line is None:   # billed already (another SP process's recovery got there)
                line = await self.sql(first_row, self.engine, D.bill_lines,
                                      order_ref=order_ref)
        finally:
            self.in_flight -= 1
        body: dict[str, Any] = {"order": order_ref, "state": D.BILLED if line else state,
                                "goods": outcome.goods, "item": outcome.item,
                                "receipt": outcome.receipt}
        if line is not None:
            body["line"] = {k: line[k] for k in LINE_FIELDS}
            if line.get("bill_id") is not None:
                body["bill"] = line["bill_id"]
        return JSONResponse(body)

    # --- POST /v1/orders/lookup ---------------------------------------------------------
    async def lookup(self, request: Request) -> Response:
        """A customer's own order by its order key: its state, and once billed the goods, the
        merchant's receipt and the bill line (the relay of an order that recovery finished)."""
        try:
            _body, data, _now = await self._authenticated(request, O.LOOKUP_FIELDS,
                                                          LOOKUP_DOMAIN)
        except Refused as exc:
            return json_refusal(exc)
        found = await self.sql(first_row, self.engine, D.orders, customer=data["customer"],
                               order_key=str(data["order_key"]).lower())
        if found is None:
            return json_refusal(Refused(404, 404, "no order with this order key"))
        answer: dict[str, Any] = {"order": found["order_ref"], "state": found["state"],
                                  "reason": found["reason"]}
        if found["state"] == D.BILLED:
            line = await self.sql(first_row, self.engine, D.bill_lines,
                                  order_ref=found["order_ref"])
            answer.update(goods=found["goods"], item=found["item"],
                          receipt=json.loads(found["receipt"] or "{}"))
            if not found["goods"]:   # the merchant refused the resumed confirmation (409):
                # released to another one, or before it kept the releasing one's digest
                answer["reason"] = (f"paid (merchant transaction {found['merchant_txn']}), but "
                                    "the merchant released the goods before the SP got them "
                                    "and did not give them again: ask the merchant about "
                                    "that transaction")
            if line is not None:
                answer["line"] = {k: line[k] for k in LINE_FIELDS}
        return JSONResponse(answer)

    # --- GET /v1/catalogue ----------------------------------------------------------------
    async def catalogue(self, request: Request) -> Response:
        c = self.config
        return JSONResponse({"sp": c.name, "currency_code": c.currency_code,
                             "currency_exponent": c.currency_exponent,
                             "items": [{"merchant": i.merchant, "sku": i.sku, "name": i.name,
                                        "price": i.retail, "fee": i.fee}
                                       for i in c.items.values()]})

    async def health(self, request: Request) -> Response:
        return await self.health_check.answer(request)

    def app(self) -> Starlette:
        pons = PonOrders(self)   # FIG. 3B and the merchant's copy (pon.py)
        return Starlette(routes=[
            Route("/v1/orders", self.order, methods=["POST"]),
            Route("/v1/orders/pon", pons.pon_order, methods=["POST"]),
            Route("/v1/orders/copy", pons.copy, methods=["POST"]),
            Route("/v1/orders/lookup", self.lookup, methods=["POST"]),
            Route("/v1/catalogue", self.catalogue, methods=["GET"]),
            Route("/v1/health", self.health, methods=["GET"]),
            openapi_route("sp"),
        ], exception_handlers=dict(JSON_STORAGE_ERROR_HANDLERS),
            lifespan=with_writer_drained(self.sql, self.lifespan),
            middleware=[Middleware(RequestLog, server="sp")])
