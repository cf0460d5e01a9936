"""The card helper's HTTP API, for shop pages open in this computer's browser.

* ``GET /v1/hello``: whether the pairing token is right (and whether the card is busy);
* ``POST /v1/pay`` ``{"checkout_url": URL}``: start paying that checkout with the card (202 and
  the payment's id; 409 while the card is busy with another payment);
* ``GET /v1/pay/{id}``: the payment's live state; once ``paid``, the goods and the receipt;
* ``POST /v1/load`` ``{"bank_url", "account", "secret", "amount"}``: load the card from the
  page's own bank (a wallet's gateway in seed 002's bank role: the account and secret are the
  charge's load order and its token); polled at ``/v1/pay/{id}`` too, ``loaded`` at the end.

Every request passes three checks, in this order. First the ``Host`` header must be a loopback
name, so a web page whose own DNS name was pointed at 127.0.0.1 is refused (403). Then an
``Origin`` header, if the request has one, must be one of ``--allow-origin``: any other origin
gets 403 with no CORS header, and nothing runs. The CORS answers for allowed origins come from
Starlette's ``CORSMiddleware``, with an exact list and no wildcard. Last, every endpoint needs the
pairing token (``Authorization: Bearer TOKEN``, else 401). A page may pay only its own shop: the
checkout URL's origin must be the page's ``Origin``, or, for a request without one (a
command-line client), one of the allowed origins. Bodies are bounded: 4 KiB of JSON, the named
fields only.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..kit.http import Refused, read_json
from .pairing import (
    MAX_URL,
    PairingError,
    is_loopback_host_header,
    normalise_origin,
    token_matches,
    url_origin,
)
from .payments import HelperCard, Payments

log = logging.getLogger("svcard.helper")

MAX_REQUEST = 4096        # bytes of JSON in a payment request
_JOB_ID = re.compile(r"[0-9a-f]{32}")
NO_STORE = {"Cache-Control": "no-store"}


class PayRequest(BaseModel):
    """``POST /v1/pay``: the shop's checkout URL and nothing else."""

    model_config = ConfigDict(extra="forbid", strict=True)
    checkout_url: str = Field(min_length=1, max_length=MAX_URL)
    # optional: pay only if the card in the reader is this one (its purse application serial,
    # 10 bytes of hex); a wallet page names the card its member chose
    card_serial: str | None = Field(default=None, pattern=r"^[0-9A-Fa-f]{20}$")


class LoadRequest(BaseModel):
    """``POST /v1/load``: the page's bank URL, and the account, secret and amount it gave."""

    model_config = ConfigDict(extra="forbid", strict=True)
    bank_url: str = Field(min_length=1, max_length=MAX_URL)
    account: str = Field(min_length=1, max_length=128)
    secret: str = Field(min_length=1, max_length=128)
    amount: int = Field(ge=1, le=0xFFFFFFFF)


_Body = TypeVar("_Body", PayRequest, LoadRequest)


def _answer(status: int, body: dict[str, Any], headers: dict[str, str] | None = None,
            ) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers={**NO_STORE, **(headers or {})})


class OriginGuard:
    """ASGI middleware, outermost: refuse (403, no CORS headers) a request whose ``Host`` is not
    a loopback name or whose ``Origin`` is not allowed, before anything else sees it."""

    def __init__(self, app: ASGIApp, helper: CardHelper) -> None:
        self.app, self.helper = app, helper

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            reason = self.helper.refusal(Headers(scope=scope))
            if reason is not None:
                self.helper.refused += 1
                log.warning("refused %s %s: %s", scope.get("method"), scope.get("path"), reason)
                await _answer(403, {"reason": reason})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class CardHelper:
    """The helper: its card, its pairing token and the origins it answers."""

    def __init__(self, card: HelperCard, token: str, origins: Iterable[str]) -> None:
        self.origins = frozenset(normalise_origin(o) for o in origins)
        if not self.origins:
            raise PairingError("--allow-origin: name at least one shop origin")
        self.token = token
        self.payments = Payments(card)
        self.refused = 0          # requests refused by the origin guard (for tests and logs)
        self.stopping = False     # SIGTERM: no new payment; the one under way finishes

    # the drain of kit/serving.py:serve
    def begin_drain(self) -> None:
        self.stopping = True

    def pending(self) -> int:
        return 1 if self.payments.busy() else 0

    def __repr__(self) -> str:
        return f"CardHelper({sorted(self.origins)})"

    def refusal(self, headers: Headers) -> str | None:
        """Why a request is refused before it reaches an endpoint, or None."""
        if not is_loopback_host_header(headers.get("host")):
            return ("Host: the card helper answers only requests to 127.0.0.1 or localhost")
        origin = headers.get("origin")
        if origin is None:
            return None
        try:
            allowed = normalise_origin(origin, "Origin") in self.origins
        except PairingError:
            allowed = False
        if not allowed:
            return (f"Origin {origin[:100]}: this card helper does not accept payments from "
                    "that page (see its --allow-origin)")
        return None

    def unauthorised(self, request: Request) -> Response | None:
        if token_matches(self.token, request.headers.get("authorization")):
            return None
        return _answer(401, {"reason": "the pairing token is missing or wrong"},
                       {"WWW-Authenticate": 'Bearer realm="svcard helper"'})

    async def hello(self, request: Request) -> Response:
        if (refused := self.unauthorised(request)) is not None:
            return refused
        return _answer(200, {"helper": "svcard", "paired": True,
                             "busy": self.payments.busy()})

    async def _admitted(self, request: Request, model: type[_Body], field: str,
                        refusal: str) -> tuple[_Body, str] | Response:
        """The request's body and the origin of its ``field`` URL, or the answer refusing it:
        the pairing token, the body's shape, and the page's own origin, which must be an
        allowed one (a page may pay or load only through its own site)."""
        if (refused := self.unauthorised(request)) is not None:
            return refused
        try:
            body = model.model_validate(await read_json(request, MAX_REQUEST))
            site = url_origin(getattr(body, field))
        except Refused as exc:
            return _answer(exc.status, {"reason": exc.reason})
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(p) for p in problem["loc"]) or "body"
            return _answer(400, {"reason": f"{where}: {problem['msg']}"})
        except PairingError as exc:
            return _answer(400, {"reason": str(exc)})
        origin = request.headers.get("origin")
        if site not in self.origins or (origin is not None
                                        and site != normalise_origin(origin, "Origin")):
            return _answer(403, {"reason": refusal})
        if self.stopping:
            return _answer(503, {"reason": "the card helper is stopping"}, {"Retry-After": "5"})
        return body, site

    async def pay(self, request: Request) -> Response:
        shops = ", ".join(sorted(self.origins))
        admitted = await self._admitted(
            request, PayRequest, "checkout_url",
            f"checkout_url: a page may pay only its own shop, and this helper pays only {shops}")
        if isinstance(admitted, Response):
            return admitted
        body, shop = admitted
        job = self.payments.start(body.checkout_url, card_serial=body.card_serial)
        if job is None:
            return _answer(409, {"reason": "the card is busy with another payment: try again "
                                           "when it is finished"}, {"Retry-After": "2"})
        log.info("payment %s: started for %s", job.id, shop)
        return _answer(202, {**job.view(), "poll": f"/v1/pay/{job.id}"})

    async def load(self, request: Request) -> Response:
        """``POST /v1/load``: load the card from the page's own bank (the same origin rule as a
        payment: a page may load only from its own site, and only an allowed one)."""
        admitted = await self._admitted(
            request, LoadRequest, "bank_url",
            "bank_url: a page may load the card only from its own site, and an allowed one")
        if isinstance(admitted, Response):
            return admitted
        body, bank = admitted
        job = self.payments.start(body.bank_url, {"account": body.account,
                                                  "secret": body.secret,
                                                  "amount": body.amount})
        if job is None:
            return _answer(409, {"reason": "the card is busy: try again when it is finished"},
                           {"Retry-After": "2"})
        log.info("load %s: started from %s", job.id, bank)
        return _answer(202, {**job.view(), "poll": f"/v1/pay/{job.id}"})

    async def job(self, request: Request) -> Response:
        if (refused := self.unauthorised(request)) is not None:
            return refused
        job_id = request.path_params["job"]
        view = self.payments.get(job_id) if _JOB_ID.fullmatch(job_id) else None
        if view is None:
            return _answer(404, {"reason": "no such payment"})
        return _answer(200, view)

    def app(self) -> ASGIApp:
        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            yield
            self.payments.wait_idle()   # let a payment under way finish before exiting

        inner = Starlette(routes=[
            Route("/v1/hello", self.hello, methods=["GET"]),
            Route("/v1/pay", self.pay, methods=["POST"]),
            Route("/v1/pay/{job}", self.job, methods=["GET"]),
            Route("/v1/load", self.load, methods=["POST"]),
        ], middleware=[Middleware(
            CORSMiddleware, allow_origins=sorted(self.origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"], allow_private_network=True,
            max_age=600)], lifespan=lifespan)
        return OriginGuard(inner, self)
