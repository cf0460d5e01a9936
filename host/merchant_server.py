"""The merchant server: a catalogue of priced digital goods, checkout, and the status URL.

``GET /v1/checkout/{item}?variant=fig6`` creates an order (a unique transaction id) and answers
the payment parameters of seed step 606 as JSON, or, for a browser, an HTML page that embeds the
same JSON. It makes the FIG. 9 security data: a derived key DK from the shared key, a fresh
TSK, and the ETSK (TSK plus the order's amount, currency, variant and expiry, sealed under DK).
``POST /v1/status/{txn}`` takes the client's confirmation and releases the goods only if
"debit result M" opens under DK and matches the order (and, in FIG. 8, if the card's MAC2
equals the expected MAC2 only the merchant can open). A confirmation is good once.
"""

from __future__ import annotations

import html
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from svcard.protocols import messages as M
from svcard.protocols import secure


@dataclass(frozen=True)
class Item:
    sku: str
    name: str
    price: int          # minor units
    goods: str          # what is released once paid (a ticket code, a download link, ...)


DEFAULT_CATALOGUE = (
    Item("song", "One song (MP3)", 99, "https://example.invalid/download/song-7f3a"),
    Item("ticket", "Museum e-ticket", 1250, "TICKET-MUSEUM-0042"),
    Item("article", "News article", 25, "article-2026-11-22"),
    Item("login", "Member area login (card authentication, no charge)", 0, "member-session"),
)


@dataclass
class Order:
    txn_id: bytes
    item: Item
    variant: int
    purpose: int
    dk: bytes = field(repr=False)
    state: str = "open"          # open -> paid | refused
    receipt: dict[str, Any] = field(default_factory=dict)


@dataclass
class MerchantConfig:
    merchant_id: bytes
    shared_key: bytes = field(repr=False)
    payment_url: str
    terminal_id: bytes           # the payment server's PSAM pool terminal id
    public_url: str = "http://127.0.0.1:8081"
    currency_code: int = 156
    currency_exponent: int = 2
    default_variant: str = "fig6"
    order_lifetime: int = 600    # seconds
    catalogue: tuple[Item, ...] = DEFAULT_CATALOGUE


class MerchantServer:
    def __init__(self, config: MerchantConfig) -> None:
        self.config = config
        self.orders: dict[bytes, Order] = {}

    def refuse(self, status: int, reason: str) -> Response:
        return JSONResponse({"released": False, "reason": reason}, status_code=status)

    async def catalogue(self, request: Request) -> Response:
        c = self.config
        return JSONResponse({"merchant_id": c.merchant_id.hex().upper(),
                             "currency_code": c.currency_code,
                             "currency_exponent": c.currency_exponent,
                             "items": [{"sku": i.sku, "name": i.name, "price": i.price}
                                       for i in c.catalogue]})

    def new_order(self, sku: str, variant_name: str) -> dict[str, Any]:
        c = self.config
        item = next((i for i in c.catalogue if i.sku == sku), None)
        if item is None:
            raise LookupError(f"no item {sku!r} in the catalogue")
        if variant_name not in M.VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(M.VARIANTS)}")
        variant = M.VARIANTS[variant_name]
        txn_id = os.urandom(16)
        dk = secure.derive_key(c.shared_key, c.merchant_id, txn_id)
        tsk = secure.new_key()
        purpose = M.PURPOSE_AUTHENTICATION if item.price == 0 else M.PURPOSE_PAYMENT
        ticket = M.build(M.OrderTicket, {
            "version": M.VERSION, "tsk": tsk, "amount": item.price,
            "currency_code": c.currency_code, "currency_exponent": c.currency_exponent,
            "variant": variant, "purpose": purpose,
            "expires": int(time.time()) + c.order_lifetime, "terminal_id": c.terminal_id})
        etsk = secure.seal(dk, ticket, M.ticket_aad(c.merchant_id, txn_id))
        self.orders[txn_id] = Order(txn_id, item, variant, purpose, dk)
        return {
            "version": M.VERSION, "amount": item.price, "currency_code": c.currency_code,
            "currency_exponent": c.currency_exponent, "description": item.name,
            "payment_url": c.payment_url, "txn_id": txn_id.hex(),
            "merchant_id": c.merchant_id.hex(), "terminal_id": c.terminal_id.hex(),
            "status_url": f"{c.public_url}/v1/status/{txn_id.hex()}",
            "variant": variant_name, "purpose": "authentication" if purpose else "payment",
            "tsk": tsk.hex(), "etsk": etsk.hex(),
        }

    async def checkout(self, request: Request) -> Response:
        variant = request.query_params.get("variant", self.config.default_variant)
        try:
            params = self.new_order(request.path_params["sku"], variant)
        except LookupError as exc:
            return self.refuse(404, str(exc))
        except ValueError as exc:
            return self.refuse(400, str(exc))
        if "text/html" in request.headers.get("accept", ""):
            data = html.escape(json.dumps(params), quote=False)
            return HTMLResponse(
                "<!doctype html><title>Pay with your purse card</title>"
                f"<h1>{html.escape(params['description'])}</h1>"
                f"<p>Amount: {params['amount']} (minor units, currency "
                f"{params['currency_code']})</p>"
                "<p>Run <code>svcard pay</code> with this page's URL and your card.</p>"
                f'<script type="application/json" id="svcard-payment">{data}</script>')
        return JSONResponse(params)

    async def status(self, request: Request) -> Response:
        try:
            txn_id = bytes.fromhex(request.path_params["txn"])
        except ValueError:
            return self.refuse(400, "the transaction id is not hex")
        order = self.orders.get(txn_id)
        if order is None:
            return self.refuse(404, "no such order")
        if order.state == "paid":
            return self.refuse(409, "this confirmation was already used: goods released once")
        try:
            conf = M.parse(M.Confirmation, await request.body(), "confirmation")
        except M.MessageError as exc:
            return self.refuse(400, str(exc))
        mid = self.config.merchant_id
        if conf.txn_id != txn_id:
            return self.refuse(400, "the confirmation is for another transaction")
        try:
            result = M.parse(M.DebitResult, secure.open_sealed(
                order.dk, conf.result_m, M.result_m_aad(mid, txn_id), "debit result M"),
                "debit result M")
        except (secure.SealError, M.MessageError) as exc:
            return self.refuse(400, f"forged confirmation: {exc}")
        expected_status = (M.STATUS_AUTHENTICATED if order.purpose == M.PURPOSE_AUTHENTICATION
                           else M.STATUS_OK)
        if result.status != expected_status:
            return self.refuse(402, f"the payment server did not confirm: {result.reason}")
        if (result.merchant_id, result.txn_id, result.amount, result.variant) != (
                mid, txn_id, order.item.price, order.variant):
            return self.refuse(400, "the confirmation does not match the order")
        if order.variant == M.FIG8_MERCHANT_COMPARES:
            try:
                expected = secure.open_sealed(order.dk, conf.sealed_expected_mac2,
                                              M.expected_mac2_aad(mid, txn_id),
                                              "expected card MAC2")
            except secure.SealError as exc:
                return self.refuse(400, f"forged confirmation: {exc}")
            if expected != conf.card_mac2:
                return self.refuse(402, "the card's MAC2 is not the one the PSAM expected: "
                                        "the card did not pay")
        order.state = "paid"
        order.receipt = {"txn_id": txn_id.hex(), "amount": order.item.price,
                         "psam_id": result.psam_id.hex().upper(),
                         "terminal_txn_number": result.terminal_txn_number,
                         "card_serial": result.card_serial.hex().upper(),
                         "card_counter": result.card_counter,
                         "status": "authentication OK" if expected_status else "paid"}
        return JSONResponse({"released": True, "goods": order.item.goods,
                             "item": order.item.name, "receipt": order.receipt})

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/catalogue", self.catalogue, methods=["GET"]),
            Route("/v1/checkout/{sku}", self.checkout, methods=["GET"]),
            Route("/v1/status/{txn}", self.status, methods=["POST"]),
        ])
