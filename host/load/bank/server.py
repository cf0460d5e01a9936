"""The bank server (seed FIG. 17-18, steps 871-875 and 891-892).

``POST /v1/load/start`` (JSON): the client sends the account, its secret, the amount, what it
read from the card (serial, issuer, balance, currency, and the balance limit if the card answers
GET DATA 9F77) and an optional ``request_id`` (an idempotency key: a retry with it answers the
same load, never a second debit); the bank works out the largest load the card can take (up to
the smaller of the card's limit and the one configured for its issuer; neither: refused),
checks the account, debits it and answers the load parameters of step 874: amount, currency
and exponent, load server URL, transaction id, bank id, the session key (TSK) with the ticket
sealed for the load server (ETSK: it binds the card's serial and the issuer whose limit was
applied, so the load server loads no other issuer's card), the load terminal id, the bank time
stamp and the status URL.
``GET /v1/load`` tells where to start (JSON), or as an HTML page for a browser.
``POST /v1/load/status/{txn}`` takes the load server's sealed confirmation (carried by the
client): only a confirmation that opens under the key the bank shares with the load server
and matches the load is registered; "not loaded" re-credits the account.

Account secrets (see :mod:`svcard.host.load.bank.db`): salted scrypt hashes; wrong secrets
counted per account in the database (after ``secret_max_failures`` in a row the account takes
no attempt, the right secret included, for a delay that doubles with each further failure: 429 with
Retry-After) and per client address in memory (``address_max_failures`` wrong secrets, any
accounts, within ``address_window`` seconds: 429). A verified (account, secret) pair is
remembered for ``secret_cache_seconds`` under an HMAC keyed by a random per-process key (never
the secret itself), so a busy client does not pay the ~50 ms scrypt on every load start; a
remembered pair is still refused while its account is locked. Request bodies are bounded
(:func:`~svcard.host.kit.http.read_json`), and a database that cannot write answers 503.
"""

from __future__ import annotations

import asyncio
import html
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ....protocols import loadmsg as L
from ....protocols import messages as M
from ....protocols import secure
from ...kit.db import DuplicateError, now_ms
from ...kit.health import HealthCheck, database_check
from ...kit.http import (
    JSON_STORAGE_ERROR_HANDLERS,
    MAX_BODY,
    Refused,
    SqlRunner,
    json_refusal,
    openapi_route,
    read_body,
    read_json,
    shutting_down,
)
from ...kit.request_log import RequestLog, note
from ...kit.serving import Drain, with_writer_drained
from .db import (
    DUMMY_HASH,
    BankDb,
    BankError,
    SecretLocked,
    SecretPolicy,
    accounts,
    make_engine,
    verify_secret,
)
from .guards import AddressThrottle, SecretCache
from .order import LoadOrder
from .steps import StartView, register_confirmed, remembered_start, start_view


@dataclass
class BankConfig:
    bank_id: bytes
    shared_key: bytes = field(repr=False)   # shared with the load server
    load_url: str
    terminal_id: bytes                      # the load server's terminal id
    db_url: str = field(default="sqlite:///bank.db", repr=False)  # may hold a password
    public_url: str = "http://127.0.0.1:8083"
    currency_code: int = 156
    currency_exponent: int = 2
    order_lifetime: int = 600               # seconds
    secret_max_failures: int = 5            # wrong secrets in a row before an account locks
    secret_lockout: float = 30.0            # first lockout (s), doubled per further failure
    secret_lockout_max: float = 3600.0      # longest lockout (s)
    address_max_failures: int = 20          # wrong secrets from one address ...
    address_window: float = 60.0            # ... within this many seconds: 429
    secret_cache_seconds: float = 300.0     # how long a verified secret is remembered
    # the balance limit of each issuer's cards (8-byte issuer id -> minor units): a load never
    # takes a card past it, whatever limit the client says the card answered
    issuer_limits: dict[bytes, int] = field(default_factory=dict)

    @property
    def secret_policy(self) -> SecretPolicy:
        return SecretPolicy(self.secret_max_failures, self.secret_lockout,
                            self.secret_lockout_max)


def _reason(status: int, reason: str) -> JSONResponse:
    note(reason=reason)
    return JSONResponse({"reason": reason}, status_code=status)


def _too_many(seconds: float, reason: str) -> JSONResponse:
    note(reason=reason)
    return JSONResponse({"reason": reason}, status_code=429,
                        headers={"Retry-After": str(max(1, math.ceil(seconds)))})


class BankServer:
    def __init__(self, config: BankConfig) -> None:
        self.config = config
        self.db = BankDb(make_engine(config.db_url))
        self.sql = SqlRunner(config.db_url)
        self.secrets = SecretCache(config.secret_cache_seconds)
        self.addresses = AddressThrottle(config.address_max_failures, config.address_window)
        self._hashing: asyncio.Semaphore | None = None  # scrypt runs this many at a time
        self.drain = Drain()  # the drain: no new load start; confirmations still register
        self.health_check = HealthCheck(
            "bank", {"database": database_check(self.db.engine, accounts)},
            lambda: {"bank_id": self.config.bank_id.hex().upper()},
            lambda: self.drain.draining)

    async def _verify(self, stored: str, secret: str) -> bool:
        if self._hashing is None:
            self._hashing = asyncio.Semaphore(2)
        async with self._hashing:
            return await asyncio.to_thread(verify_secret, stored, secret)

    async def authenticate(self, account: str, secret: str, address: str,
                           view: StartView | None = None) -> tuple[Response | None, bool]:
        """(None, remembered) if ``secret`` is the account's and neither the account nor the
        address is locked (``remembered``: no scrypt ran); else (the 403 or 429, False)."""
        wait = self.addresses.blocked_for(address)
        if wait > 0:
            return _too_many(wait, "too many wrong secrets from this address: try again "
                                   "later"), False
        seen = view if view is not None else await self.sql(start_view, self.db, account, None)
        if (stored := seen.stored) is None:
            await self._verify(DUMMY_HASH, secret)  # the same cost as a real account
            self.addresses.failed(address)
            return _reason(403, "unknown account or wrong secret"), False
        if self.secrets.hit(account, stored, secret):
            locked = 0.0 if seen.clean else await self.sql(
                self.db.remembered_secret_ok, account, now_ms())
            if locked > 0:
                return _too_many(locked, "too many wrong secrets for this account: "
                                         "try again later"), False
            return None, True
        try:
            await self.sql(self.db.claim_attempt, account, self.config.secret_policy, now_ms())
        except SecretLocked as exc:
            return _too_many(exc.retry_after, str(exc)), False
        if not await self._verify(stored, secret):
            self.addresses.failed(address)
            return _reason(403, "unknown account or wrong secret"), False
        await self.sql(self.db.secret_ok, account, stored, secret)
        self.secrets.add(account, stored, secret)
        return None, False

    def dk(self, txn_id: bytes) -> bytes:
        return secure.derive_key(self.config.shared_key, self.config.bank_id, txn_id)

    # --- POST /v1/load/start (steps 872-875) ------------------------------------------------
    async def start(self, request: Request) -> Response:
        if self.drain.draining:
            return json_refusal(shutting_down())
        try:
            body = await read_json(request)
        except Refused as exc:
            return json_refusal(exc)
        try:
            order = LoadOrder.from_json(body)
        except KeyError as exc:  # the field's name, not the exception's repr
            return _reason(400, f"bad load request: no field {str(exc.args[0])[:40]}")
        except (TypeError, ValueError, AttributeError) as exc:
            return _reason(400, f"bad load request: {exc}")
        address = request.client.host if request.client else "unknown"
        view = None
        if self.addresses.blocked_for(address) <= 0:
            stored = self.secrets.known_hash(order.account)
            if stored is not None and not order.lookup_only and self.secrets.hit(
                    order.account, stored, order.secret) and self._price(order) is None:
                txn_id = os.urandom(16)   # a remembered secret: one call, the debit in it
                try:
                    view = await self.sql(remembered_start, self.db, order.account, stored,
                                          order.request_id, txn_id.hex(), order.amount,
                                          order.card_serial.hex(),
                                          (order.issuer_id or b"").hex())
                except (BankError, DuplicateError) as exc:
                    return _reason(402 if isinstance(exc, BankError) else 409, str(exc))
                if view is None:
                    note(txn=txn_id.hex())
                    return JSONResponse(self.parameters(txn_id, order))
            if view is None:   # else the long way, with what that call read
                view = await self.sql(start_view, self.db, order.account, order.request_id)
        refused, remembered = await self.authenticate(order.account, order.secret, address,
                                                      view)
        if refused is not None:
            return refused
        if order.request_id:  # a retry of a start whose answer was lost: the same load
            prior = view.prior if remembered and view is not None else await self.sql(
                self.db.load_by_request, order.request_id)   # read again after scrypt
            if prior is not None:
                # the same issuer too: the ticket names the issuer whose limit priced the load
                # (a load made before the issuer was recorded is priced again below)
                if (prior["account_id"], prior["amount"], prior["card_serial"]) != (
                        order.account, order.amount, order.card_serial.hex()) or (
                        prior["issuer_id"] is not None
                        and prior["issuer_id"] != (order.issuer_id or b"").hex()):
                    return _reason(409, "this request id was used for another load")
                if prior["state"] != "debited":
                    return _reason(409, f"this load is already {prior['state']}")
                if prior["issuer_id"] is None and (refused := self.price(order)) is not None:
                    return refused
                note(txn=prior["txn_id"], outcome="same load again")
                return JSONResponse(self.parameters(bytes.fromhex(prior["txn_id"]), order))
            if order.lookup_only:
                return _reason(404, "no load with this request id: nothing was debited")
        refused = self.price(order)
        if refused is not None:
            return refused
        txn_id = os.urandom(16)
        note(txn=txn_id.hex())
        try:
            await self.sql(self.db.debit_for_load, order.account, txn_id.hex(), order.amount,
                           order.card_serial.hex(), order.request_id,
                           (order.issuer_id or b"").hex())
        except BankError as exc:
            return _reason(402, str(exc))
        except DuplicateError as exc:
            return _reason(409, str(exc))
        return JSONResponse(self.parameters(txn_id, order))

    def price(self, order: LoadOrder) -> Response | None:
        """Step 873: None if the card can take the load (currency, and the room under the
        balance limit for the issuer the client names), else the refusal (400)."""
        problem = self._price(order)
        return None if problem is None else _reason(400, problem)

    def _price(self, order: LoadOrder) -> str | None:
        c = self.config
        if order.currency_code != c.currency_code:
            return (f"the card holds currency {order.currency_code}; this bank loads "
                    f"{c.currency_code}")
        if order.issuer_id is None and c.issuer_limits:
            return ("bad load request: no field card.issuer_id (this bank loads up to its "
                    "issuers' balance limits)")
        limit = self.balance_limit(order)
        if limit is None:
            return (f"no balance limit known for issuer {order.issuer_hex}: the card gave "
                    f"none and this bank has none configured for it")
        room = limit - order.balance
        if order.amount > room:  # the maximum load
            return (f"the card can take at most {max(room, 0)} more (balance "
                    f"{order.balance}, limit {limit})")
        return None

    def balance_limit(self, order: LoadOrder) -> int | None:
        """The most the card may hold after the load: the smaller of the limit the client says
        the card answered (GET DATA 9F77, unauthenticated: it may only lower the bank's) and
        the limit configured for the card's issuer; None when neither is known."""
        known = [limit for limit in (order.limit, self.config.issuer_limits.get(
            order.issuer_id or b"")) if limit is not None]
        return min(known) if known else None

    def parameters(self, txn_id: bytes, order: LoadOrder) -> dict[str, Any]:
        """Step 874: the client's load parameters, with the ticket sealed for the load server."""
        c = self.config
        tsk = secure.new_key()
        bank_time = int(time.time())
        etsk = L.seal_ticket(c.shared_key, c.bank_id, txn_id, {
            "version": L.LOAD_TICKET_VERSION, "tsk": tsk, "amount": order.amount,
            "currency_code": c.currency_code, "currency_exponent": c.currency_exponent,
            "card_serial": order.card_serial, "bank_time": bank_time,
            "expires": bank_time + c.order_lifetime, "terminal_id": c.terminal_id,
            "issuer_id": order.issuer_id or b""})   # the load server loads only its cards
        return {"version": M.VERSION, "amount": order.amount, "currency_code": c.currency_code,
                "currency_exponent": c.currency_exponent, "load_url": c.load_url,
                "txn_id": txn_id.hex(), "bank_id": c.bank_id.hex(),
                "terminal_id": c.terminal_id.hex(), "bank_time": bank_time,
                "status_url": f"{c.public_url}/v1/load/status/{txn_id.hex()}",
                "card_serial": order.card_serial.hex(), "account": order.account,
                "tsk": tsk.hex(), "etsk": etsk.hex()}

    async def page(self, request: Request) -> Response:
        c = self.config
        info = {"bank_id": c.bank_id.hex(), "currency_code": c.currency_code,
                "currency_exponent": c.currency_exponent,
                "start_url": f"{c.public_url}/v1/load/start"}
        if "text/html" not in request.headers.get("accept", ""):
            return JSONResponse(info)
        data = html.escape(json.dumps(info), quote=False)
        return HTMLResponse(
            "<!doctype html><title>Load your purse card</title><h1>Load your purse card</h1>"
            "<p>Run <code>svcard load</code> with this page's URL, your card, your account "
            "and the amount: it reads the card's balance and limit and asks the bank to "
            "debit your account.</p>"
            f'<script type="application/json" id="svcard-load">{data}</script>')

    # --- POST /v1/load/status/{txn} (step 892) ----------------------------------------------
    async def status(self, request: Request) -> Response:
        try:
            txn_id = bytes.fromhex(request.path_params["txn"])
        except ValueError:
            return _reason(400, "the transaction id is not hex")
        note(txn=txn_id.hex())
        try:
            msg = M.parse(L.BankConfirmation, await read_body(request, MAX_BODY),
                          "load confirmation")
            if msg.txn_id != txn_id:
                raise _Bad("the confirmation is for another load")
            bank_id = self.config.bank_id
            try:
                conf = L.open_confirmation(self.config.shared_key, bank_id, txn_id,
                                           msg.confirmation)
            except (secure.SealError, M.MessageError) as exc:
                raise _Bad(f"forged confirmation: {exc}") from None
            if (conf.bank_id, conf.txn_id) != (bank_id, txn_id):
                raise _Bad("the confirmation does not match the load")
        except (Refused, M.MessageError, _Bad) as exc:   # no such load answers 404 first
            if await self.sql(self.db.load, txn_id.hex()) is None:
                return _reason(404, "no such load")
            return json_refusal(exc) if isinstance(exc, Refused) else _reason(400, str(exc))
        loaded = conf.outcome == L.OUTCOME_LOADED
        done = await self.sql(register_confirmed, self.db, txn_id.hex(), conf.amount,
                              conf.card_serial.hex(), loaded, conf.reason)
        if done.outcome == "missing":
            return _reason(404, "no such load")
        if done.outcome == "mismatch":
            return _reason(400, "the confirmation does not match the load")
        if done.outcome == "already":
            return _reason(409, f"this load was already registered ({done.state})")
        note(outcome="loaded" if loaded else "not loaded: refunded")
        return JSONResponse({"registered": True, "outcome": "loaded" if loaded else
                             "not loaded", "amount": done.amount,
                             "refunded": 0 if loaded else done.amount,
                             "reason": conf.reason, "account_balance": done.balance})

    async def health(self, request: Request) -> Response:
        return await self.health_check.answer(request)

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/load", self.page, methods=["GET"]),
            Route("/v1/load/start", self.start, methods=["POST"]),
            Route("/v1/load/status/{txn}", self.status, methods=["POST"]),
            Route("/v1/health", self.health, methods=["GET"]),
            openapi_route("bank"),
        ], exception_handlers=dict(JSON_STORAGE_ERROR_HANDLERS),
            lifespan=with_writer_drained(self.sql),
            middleware=[Middleware(RequestLog, server="bank")])


class _Bad(ValueError):  # a confirmation refused with 400 (if its load exists)
    pass
