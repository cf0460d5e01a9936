"""The financial system (seed 003 FIG. 1 financial system 40, FIG. 4 financial system 80).

Over its link with the payment gateway: ``POST /v1/cards`` (an application for a card: approved
with a new number and secret; a real card is personalised as an anonymous purse and "mailed",
written to ``mail_dir``), ``/v1/cards/verify`` (a card's secret), ``/v1/links`` (an applicant
proves it holds an account or a credit card), ``/v1/charges`` (a card charged from a linked
account or credit card), ``/v1/debits`` (a matched purchase paid from a card),
``/v1/balances``. Over its link with a cash agent: ``/v1/topups``. Over its link with a VAN
server: ``/v1/van/debits`` (FIG. 6 step d7: a mall's purchase with the card's number, secret
and the profile token the member's wallet filled in; the token is checked under the gateway
link's key, then the secret, then the card debited under ``pay:PURCHASE``). Every movement
done is reported to the gateway (``POST {gateway_url}/v1/reports`` as party ``fin``) from an
outbox written in the movement's own transaction. ``GET /v1/health``, ``GET /openapi.json``.

Answers (JSON): 200 with ``result`` ``done`` or ``declined`` and why (nothing changed when
declined); 400 a malformed request; 401 a link MAC that does not verify; 403 a wrong secret
(423 after too many); 404 no such card or source; 409 a ref used before for another request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from sqlalchemy import Engine, select
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ...kit.db import reading
from ...kit.http import JSON_STORAGE_ERROR_HANDLERS, Refused, openapi_route
from ...kit.request_log import RequestLog, note
from ...kit.serving import with_writer_drained
from ..base import WalletServer, crash_point, ok
from ..config import FinConfig
from ..links import (
    ID,
    NUMBER,
    PROFILE,
    SECRET,
    LinkClient,
    check_profile,
    choice,
    new_secret,
    purchase,
    secret_digest,
    text,
    whole,
)
from . import db as D
from . import ledger as L
from .mail import mail_real_card


def _moved_before(engine: Engine, ref: str) -> bool:
    """Whether a movement was recorded under ``ref``."""
    with reading(engine) as conn:
        return conn.execute(select(D.movements.c.id).where(
            D.movements.c.ref == ref)).first() is not None

log = logging.getLogger("svcard.wallet.fin")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_REF = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class FinServer(WalletServer):
    name = "wallet-fin"

    def __init__(self, config: FinConfig, clock: Callable[[], float] = time.time,
                 http: httpx.Client | None = None) -> None:
        self.config = config
        self.http = http or httpx.Client(timeout=30)
        first = next(iter(config.gateway_keys.values()))
        self.reporter = LinkClient(self.http, config.gateway_url, "fin", first) \
            if config.gateway_url else None
        self._delivering: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[int]] = set()
        super().__init__(D.make_engine(config.db_url), config.db_url, D.cards, clock)

    def close(self) -> None:
        super().close()
        self.http.close()

    # --- reports to the gateway -----------------------------------------------------------
    async def deliver(self) -> int:
        """Send the outbox's unsent reports to the gateway; how many it took."""
        if self.reporter is None:
            return 0
        if self._delivering is None:
            self._delivering = asyncio.Lock()
        sent = 0
        async with self._delivering:
            while True:
                batch = await self.sql(L.pending_reports, self.engine, 100)
                if not batch:
                    return sent
                try:
                    status, _ = await asyncio.to_thread(self.reporter.post, "/v1/reports",
                                                        {"reports": batch})
                except httpx.TransportError:
                    return sent
                if status != 200:   # tried again next round; a refusal is worth a look
                    log.warning("the gateway refused %d reports: %s", len(batch), status)
                    return sent
                await self.sql(L.mark_sent, self.engine, [r["ref"] for r in batch])
                sent += len(batch)

    def _report_soon(self) -> None:
        if self.reporter is not None:
            task = asyncio.get_running_loop().create_task(self.deliver())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        async def again() -> None:
            while True:
                with contextlib.suppress(Exception):
                    await self.deliver()
                await asyncio.sleep(self.config.report_seconds)
        loop = asyncio.get_running_loop().create_task(again()) if self.reporter else None
        try:
            yield
        finally:
            if loop is not None:
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop

    def _digest(self, what: str, ident: str, secret: str) -> str:
        return secret_digest(self.config.secret_key, what, ident, secret)

    def _currency(self, data: Any) -> int:
        currency = whole(data, "currency", 1, 999)
        if currency != self.config.currency:
            raise Refused(400, 400, f"currency: this financial system keeps {self.config.currency}")
        return currency

    # --- the gateway's link ---------------------------------------------------------------
    async def issue(self, request: Request) -> Response:
        _, data = await self.linked(request, self.config.gateway_keys)
        ref, kind = text(data, "ref", _REF), choice(data, "kind", ("virtual", "real"))
        currency, applicant = self._currency(data), text(data, "applicant", _HEX64)
        secret = new_secret(8)
        number, new, reason = await self.sql(
            L.issue_card, self.engine, ref, kind, currency, applicant,
            lambda n: self._digest("card", n, secret))
        note(txn=ref, step="issue")
        if number is None:
            return ok({"approved": False, "reason": reason}, 403)
        answer: dict[str, Any] = {"approved": True, "number": number, "kind": kind,
                                  "new": new}
        if new:
            if kind == "real":   # the secret goes in the letter, never back over the wire
                mailed = mail_real_card(self.config.mail_dir, number, secret, currency)
                answer["mailed"] = mailed.name
            else:
                answer["secret"] = secret
        return ok(answer)

    async def verify(self, request: Request) -> Response:
        _, data = await self.linked(request, self.config.gateway_keys)
        card, secret = text(data, "card", NUMBER), text(data, "secret", SECRET)
        found = await self.sql(L.check_secret, self.engine, card,
                               self._digest("card", card, secret), self.config.max_failures)
        status = {"ok": 200, "wrong": 403, "locked": 423, "unknown": 404}[found]
        return ok({"result": found}, status)

    async def link(self, request: Request) -> Response:
        _, data = await self.linked(request, self.config.gateway_keys)
        kind = choice(data, "kind", ("account", "credit"))
        number, secret = text(data, "number", NUMBER), text(data, "secret", SECRET)
        found = await self.sql(L.link_source, self.engine, kind, number,
                               self._digest(kind, number, secret),
                               text(data, "applicant", _HEX64), self.config.max_failures)
        return ok({"result": found},
                  {"ok": 200, "wrong": 403, "locked": 423, "unknown": 404}[found])

    async def _move(self, data: dict[str, Any], kind: str, source: str,
                    applicant: str | None, order: str = "") -> Response:
        ref, card = text(data, "ref", _REF), text(data, "card", NUMBER)
        amount, currency = whole(data, "amount", 1), self._currency(data)
        outcome = await self._moved(ref, kind, card, source, amount, currency, applicant,
                                    order)
        return ok(outcome.answer(ref))

    async def _moved(self, ref: str, kind: str, card: str, source: str, amount: int,
                     currency: int, applicant: str | None, order: str) -> L.Outcome:
        digest = hashlib.sha256(json.dumps([kind, card, source, amount, currency, applicant])
                                .encode()).hexdigest()
        note(txn=ref, step=kind)
        try:
            outcome = await self.sql(L.move, self.engine, ref, kind, card, source, amount,
                                     currency, digest, applicant, self.config.max_balance,
                                     order)
        except L.RefConflict as exc:
            raise Refused(409, 409, str(exc)) from None
        note(outcome=outcome.result)
        crash_point(f"fin-after-{kind}")
        if outcome.result == D.DONE and not outcome.repeated:
            self._report_soon()
        return outcome

    async def charge(self, request: Request) -> Response:
        _, data = await self.linked(request, self.config.gateway_keys)
        kind = choice(data, "kind", ("account", "credit"))
        return await self._move(data, kind, text(data, "source", NUMBER),
                                text(data, "applicant", _HEX64))

    async def debit(self, request: Request) -> Response:
        _, data = await self.linked(request, self.config.gateway_keys)
        order = data.get("order", "")
        if not isinstance(order, str) or (order and not ID.fullmatch(order)):
            raise Refused(400, 400, "order: not a valid value")
        return await self._move(data, "debit", "mall:" + text(data, "mall"), None, order)

    async def van_debit(self, request: Request) -> Response:
        """FIG. 6 step d7: a VAN asks for a mall's purchase paid with a card's details."""
        _, data = await self.linked(request, self.config.van_keys)
        p = purchase(data.get("purchase"))
        card, secret = text(data, "card", NUMBER), text(data, "secret", SECRET)
        token = text(data, "profile", PROFILE)
        pid = next((found for key in self.config.gateway_keys.values()
                    if (found := check_profile(key, token, card, p)) is not None), None)
        if pid is None:
            raise Refused(403, 403, "the card details were not filled by the member's wallet "
                                    "for this purchase")
        ref = "pay:" + pid
        # expired, unless already paid: a debit made before the expiry whose answer was lost
        # is answered as made (repeated) when the mall asks again, never "expired"
        if p["expires"] <= self.now_ms() and not await self.sql(_moved_before, self.engine, ref):
            raise Refused(410, 410, "the purchase expired")
        self._currency({"currency": p["currency"]})
        found = await self.sql(L.check_secret, self.engine, card,
                               self._digest("card", card, secret), self.config.max_failures)
        if found != "ok":
            status = {"wrong": 403, "locked": 423, "unknown": 404}[found]
            raise Refused(status, status, {"wrong": "wrong card secret",
                                           "locked": "the card is locked after too many "
                                                     "wrong secrets",
                                           "unknown": "no such card"}[found])
        if await self.sql(L.card_kind, self.engine, card) == "real":
            # its value is in its purse: approved only on the gateway's debit of THIS
            # purchase, which it makes over its link once the purse paid it (never here)
            paid = await self.sql(L.van_purse_approval, self.engine, ref, card,
                                  "mall:" + p["mall"], p["amount"], p["currency"])
            if paid is None:
                raise Refused(409, 409, "the real card's purse has not paid this purchase: "
                                        "the member's wallet pays it with the card first")
            note(txn=ref, step="van-purse", outcome="repeated" if paid.repeated else "done")
            return ok(paid.answer(ref))
        outcome = await self._moved(ref, "debit", card, "mall:" + p["mall"], p["amount"],
                                    p["currency"], None, p["order"])
        # asked again (a VAN's retry after a lost answer, or a copy): the first outcome,
        # marked repeated; never a second debit
        return ok(outcome.answer(ref), 200 if outcome.result == D.DONE else 402)

    async def topup(self, request: Request) -> Response:
        agent, data = await self.linked(request, self.config.agent_keys)
        return await self._move(data, "cash", "agent:" + agent, None)

    async def balances(self, request: Request) -> Response:
        _, data = await self.linked(request, self.config.gateway_keys)
        cards = data.get("cards")
        if not isinstance(cards, list) or len(cards) > 100 or not all(
                isinstance(c, str) and NUMBER.fullmatch(c) for c in cards):
            raise Refused(400, 400, "cards: a list of at most 100 card numbers")
        return ok({"cards": await self.sql(L.balances, self.engine, cards)})

    def app(self) -> Starlette:
        g = self.guarded
        return Starlette(routes=[
            Route("/v1/cards", g(self.issue), methods=["POST"]),
            Route("/v1/cards/verify", g(self.verify), methods=["POST"]),
            Route("/v1/links", g(self.link), methods=["POST"]),
            Route("/v1/charges", g(self.charge), methods=["POST"]),
            Route("/v1/debits", g(self.debit), methods=["POST"]),
            Route("/v1/topups", g(self.topup), methods=["POST"]),
            Route("/v1/balances", g(self.balances), methods=["POST"]),
            Route("/v1/van/debits", g(self.van_debit), methods=["POST"]),
            Route("/v1/health", self.health, methods=["GET"]),
            openapi_route("wallet-fin"),
        ], exception_handlers=dict(JSON_STORAGE_ERROR_HANDLERS),
            lifespan=with_writer_drained(self.sql, self.lifespan),
            middleware=[Middleware(RequestLog, server="wallet-fin")])



def add_source(server: FinServer, kind: str, number: str, secret: str, amount: int) -> None:
    """Open a bank account or credit card at this financial system (tests, demo, CLI)."""
    L.add_source(server.engine, kind, number, server._digest(kind, number, secret), amount,
                 server.config.currency)
