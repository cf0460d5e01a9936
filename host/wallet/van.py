"""The VAN server of seed 003's third embodiment (FIG. 6 server 190).

``POST /v1/approvals`` over each mall's link (step d6): the mall's own record of the purchase
(mall, order, the customer's id at the mall, products, amount, currency, nonce, expiry) with
the card's number, secret and the profile token the member's wallet filled into the mall's
form. The VAN checks the mall asks about its own purchase, keeps a line of what it relayed
(``wv_relayed``: mall, order, the answer; never the secret), and asks the financial system
over its own link (``POST /v1/van/debits``, step d7), which checks the token, the secret and
the balance, debits the card and reports the movement to the payment gateway (step d12).

Answers to the mall: 200 approved; 402 declined (balance too low); 403 the card's details
were not filled by a wallet for this purchase, a wrong secret, or another mall's purchase;
404 no such card; 409 a real card whose purse has not paid this purchase (the financial
system approves a real card only on the gateway's debit of the purchase, which the gateway
makes over its own link once the purse's payment is verified); 410 expired; 423 the card is
locked; 502 the financial system's answer is
unknown: ask again. The VAN keeps no state to tell a retry from a copy, so a request asked
again gets the first outcome with ``"repeated": true``: never a second debit.
``GET /v1/health``, ``GET /openapi.json``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
from sqlalchemy import BigInteger, Column, Engine, Integer, MetaData, String, Table, insert
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..kit.db import now_ms, step
from ..kit.http import JSON_STORAGE_ERROR_HANDLERS, Refused, openapi_route
from ..kit.request_log import RequestLog, note
from ..kit.schema import Schema, open_schema
from .base import WalletServer, ok
from .config import VanConfig
from .links import NUMBER, PROFILE, SECRET, LinkClient, purchase, text

metadata = MetaData()
relayed = Table(
    "wv_relayed", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("mall", String(40), nullable=False),
    Column("mall_order", String(40), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency", Integer, nullable=False),
    Column("status", Integer, nullable=False),
    Column("at", BigInteger, nullable=False),
)
SCHEMA = Schema("wallet-van", 1, metadata)
PASSED = (200, 402, 403, 404, 409, 410, 423)


def make_engine(url: str) -> Engine:
    return open_schema(url, SCHEMA)


def note_relayed(engine: Engine, mall: str, order: str, amount: int, currency: int,
                 status: int) -> None:
    with step(engine) as conn:
        conn.execute(insert(relayed).values(mall=mall, mall_order=order, amount=amount,
                                            currency=currency, status=status, at=now_ms()))


class VanServer(WalletServer):
    name = "wallet-van"

    def __init__(self, config: VanConfig, clock: Callable[[], float] = time.time,
                 http: httpx.Client | None = None) -> None:
        self.config = config
        self.http = http or httpx.Client(timeout=30)
        self.fin = LinkClient(self.http, config.fin_url, config.party, config.fin_key)
        super().__init__(make_engine(config.db_url), config.db_url, relayed, clock)

    def close(self) -> None:
        super().close()
        self.http.close()

    async def approve(self, request: Request) -> Response:
        mall, data = await self.linked(request, self.config.mall_keys)
        raw = data.get("purchase")
        p = purchase(raw)
        if p["mall"] != mall:
            raise Refused(403, 403, "a mall asks approval of its own purchases only")
        forward = {"purchase": raw, "card": text(data, "card", NUMBER),
                   "secret": text(data, "secret", SECRET),
                   "profile": text(data, "profile", PROFILE)}
        note(txn=f"{mall}:{p['order']}", step="van")
        try:
            status, answer = await asyncio.to_thread(self.fin.post, "/v1/van/debits", forward)
        except httpx.TransportError:
            status, answer = 502, {"reason": "the financial system could not be reached"}
        if status not in PASSED:
            status, answer = 502, {"reason": "the financial system's answer is unknown: "
                                              "ask again"}
        await self.sql(note_relayed, self.engine, mall, p["order"], p["amount"],
                       p["currency"], status)
        body = {"approved": status == 200, "order": p["order"], "amount": p["amount"],
                "currency": p["currency"]}
        if status in (200, 402):
            body["repeated"] = bool(answer.get("repeated"))
        if status == 200:
            body["approval"] = str(answer.get("ref", ""))
        else:
            body["reason"] = str(answer.get("reason", status))[:200]
        return ok(body, status)

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/approvals", self.guarded(self.approve), methods=["POST"]),
            Route("/v1/health", self.health, methods=["GET"]),
            openapi_route("wallet-van"),
        ], exception_handlers=dict(JSON_STORAGE_ERROR_HANDLERS),
            middleware=[Middleware(RequestLog, server="wallet-van")])
