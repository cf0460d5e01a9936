"""The merchant's side of seed 001 FIG. 3B and of "the merchant sends a copy of the order".

FIG. 3B: ``POST /v1/pon`` makes a tentative order, its payment order number (PON) and a pick-up
secret (the merchant keeps its SHA-256). The SP asks ``GET /v1/pon/{pon}?nonce=`` (answered
signed with this merchant's Ed25519 key) and pays ``POST /v1/pon/{pon}/checkout``, an ordinary
checkout linked to the PON; its confirmation moves the order AND the PON to paid in one step
(:meth:`PonDesk.release`): a PON is paid once. The customer, not the payer, gets the goods:
``POST /v1/pon/{pon}/pickup`` with the secret, once a valid confirmation is held. The copy:
``POST /v1/pon/via-sp`` takes the customer's order signed with its SP key, makes a PON and
sends the SP a copy signed with the merchant's key; the SP pays the PON as above.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    delete,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...kit.db import first_row, step
from ...kit.http import Refused, check_json_shape, read_body
from ...kit.request_log import note
from ...kit.schema import Schema, prepare
from . import db as MD
from .confirmation import Refusal
from .sp_copy import send_copy

if TYPE_CHECKING:
    from .server import MerchantServer

HEADER = "X-Svcard-Merchant-Signature"          # as the SP's signing.MERCHANT_HEADER
QUOTE_DOMAIN = b"svcard-merchant-pon/1\n"       # the merchant's answer about a PON
COPY_DOMAIN = b"svcard-sp-copy/1\n"             # the merchant's copy of a customer's order
TENTATIVE, PAID = "tentative", "paid"
MAX_BODY = 512
MAX_COPY_ORDER = 3072
_PON = _NONCE = re.compile(r"[0-9a-f]{32}")
_SECRET = re.compile(r"[0-9a-f]{64}")
_CUSTOMER = re.compile(r"[A-Za-z0-9_.@-]{1,32}")
_SKU = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PG_LOCK = 0x7376636172645043   # "svcard" + "PC": the open-PON bound on PostgreSQL
ROUTES = (("/v1/pon", "POST"), ("/v1/pon/via-sp", "POST"), ("/v1/pon/{pon}", "GET"),
          ("/v1/pon/{pon}/checkout", "POST"), ("/v1/pon/{pon}/pickup", "POST"))


@dataclass
class PonSettings:
    """PONs: the merchant's Ed25519 key (raw), its name at the SP, the SP's URL (copies)."""
    key: bytes = field(repr=False)
    sp_name: str
    sp_url: str | None = None
    lifetime: int = 3600            # seconds
    max_open: int = 10_000          # tentative PONs at once

    def __post_init__(self) -> None:
        if len(self.key) != 32:
            raise ValueError("pon.key: an Ed25519 private key is 32 bytes")
        if self.lifetime < 1 or self.max_open < 1:
            raise ValueError("pon.lifetime, pon.max_open: must be positive")


metadata = MetaData()
pons = Table(
    "merchant_pons", metadata,
    Column("pon", String(32), primary_key=True),
    Column("sku", String(64), nullable=False),
    Column("item", String(200), nullable=False),
    Column("goods", String(500), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency_code", Integer, nullable=False),
    Column("customer", String(32), nullable=False),        # the customer's id at the SP
    Column("secret_hash", String(64), nullable=False),     # SHA-256 of the pick-up secret
    Column("client_address", String(64), nullable=False),  # who asked: bounds open PONs
    Column("state", String(10), nullable=False),           # tentative -> paid
    Column("txn_id", String(32)),                          # the payment that paid it
    Column("expires", BigInteger, nullable=False),         # ms: the last time to start paying
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    Index("ix_merchant_pons_state_expires", "state", "expires"),
)
# every checkout made for a PON (one per payment attempt); written before its order
pon_txns = Table(
    "merchant_pon_txns", metadata,
    Column("txn_id", String(32), primary_key=True),
    Column("pon", String(32), nullable=False, index=True),
    Column("created", BigInteger, nullable=False),
)
SCHEMA = Schema("merchant_pon", 1, metadata)


class _Lost(Exception):   # the order was no longer open: the PON's change is undone with it
    pass


def disabled_routes(server: MerchantServer) -> list[Route]:
    async def none(request: Request) -> Response:   # (a POST without the header: 403)
        if request.method == "POST" and not request.url.path.endswith("/pickup") and \
                request.headers.get("X-Svcard-Client") != "1":
            return server.refuse(403, "an order is made only for a POST with X-Svcard-Client: 1")
        return server.refuse(404, "this merchant takes no payment order numbers")
    return [Route(path, none, methods=[method]) for path, method in ROUTES]


def _loads(body: bytes | str) -> Any:
    try:
        check_json_shape(body.encode() if isinstance(body, str) else body, 2, 12)
        return json.loads(body)
    except Refused as exc:
        raise Refusal(exc.status, exc.reason) from None
    except (ValueError, RecursionError):   # (a str that is not UTF-8 too)
        raise Refusal(400, "the body is not JSON") from None


def _json(body: bytes, fields: frozenset[str]) -> dict[str, Any]:
    if not isinstance(data := _loads(body), dict) or set(data) != fields:
        raise Refusal(400, f"the body is a JSON object with exactly {sorted(fields)}")
    return data


def _check(data: dict[str, Any], name: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(value := data.get(name), str) or not pattern.fullmatch(value):
        raise Refusal(400, f"{name}: not a valid value")
    return value


class PonDesk:
    """The PON routes of a :class:`~.server.MerchantServer` (``config.pon`` set)."""

    def __init__(self, server: MerchantServer, settings: PonSettings) -> None:
        self.server, self.settings = server, settings
        self.engine: Engine = server.db.engine
        self.signer = Ed25519PrivateKey.from_private_bytes(settings.key)
        prepare(self.engine, SCHEMA)

    def routes(self) -> list[Route]:
        handlers = (self.create, self.via_sp, self.quote, self.checkout, self.pickup)
        return [Route(path, handler, methods=[method])
                for (path, method), handler in zip(ROUTES, handlers, strict=True)]

    def _insert(self, row: dict[str, Any], now: int) -> bool:
        """Insert a tentative PON within ``max_open`` and ``max_open_per_client``, once the
        tentative PONs no payment can reach any more are deleted: one step."""
        c, columns = self.server.config, list(row)
        gone = and_(pons.c.state == TENTATIVE, pons.c.expires < now - 1000 * (
            c.order_lifetime + c.confirm_grace))   # a payment started in time may finish

        def open_now(*where: Any) -> Any:
            return (select(func.count()).select_from(pons).where(
                pons.c.state == TENTATIVE, pons.c.expires > now, *where).scalar_subquery())
        source = select(*(literal(row[c], pons.c[c].type).label(c) for c in columns)).where(
            open_now() < self.settings.max_open, open_now(
                pons.c.client_address == row["client_address"])
            < c.max_open_per_client)
        with step(self.engine) as conn:
            conn.execute(delete(pon_txns).where(pon_txns.c.pon.in_(select(pons.c.pon).where(
                gone))))
            conn.execute(delete(pons).where(gone))
            if self.engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})
            return conn.execute(insert(pons).from_select(columns, source).returning(
                pons.c.pon)).first() is not None

    def _link(self, pon: str, txn_id: str, now: int, undo: bool = False) -> str:
        """Link a checkout to a PON tentative and in time: "ok", "paid", "expired" (a step)."""
        with step(self.engine) as conn:
            if undo:   # the checkout made no order: its link goes
                conn.execute(delete(pon_txns).where(pon_txns.c.txn_id == txn_id))
                return "gone"
            if conn.execute(update(pons).where(
                    pons.c.pon == pon, pons.c.state == TENTATIVE, pons.c.expires > now).values(
                    updated=now)).rowcount == 1:
                conn.execute(insert(pon_txns).values(txn_id=txn_id, pon=pon, created=now))
                return "ok"
            state = conn.execute(select(pons.c.state).where(pons.c.pon == pon)).scalar()
        return "paid" if state == PAID else "expired"

    def release(self, txn_id: str, state: str, receipt: str, now: int,
                confirmation: str = "") -> bool:
        """``OrderDb.release`` for the status route: a PON's order and the PON itself change
        in ONE step, or neither does; True for exactly one caller."""
        link = first_row(self.engine, pon_txns, txn_id=txn_id)   # written once, never changed
        if link is None:
            return self.server.db.release(txn_id, state, receipt, now, confirmation)
        o = MD.orders.c
        try:
            with step(self.engine) as conn:
                if conn.execute(update(pons).where(
                        pons.c.pon == link["pon"], pons.c.state == TENTATIVE).values(
                        state=PAID, txn_id=txn_id, updated=now)).rowcount != 1:
                    return False   # paid by another payment: this one releases nothing
                if conn.execute(update(MD.orders).where(
                        o.txn_id == txn_id, o.state == MD.OPEN, o.confirm_until >= now).values(
                        state=state, receipt=receipt, updated=now,
                        confirmation=confirmation or None)).rowcount != 1:
                    raise _Lost(txn_id)
                MD._count_open(conn, -1)
        except _Lost:
            return False
        return True

    # --- POST /v1/pon: a tentative order -------------------------------------------------------
    def _new_pon(self, sku: str, customer: str, now: int,
                 address: str = "") -> tuple[dict[str, Any], str]:
        c = self.server.config
        item = next((i for i in c.catalogue if i.sku == sku and i.price > 0), None)
        if item is None:   # (a free item has nothing to pay)
            raise Refusal(404, f"no item {sku!r} to pay for in the catalogue")
        pon, secret = secrets.token_hex(16), secrets.token_hex(32)
        row = {"pon": pon, "sku": item.sku, "item": item.name, "goods": item.goods,
               "amount": item.price, "currency_code": c.currency_code, "customer": customer,
               "secret_hash": hashlib.sha256(secret.encode()).hexdigest(), "state": TENTATIVE,
               "expires": now + self.settings.lifetime * 1000, "created": now, "updated": now,
               "client_address": address}
        return row, secret

    async def _make_pon(self, request: Request, sku: str, customer: str) -> dict[str, Any]:
        now = self.server.now_ms()
        row, secret = self._new_pon(sku, customer, now, _address(request))
        if not await self.server.sql(self._insert, row, now):
            raise Refusal(503, "too many open PONs (overall or of this client): try later",
                          {"Retry-After": "60"})
        note(txn=row["pon"], step="pon")
        return {"pon": row["pon"], "secret": secret, "merchant": self.settings.sp_name,
                **{k: row[k] for k in ("sku", "item", "amount", "currency_code")},
                "currency_exponent": self.server.config.currency_exponent,
                "expires": row["expires"] // 1000}

    async def create(self, request: Request) -> Response:
        try:
            _client_only(request)
            data = _json(await _body(request, MAX_BODY), frozenset({"sku", "customer"}))
            answer = await self._make_pon(request, _check(data, "sku", _SKU),
                                          _check(data, "customer", _CUSTOMER))
        except Refusal as exc:
            return self.server.refuse(exc.status, exc.reason, exc.headers)
        return JSONResponse(answer)

    # --- GET /v1/pon/{pon}?nonce=: the signed answer the SP asks for -----------------------------
    def signed(self, fields: dict[str, Any], domain: bytes) -> tuple[bytes, str]:
        body = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()
        return body, self.signer.sign(domain + body).hex()

    async def quote(self, request: Request) -> Response:
        pon = request.path_params["pon"]
        nonce = request.query_params.get("nonce", "")
        if not _PON.fullmatch(pon) or not _NONCE.fullmatch(nonce):
            return self.server.refuse(400, "a PON and a nonce are 16 bytes of lower-case hex each")
        row = await self.server.sql(first_row, self.engine, pons, pon=pon)
        if row is None:
            return self.server.refuse(404, "no such PON")
        body, signature = self.signed({
            "merchant": self.settings.sp_name, "pon": pon, "sku": row["sku"],
            "item": row["item"], "amount": int(row["amount"]),
            "currency_code": int(row["currency_code"]), "customer": row["customer"],
            "state": row["state"], "expires": int(row["expires"]) // 1000, "nonce": nonce},
            QUOTE_DOMAIN)
        return Response(body, media_type="application/json", headers={HEADER: signature})

    async def checkout(self, request: Request) -> Response:
        server = self.server
        pon = request.path_params["pon"]
        try:
            _client_only(request)
            if not _PON.fullmatch(pon):
                raise Refusal(400, "a PON is 16 bytes of lower-case hex")
            row = await server.sql(first_row, self.engine, pons, pon=pon)
            if row is None:
                raise Refusal(404, "no such PON")
            variant, _terminal = server.choose_variant(request.query_params.get("variant"),
                                                       None)
            params, order = server.new_order(row["sku"], variant)
            if int(params["amount"]) != int(row["amount"]):
                raise Refusal(409, "the item's price changed since the PON was made: ask "
                                   "for a new PON")
            order.update(goods=f"PON {pon}: the merchant gives the goods to the customer "
                               "(pick-up with the PON and its secret)",
                         client_address=_address(request))
            now = order["created"]
            linked = await server.sql(self._link, pon, order["txn_id"], now)
            if linked != "ok":
                raise Refusal(409 if linked == "paid" else 410, f"this PON is {linked}")
            c = server.config
            await server.sql(server.db.sweep, now)
            if await server.sql(server.db.create, order, c.max_open_orders,
                                c.max_open_per_client) != "ok":   # no order: no link kept
                await server.sql(self._link, pon, order["txn_id"], now, True)
                raise Refusal(503, "too many open orders: try later", {"Retry-After": "5"})
        except Refusal as exc:
            return server.refuse(exc.status, exc.reason, exc.headers)
        note(txn=params["txn_id"], step="pon-checkout")
        return JSONResponse(params)

    async def pickup(self, request: Request) -> Response:
        pon = request.path_params["pon"]
        try:
            if not _PON.fullmatch(pon):
                raise Refusal(400, "a PON is 16 bytes of lower-case hex")
            secret = _check(_json(await _body(request, MAX_BODY), frozenset({"secret"})),
                            "secret", _SECRET)
            row = await self.server.sql(first_row, self.engine, pons, pon=pon)
            digest = hashlib.sha256(secret.encode()).hexdigest()
            if row is None or not hmac.compare_digest(digest, row["secret_hash"]):
                raise Refusal(403, "no PON with this secret")
            order = None if row["state"] != PAID else await self.server.sql(
                self.server.db.get, row["txn_id"])
            if order is None or order["state"] not in MD.RELEASED:
                raise Refusal(402, "the PON is not paid yet: the goods wait for the payment")
        except Refusal as exc:
            return self.server.refuse(exc.status, exc.reason, exc.headers)
        return JSONResponse({"released": True, "pon": pon, "goods": row["goods"], "item":
                             row["item"], "receipt": json.loads(order["receipt"] or "{}")})

    async def via_sp(self, request: Request) -> Response:
        s = self.settings
        try:
            _client_only(request)
            if s.sp_url is None:
                raise Refusal(404, "this merchant sends no order copies to a service provider")
            data = _json(await _body(request, MAX_COPY_ORDER),
                         frozenset({"order", "signature"}))
            order_text, signature = data["order"], data["signature"]
            if not isinstance(order_text, str) or not isinstance(signature, str) or \
                    len(order_text) > MAX_COPY_ORDER // 2 or len(signature) != 128:
                raise Refusal(400, "order: the customer's signed order (a JSON text); "
                                   "signature: its signature (128 hex digits)")
            inner = _loads(order_text)
            if not isinstance(inner, dict) or inner.get("merchant") != s.sp_name:
                raise Refusal(400, f"order: not an order for merchant {s.sp_name}")
            _check(inner, "sp", _SKU)   # the SP it is for (signed: another SP refuses it)
            made = await self._make_pon(request, _check(inner, "sku", _SKU),
                                        _check(inner, "customer", _CUSTOMER))
        except Refusal as exc:
            return self.server.refuse(exc.status, exc.reason, exc.headers)
        body, merchant_signature = self.signed({
            "merchant": s.sp_name, "pon": made["pon"], "sku": made["sku"],
            "item": made["item"], "amount": made["amount"],
            "currency_code": made["currency_code"], "created": int(time.time()),
            "order": order_text, "customer_signature": signature}, COPY_DOMAIN)
        status, answer = await send_copy(s.sp_url, body, {HEADER: merchant_signature})
        row = await self.server.sql(first_row, self.engine, pons, pon=made["pon"])
        paid = row is not None and row["state"] == PAID
        out = {"pon": made["pon"], "secret": made["secret"], "paid": paid,
               "sp": {k: answer[k] for k in ("order", "state", "reason", "kind", "line")
                      if k in answer}}
        if paid and row is not None:
            order = await self.server.sql(self.server.db.get, row["txn_id"])
            out.update(goods=row["goods"], item=row["item"],
                       receipt=json.loads((order or {}).get("receipt") or "{}"))
            return JSONResponse(out)
        return JSONResponse(out, status_code=status if status >= 400 else 502)


def _address(request: Request) -> str:
    return (request.client.host if request.client else "unknown")[:64]


def _client_only(request: Request) -> None:   # as at checkout: no order for a browser
    if request.headers.get("X-Svcard-Client") != "1":
        raise Refusal(403, "an order is made only for a POST with X-Svcard-Client: 1")


async def _body(request: Request, limit: int) -> bytes:
    try:   # the merchant's refusals are JSON
        return await read_body(request, limit)
    except Refused as exc:
        raise Refusal(exc.status, exc.reason) from None
