"""The electronic payment web server (seed 003 FIG. 1 server 20, FIG. 4 server 60).

It serves the wallet page (``/wallet``: plain HTML and JS, the seed's "electronic wallet driving
program") and its JSON API, and passes the member's wallet operations to the payment gateway
over their link, naming the member it has authenticated:

``POST /api/register`` (member id + password, stored as an argon2id hash), ``/api/login``
(a session cookie: HttpOnly, SameSite=Strict; failures limited per member and per address),
``/api/logout``, ``GET /api/wallet``, ``POST /api/cards`` (issue a virtual or real card),
``/api/links`` (add an account or credit card), ``/api/charges`` (charge a card from one),
``/api/purchases`` (embodiment 1: the card chosen for the purchase the mall's page gave),
``/api/fills`` (embodiments 2 and 3: a card's number and profile token to fill into the
mall's payment form; the page adds the secret the member types).

Every ``/api`` request must carry ``X-Svcard-Wallet: 1``: a page on another origin cannot send
that header without a CORS preflight, which this server never grants, so it cannot act with the
member's cookie. ``GET /v1/health``, ``GET /openapi.json``.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from ...kit.http import JSON_STORAGE_ERROR_HANDLERS, Refused, openapi_route, read_json
from ...kit.request_log import RequestLog, note
from ...kit.serving import with_writer_drained
from ..base import WalletServer, ok
from ..config import WebConfig
from ..links import LinkClient, check_password, choice, hash_password, text, whole
from . import members as B
from .pages import static_routes

COOKIE = "wallet_session"
HEADER = "X-Svcard-Wallet"
MEMBER = re.compile(r"^[A-Za-z0-9_.-]{3,40}$")
PAGE_REF = re.compile(r"[A-Za-z0-9_-]{8,64}")
PURSE_TOKEN = re.compile(r"[0-9a-f]{96}")


class WebServer(WalletServer):
    name = "wallet-web"

    def __init__(self, config: WebConfig, clock: Callable[[], float] = time.time,
                 http: httpx.Client | None = None) -> None:
        self.config = config
        self.http = http or httpx.Client(timeout=30)
        self.gateway = LinkClient(self.http, config.gateway_url, config.party,
                                  config.gateway_key)
        super().__init__(B.make_engine(config.db_url), config.db_url, B.members, clock)

    def close(self) -> None:
        super().close()
        self.http.close()

    async def _json(self, request: Request) -> Any:
        if request.headers.get(HEADER) != "1":
            raise Refused(403, 403, f"the {HEADER} header is missing")
        if request.method == "GET":
            return {}
        data = await read_json(request)
        if not isinstance(data, dict):
            raise Refused(400, 400, "the body is not a JSON object")
        return data

    async def _session(self, request: Request) -> tuple[str, Any]:
        data = await self._json(request)
        value = request.cookies.get(COOKIE, "")
        member = await self.sql(B.session_member, self.engine, value[:100], self.now_ms()) \
            if value else None
        if member is None:
            raise Refused(401, 401, "log in first")
        note(party=member)
        return member, data

    async def _gateway(self, path: str, data: dict[str, Any]) -> JSONResponse:
        try:
            status, answer = await asyncio.to_thread(self.gateway.post, path, data)
        except httpx.TransportError:
            raise Refused(502, 502, "the payment gateway could not be reached") from None
        return JSONResponse(answer, status_code=status)

    # --- members --------------------------------------------------------------------------
    async def register(self, request: Request) -> Response:
        data = await self._json(request)
        member, password = text(data, "member", MEMBER), self._password(data)
        if not await self.sql(B.take_attempts, self.engine, [f"reg:{_address(request)}"],
                              self.config.login_failures * 4,
                              self.config.login_window_seconds * 1000, self.now_ms()):
            raise Refused(429, 429, "too many registrations from this address; try later")
        hashed = await asyncio.to_thread(hash_password, password)
        if not await self.sql(B.register, self.engine, member, hashed):
            raise Refused(409, 409, "this member id is taken")
        note(party=member, step="register")
        return ok({"member": member}, 201)

    @staticmethod
    def _password(data: Any) -> str:
        password = data.get("password")
        if not isinstance(password, str) or not 8 <= len(password) <= 128:
            raise Refused(400, 400, "password: 8 to 128 characters")
        return password

    async def login(self, request: Request) -> Response:
        data = await self._json(request)
        member, password = text(data, "member", MEMBER), self._password(data)
        keys = [f"member:{member}", f"addr:{_address(request)}"]
        c = self.config
        if not await self.sql(B.take_attempts, self.engine, keys, c.login_failures,
                              c.login_window_seconds * 1000, self.now_ms()):
            raise Refused(429, 429, "too many failed logins; try again later",
                          {"Retry-After": str(c.login_window_seconds)})
        stored = await self.sql(B.password_hash, self.engine, member)
        good = await asyncio.to_thread(check_password, stored or _DUMMY, password)
        if stored is None or not good:
            raise Refused(401, 401, "wrong member id or password")
        await self.sql(B.give_back, self.engine, keys)
        value = await self.sql(B.new_session, self.engine, member,
                               self.now_ms() + c.session_seconds * 1000)
        note(party=member, step="login")
        response = ok({"member": member})
        response.set_cookie(COOKIE, value, max_age=c.session_seconds, httponly=True,
                            samesite="strict",
                            secure=c.secure_cookie or request.url.scheme == "https", path="/")
        return response

    async def logout(self, request: Request) -> Response:
        await self._json(request)
        value = request.cookies.get(COOKIE, "")
        if value:
            await self.sql(B.end_session, self.engine, value[:100])
        response = ok({})
        response.delete_cookie(COOKIE, path="/")
        return response

    # --- the wallet -----------------------------------------------------------------------
    async def wallet(self, request: Request) -> Response:
        member, _ = await self._session(request)
        return await self._gateway("/v1/wallet/list", {"member": member})

    async def cards(self, request: Request) -> Response:
        member, data = await self._session(request)
        return await self._gateway("/v1/wallet/issue", {
            "member": member, "kind": choice(data, "kind", ("virtual", "real")),
            "ref": secrets.token_hex(16)})

    async def links(self, request: Request) -> Response:
        member, data = await self._session(request)
        return await self._gateway("/v1/wallet/link", {
            "member": member, "kind": choice(data, "kind", ("account", "credit")),
            "number": data.get("number"), "secret": data.get("secret")})

    async def charges(self, request: Request) -> Response:
        member, data = await self._session(request)
        return await self._gateway("/v1/wallet/charge", {
            "member": member, "kind": choice(data, "kind", ("account", "credit")),
            "card": data.get("card"), "source": data.get("source"),
            "amount": whole(data, "amount", 1), "currency": whole(data, "currency", 1, 999),
            "ref": _charge_ref(member, data)})

    async def purchases(self, request: Request) -> Response:
        member, data = await self._session(request)
        return await self._gateway("/v1/wallet/choose", {
            "member": member, "card": data.get("card"), "secret": data.get("secret"),
            "purchase": data.get("purchase"), "return_url": data.get("return_url")})

    async def fills(self, request: Request) -> Response:
        """Embodiments 2 and 3: the card's details to fill into the mall's payment form."""
        member, data = await self._session(request)
        return await self._gateway("/v1/wallet/fill", {
            "member": member, "card": data.get("card"), "purchase": data.get("purchase"),
            "return_url": data.get("return_url")})

    # --- the card helper's requests (a real card) ---------------------------------------------
    async def purse_checkout(self, request: Request) -> Response:
        """``POST /purse/checkout/{token}``: the card helper asks for the payment order of a
        purchase whose real card the member chose (seed 002's checkout, made by the gateway).
        The token is the capability; like a merchant, only a client's POST with
        ``X-Svcard-Client: 1`` makes an order (a page elsewhere cannot send that header)."""
        if request.headers.get("X-Svcard-Client") != "1":
            raise Refused(403, 403, "an order is made only for a client's POST with the header "
                                    "X-Svcard-Client: 1")
        token = request.path_params["token"]
        if not PURSE_TOKEN.fullmatch(token):
            raise Refused(404, 404, "no such checkout")
        return await self._gateway("/v1/purse/checkout", {"token": token})

    async def purse_bank(self, request: Request) -> Response:
        """``GET /purse/bank``: where the card helper starts loading a real card (the
        gateway, in seed 002's bank role)."""
        try:
            r = await asyncio.to_thread(self.http.get,
                                        self.config.gateway_url.rstrip("/") + "/v1/bank")
            answer = r.json()
        except (httpx.TransportError, ValueError):
            raise Refused(502, 502, "the payment gateway could not be reached") from None
        return JSONResponse(answer, status_code=r.status_code)

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/wallet", status_code=303)

    def app(self) -> Starlette:
        g = self.guarded
        return Starlette(routes=[
            Route("/", self.home, methods=["GET"]),
            *static_routes(),
            Route("/api/register", g(self.register), methods=["POST"]),
            Route("/api/login", g(self.login), methods=["POST"]),
            Route("/api/logout", g(self.logout), methods=["POST"]),
            Route("/api/wallet", g(self.wallet), methods=["GET"]),
            Route("/api/cards", g(self.cards), methods=["POST"]),
            Route("/api/links", g(self.links), methods=["POST"]),
            Route("/api/charges", g(self.charges), methods=["POST"]),
            Route("/api/purchases", g(self.purchases), methods=["POST"]),
            Route("/api/fills", g(self.fills), methods=["POST"]),
            Route("/purse/checkout/{token}", g(self.purse_checkout), methods=["POST"]),
            Route("/purse/bank", g(self.purse_bank), methods=["GET"]),
            Route("/v1/health", self.health, methods=["GET"]),
            openapi_route("wallet-web"),
        ], exception_handlers=dict(JSON_STORAGE_ERROR_HANDLERS),
            lifespan=with_writer_drained(self.sql),
            middleware=[Middleware(RequestLog, server="wallet-web")])


def _charge_ref(member: str, data: dict[str, Any]) -> str:
    """The charge's ref: the page's own ``ref`` (kept until an answer comes, so a double click
    or a POST sent again is the same charge, never a second one), made this member's; a fresh
    one when the page gives none."""
    given = data.get("ref")
    if given is None:
        return secrets.token_hex(16)
    if not isinstance(given, str) or not PAGE_REF.fullmatch(given):
        raise Refused(400, 400, "ref: 8 to 64 letters, digits, - or _")
    return hashlib.sha256(f"{member}\n{given}".encode()).hexdigest()[:32]


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


# a hash to check against when the member does not exist, so both cases take as long
_DUMMY = hash_password("no such member: a dummy password")
