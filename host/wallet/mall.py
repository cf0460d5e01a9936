"""A demo Internet shopping mall affiliated with the wallet's financial company (seed 003 FIG. 4
server 90), for the demo and the tests.

``GET /shop/`` is the payment page with the wallet button. ``POST /shop/orders`` makes an order
from the page's cart at the mall's OWN prices (order id, the customer's id at the mall, a nonce
and an expiry) and gives the page the purchase information to hand to the wallet, signed with
the mall's key (``signature``: the gateway stores a wallet's choice only for a purchase its
mall signed; see ``gateway/matching.py``).
``POST /shop/orders/{order}/pay`` asks the gateway for approval with the mall's own record of
the order (embodiment 1). ``POST /shop/orders/{order}/pay-card`` sends the card details from
the page's form (number, secret, profile token: filled in by the wallet) with the mall's own
record, ``via`` the gateway (embodiment 2) or the VAN server (embodiment 3). The mall never
sees a member id, a name or a password; every request it receives is kept in
:attr:`MallServer.seen` so a test can check that.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from ..kit.http import Refused, json_refusal, read_json
from .gateway.matching import sign_order
from .links import ID, LinkClient
from .web.pages import HEADERS, KINDS, static_file

PRICES = {"tea": ("Green tea, 100 g", 450), "cup": ("Tea cup", 1200)}
MAX_ORDERS = 10_000


@dataclass
class MallConfig:
    mall: str
    key: bytes = field(repr=False)
    gateway_url: str
    wallet_url: str                      # the web server's wallet page
    currency: int = 156
    order_seconds: int = 600
    van_url: str = ""
    van_key: bytes = field(default=b"", repr=False)


class MallServer:
    def __init__(self, config: MallConfig, http: httpx.Client | None = None) -> None:
        self.config = config
        self.http = http or httpx.Client(timeout=30)
        self.gateway = LinkClient(self.http, config.gateway_url, config.mall, config.key)
        self.van = LinkClient(self.http, config.van_url, config.mall, config.van_key) \
            if config.van_url else None
        self.orders: dict[str, dict[str, Any]] = {}
        self.seen: list[dict[str, Any]] = []       # every request received
        self.url = ""                              # set by the stack once it listens

    def close(self) -> None:
        self.http.close()

    async def _record(self, request: Request) -> bytes:
        body = await request.body() if request.method == "POST" else b""
        self.seen.append({"method": request.method, "path": request.url.path,
                          "query": request.url.query, "headers": dict(request.headers),
                          "body": body[:4096].decode("utf-8", "replace")})
        return body

    async def page(self, request: Request) -> Response:
        await self._record(request)
        name = request.path_params.get("name", "mall.html")
        if name not in ("mall.html", "mall.js"):
            return Response("not found", status_code=404)
        return Response(static_file(name), media_type=KINDS[name.rsplit(".", 1)[1]],
                        headers=HEADERS)

    async def catalogue(self, request: Request) -> Response:
        await self._record(request)
        items = [{"sku": sku, "name": PRICES[sku][0], "qty": qty, "price": PRICES[sku][1]}
                 for sku, qty in (("tea", 2), ("cup", 1))]
        return JSONResponse({"items": items, "total": sum(
            qty * PRICES[sku][1] for sku, qty in (("tea", 2), ("cup", 1)))})

    async def new_order(self, request: Request) -> Response:
        await self._record(request)
        try:
            if request.headers.get("X-Mall") != "1":
                raise Refused(403, 403, "the X-Mall header is missing")
            data = await read_json(request)
            cart = data.get("cart") if isinstance(data, dict) else None
            if not isinstance(cart, list) or not 1 <= len(cart) <= 10:
                raise Refused(400, 400, "cart: 1 to 10 [sku, qty] pairs")
            products: list[dict[str, Any]] = []
            for line in cart:
                if not (isinstance(line, list) and len(line) == 2 and isinstance(line[0], str)
                        and line[0] in PRICES
                        and isinstance(line[1], int) and 1 <= line[1] <= 99):
                    raise Refused(400, 400, "cart: [sku, qty] with a sku we sell")
                products.append({"sku": line[0], "qty": line[1], "price": PRICES[line[0]][1]})
            if len(self.orders) >= MAX_ORDERS:
                raise Refused(503, 503, "too many open orders")
        except Refused as exc:
            return json_refusal(exc)
        order = secrets.token_hex(8)
        customer = request.cookies.get("mall_customer", "")
        if not ID.fullmatch(customer):
            customer = "guest-" + secrets.token_hex(4)
        purchase = {"mall": self.config.mall, "order": order, "customer": customer,
                    "products": products,
                    "amount": sum(p["qty"] * p["price"] for p in products),
                    "currency": self.config.currency, "nonce": secrets.token_hex(16),
                    "expires": int((time.time() + self.config.order_seconds) * 1000)}
        self.orders[order] = purchase
        # the page hands the wallet the purchase signed with the mall's key; the mall's own
        # record (what it asks approval of) stays unsigned
        response = JSONResponse({"purchase": sign_order(self.config.key, purchase),
                                 "wallet_url": self.config.wallet_url,
                                 "return_url": f"{self.url}/shop/?order={order}"})
        response.set_cookie("mall_customer", purchase["customer"], httponly=True,
                            samesite="lax")
        return response

    async def pay(self, request: Request) -> Response:
        await self._record(request)
        purchase = self.orders.get(request.path_params["order"])
        if purchase is None or request.headers.get("X-Mall") != "1":
            return JSONResponse({"approved": False, "reason": "no such order"},
                                status_code=404)
        status, answer = await self.approve(purchase)
        if status == 409 and answer.get("state") == "approved":   # asked again: paid before
            answer = {**answer, "approved": True}
        return JSONResponse({"approved": status == 200, **answer}, status_code=200)

    async def pay_card(self, request: Request) -> Response:
        body = await self._record(request)
        purchase = self.orders.get(request.path_params["order"])
        if purchase is None or request.headers.get("X-Mall") != "1":
            return JSONResponse({"approved": False, "reason": "no such order"},
                                status_code=404)
        try:
            data = json.loads(body) if len(body) <= 4096 else None
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.get("via") not in ("gateway", "van") or \
                not all(isinstance(data.get(k), str) for k in ("card", "secret", "profile")):
            return JSONResponse({"approved": False, "reason": "card, secret, profile and via "
                                 "(gateway or van) are needed"}, status_code=400)
        request_body = {"purchase": purchase, "card": data["card"], "secret": data["secret"],
                        "profile": data["profile"]}
        link = self.gateway if data["via"] == "gateway" else self.van
        path = "/v1/card-payments" if data["via"] == "gateway" else "/v1/approvals"
        if link is None:
            return JSONResponse({"approved": False, "reason": "this mall has no VAN"},
                                status_code=400)
        try:
            status, answer = await asyncio.to_thread(link.post, path, request_body)
        except httpx.TransportError:
            status, answer = 502, {"reason": "the payment server could not be reached"}
        if status == 409 and answer.get("state") == "approved":   # asked again: paid before
            answer = {**answer, "approved": True}
        return JSONResponse({"approved": status == 200, **answer}, status_code=200)

    async def approve(self, purchase: dict[str, Any]) -> tuple[int, Any]:
        """Ask the gateway to approve ``purchase`` (the mall's own record of it)."""
        try:
            return await asyncio.to_thread(self.gateway.post, "/v1/approvals", purchase)
        except httpx.TransportError:
            return 502, {"reason": "the payment gateway could not be reached"}

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/shop/", status_code=303)

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/", self.home, methods=["GET"]),
            Route("/shop/", self.page, methods=["GET"]),
            Route("/shop/catalogue", self.catalogue, methods=["GET"]),
            Route("/shop/{name:str}", self.page, methods=["GET"]),
            Route("/shop/orders", self.new_order, methods=["POST"]),
            Route("/shop/orders/{order:str}/pay", self.pay, methods=["POST"]),
            Route("/shop/orders/{order:str}/pay-card", self.pay_card, methods=["POST"]),
        ])
