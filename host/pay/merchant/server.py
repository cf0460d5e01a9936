"""The merchant server: a catalogue of priced digital goods, checkout, and the status URL.

``POST /v1/checkout/{item}`` with the header ``X-Svcard-Client: 1`` creates an order (a unique
transaction id, a row in the merchant's database) and answers the payment parameters of seed
step 606 as JSON. Only that request makes an order: a browser cannot send a custom header
cross-site without a CORS preflight, which this server never grants, so a third-party page (an
``<img>``, a form, a ``no-cors`` fetch) cannot fill the shop with orders. Every ``GET`` or
``HEAD`` of the same URL, whatever its ``Accept``, gets the item's checkout page
(:mod:`.page`), which makes no order and holds no key: its "Pay with card" button has the local
card helper ask for the order and pay. The order makes the FIG. 9 security data: a derived key
DK from the shared key, a fresh TSK, and the ETSK (TSK plus the order's amount, currency,
variant and expiry, sealed under DK). The MERCHANT chooses the variant, from those it has enabled;
``?variant=`` is only a preference inside that set. FIG. 7 (the client compares the card's
MAC2) is only for a registered client terminal (``?terminal=ID``), whose Ed25519 signature the
confirmation must carry, and the goods it releases are "unproven" until the card's MAC2 and
TAC reach the payment server.

``POST /v1/status/{txn}`` takes the client's confirmation and releases the goods only if
"debit result M" opens under DK and matches the order (and, in FIG. 8, if the card's MAC2
equals the expected MAC2 only the merchant can open). The whole confirmation is checked first;
then one conditional UPDATE (open -> paid) decides: an order is released once, however many
confirmations arrive at the same time. The UPDATE keeps the SHA-256 of the releasing
confirmation: an exact repeat of it (its answer was lost) gets the same goods and receipt
again, so a client resuming after a crash is not left without them; any other confirmation
for a released order is refused (409). Orders are bounded in count and expire (see
:mod:`svcard.host.pay.merchant.db`).
"""

from __future__ import annotations

import hmac
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ....protocols import messages as M
from ....protocols import secure
from ...kit.health import HealthCheck, database_check
from ...kit.http import JSON_STORAGE_ERROR_HANDLERS, Refused, SqlRunner, openapi_route, read_body
from ...kit.request_log import RequestLog, note
from ...kit.serving import with_writer_drained
from . import db as MD
from . import page
from .confirmation import Refusal, check_confirmation
from .pon import PonDesk, PonSettings, disabled_routes


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


DEFAULT_VARIANTS = frozenset({"fig5", "fig6", "fig8"})  # FIG. 7 only when asked for
MAX_CONFIRMATION = 4096  # bytes: a confirmation is a few hundred
_HEX_TXN = re.compile(r"[0-9a-fA-F]{32}")
_HEX_TERMINAL = re.compile(r"[0-9a-fA-F]{16}")
# the header an order request must carry (svcard's clients send it: pay/client.py
# CLIENT_HEADER): a custom header makes a browser ask a CORS preflight first, never granted here
CLIENT_HEADER = ("X-Svcard-Client", "1")


@dataclass(frozen=True)
class Order:
    """An order as the merchant's database holds it."""

    txn_id: bytes
    sku: str
    item: str
    amount: int
    variant: int
    state: str                   # open -> paid | released_unproven
    client_terminal: str
    receipt: dict[str, Any]

    @property
    def proven(self) -> bool:
        return self.state == MD.PAID

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Order:
        return cls(bytes.fromhex(row["txn_id"]), row["sku"], row["item"], int(row["amount"]),
                   int(row["variant"]), row["state"], row["client_terminal"],
                   json.loads(row["receipt"]) if row["receipt"] else {})


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
    variants: frozenset[str] = DEFAULT_VARIANTS   # the variants this merchant enables
    # registered client terminals (FIG. 7): terminal id (8 bytes) -> Ed25519 public key
    client_terminals: dict[bytes, bytes] = field(default_factory=dict)
    db_url: str = field(default="sqlite:///merchant.db", repr=False)  # may hold a password
    order_lifetime: int = 600    # seconds: the ticket's validity at the payment server
    confirm_grace: int = 600     # seconds after that a confirmation is still taken
    max_open_orders: int = 10_000
    max_open_per_client: int = 100   # per client address
    catalogue: tuple[Item, ...] = DEFAULT_CATALOGUE
    pon: PonSettings | None = None   # FIG. 3B PONs and order copies to an SP (pon.py)

    def __post_init__(self) -> None:
        """Refuse a configuration that cannot be used; the message names the field."""
        unknown = sorted(set(self.variants) - set(M.VARIANTS))
        if unknown or not self.variants:
            raise ValueError(f"variants: unknown {', '.join(unknown)}" if unknown
                             else "variants: none enabled")
        if self.default_variant not in self.variants:
            raise ValueError(f"default_variant: {self.default_variant!r} is not among the "
                             f"enabled variants ({', '.join(sorted(self.variants))})")
        if self.default_variant == "fig7":
            raise ValueError("default_variant: fig7 is only for registered client terminals "
                             "and cannot be the default")
        for tid, key in self.client_terminals.items():
            if len(tid) != 8 or len(key) != 32:
                raise ValueError("client_terminals: ids are 8 bytes, Ed25519 public keys 32")
        for name in ("order_lifetime", "confirm_grace", "max_open_orders",
                     "max_open_per_client"):
            if int(getattr(self, name)) < (0 if name == "confirm_grace" else 1):
                raise ValueError(f"{name}: must be positive")

    def enabled(self) -> list[str]:
        return [n for n in M.VARIANTS if n in self.variants]


class OrderView(Mapping[bytes, Order]):
    """The orders, read from the database (for tests and tools)."""

    def __init__(self, db: MD.OrderDb) -> None:
        self.db = db

    def __getitem__(self, txn_id: bytes) -> Order:
        row = self.db.get(txn_id.hex())
        if row is None:
            raise KeyError(txn_id)
        return Order.from_row(row)

    def __iter__(self) -> Iterator[bytes]:
        from sqlalchemy import select
        with self.db.engine.connect() as conn:
            ids = conn.execute(select(MD.orders.c.txn_id)).scalars().all()
        return iter([bytes.fromhex(i) for i in ids])

    def __len__(self) -> int:
        return sum(self.db.counts().values())


class MerchantServer:
    def __init__(self, config: MerchantConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.db = MD.OrderDb(MD.make_engine(config.db_url))
        self.sql = SqlRunner(config.db_url)
        self.terminal_keys = {tid: Ed25519PublicKey.from_public_bytes(key)
                              for tid, key in config.client_terminals.items()}
        self.pons = None if config.pon is None else PonDesk(self, config.pon)

    def close(self) -> None:
        if self.sql.executor is not None:
            self.sql.executor.shutdown(wait=True)
        self.db.engine.dispose()

    @property
    def orders(self) -> OrderView:
        return OrderView(self.db)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def refuse(self, status: int, reason: str,
               headers: dict[str, str] | None = None) -> Response:
        note(reason=reason)
        return JSONResponse({"released": False, "reason": reason}, status_code=status,
                            headers=headers)

    async def catalogue(self, request: Request) -> Response:
        c = self.config
        return JSONResponse({"merchant_id": c.merchant_id.hex().upper(),
                             "currency_code": c.currency_code,
                             "currency_exponent": c.currency_exponent,
                             "variants": c.enabled(),
                             "items": [{"sku": i.sku, "name": i.name, "price": i.price}
                                       for i in c.catalogue]})

    # --- GET, POST /v1/checkout/{sku} --------------------------------------------------------
    def choose_variant(self, asked: str | None, terminal: str | None) -> tuple[str, str]:
        """The merchant's choice: (variant name, client terminal id hex or "")."""
        c = self.config
        if terminal is not None:
            if not _HEX_TERMINAL.fullmatch(terminal):
                raise Refusal(400, "terminal: a client terminal id is 8 bytes of hex")
            if bytes.fromhex(terminal) not in self.terminal_keys:
                raise Refusal(403, f"client terminal {terminal.upper()} is not registered "
                                   "with this merchant")
        name = c.default_variant if asked is None else asked
        if name not in c.variants:
            raise Refusal(400, f"variant: this merchant enables {', '.join(c.enabled())}")
        if name == "fig7" and terminal is None:
            raise Refusal(403, "variant fig7 (the client compares the card's MAC2) is only for "
                               "a registered client terminal: name it with ?terminal=ID")
        return name, (terminal or "").upper()

    def new_order(self, sku: str, variant_name: str, client_terminal: str = "",
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The checkout answer and the order's row (not yet stored)."""
        c = self.config
        item = next((i for i in c.catalogue if i.sku == sku), None)
        if item is None:
            raise Refusal(404, f"no item {sku[:64]!r} in the catalogue")
        variant = M.VARIANTS[variant_name]
        txn_id = os.urandom(16)
        tsk = secure.new_key()
        purpose = M.PURPOSE_AUTHENTICATION if item.price == 0 else M.PURPOSE_PAYMENT
        now = self.now_ms()
        expires = now // 1000 + c.order_lifetime
        etsk = M.seal_ticket(c.shared_key, c.merchant_id, txn_id, {
            "version": M.VERSION, "tsk": tsk, "amount": item.price,
            "currency_code": c.currency_code, "currency_exponent": c.currency_exponent,
            "variant": variant, "purpose": purpose,
            "expires": expires, "terminal_id": c.terminal_id})
        row = {"txn_id": txn_id.hex(), "sku": item.sku, "item": item.name,
               "goods": item.goods, "amount": item.price, "variant": variant,
               "purpose": purpose, "client_terminal": client_terminal,
               "expires": expires * 1000,
               "confirm_until": (expires + c.confirm_grace) * 1000, "created": now}
        params = {
            "version": M.VERSION, "amount": item.price, "currency_code": c.currency_code,
            "currency_exponent": c.currency_exponent, "description": item.name,
            "payment_url": c.payment_url, "txn_id": txn_id.hex(),
            "merchant_id": c.merchant_id.hex(), "terminal_id": c.terminal_id.hex(),
            "status_url": f"{c.public_url}/v1/status/{txn_id.hex()}",
            "variant": variant_name, "purpose": "authentication" if purpose else "payment",
            "client_terminal": client_terminal, "expires": expires,
            "tsk": tsk.hex(), "etsk": etsk.hex(),
        }
        return params, row

    async def checkout(self, request: Request) -> Response:
        """``POST`` with :data:`CLIENT_HEADER`: a new order. Anything else makes no order."""
        c = self.config
        if request.method in ("GET", "HEAD"):
            return self.checkout_page(request)   # a person's page: no order, no key
        name, value = CLIENT_HEADER
        if request.headers.get(name) != value:
            return self.refuse(403, f"an order is made only for a client's POST with the header "
                                    f"{name}: {value}; a browser opens this URL to get the "
                                    "checkout page")
        address = (request.client.host if request.client else "unknown")[:64]
        try:
            variant, terminal = self.choose_variant(request.query_params.get("variant"),
                                                    request.query_params.get("terminal"))
            params, row = self.new_order(request.path_params["sku"], variant, terminal)
        except Refusal as exc:
            return self.refuse(exc.status, exc.reason)
        row["client_address"] = address
        now = row["created"]
        await self.sql(self.db.sweep, now)
        admitted = await self.sql(self.db.create, row, c.max_open_orders,
                                  c.max_open_per_client)
        if admitted == "full":
            wait = await self.sql(self.db.next_free, now)
            return self.refuse(503, f"too many open orders ({c.max_open_orders}): try again "
                                    "later", {"Retry-After": str(wait)})
        if admitted == "client":
            wait = await self.sql(self.db.next_free, now, address)
            return self.refuse(429, f"this client already has {c.max_open_per_client} open "
                                    "orders: pay or let them expire",
                               {"Retry-After": str(wait)})
        return JSONResponse(params)

    def checkout_page(self, request: Request) -> Response:
        """The checkout page of an item for a browser (see :mod:`.page`): it makes no order."""
        c = self.config
        sku = request.path_params["sku"]
        item = next((i for i in c.catalogue if i.sku == sku), None)
        if item is None:
            return page.error_page(404, f'No item "{sku[:64]}" in this shop.')
        variant = request.query_params.get("variant")
        if variant is not None and variant not in c.variants:
            return page.error_page(400, f"This shop takes {', '.join(c.enabled())}.")
        return page.checkout_page(item, currency_code=c.currency_code,
                                  exponent=c.currency_exponent, public_url=c.public_url,
                                  variant=variant)

    async def shop(self, request: Request) -> Response:
        c = self.config
        return page.shop_page(c.catalogue, currency_code=c.currency_code,
                              exponent=c.currency_exponent, merchant=c.merchant_id.hex().upper())

    # --- POST /v1/status/{txn} ---------------------------------------------------------------
    @staticmethod
    async def read_body(request: Request) -> bytes:
        try:
            return await read_body(request, MAX_CONFIRMATION)
        except Refused as exc:
            raise Refusal(exc.status, exc.reason) from None

    async def status(self, request: Request) -> Response:
        txn_hex = request.path_params["txn"]
        if not _HEX_TXN.fullmatch(txn_hex):
            return self.refuse(400, "the transaction id is not 16 bytes of hex")
        txn_id = bytes.fromhex(txn_hex)
        try:
            body = await self.read_body(request)
            row = await self.sql(self.db.get, txn_id.hex())
            if row is None:
                raise Refusal(404, "no such order")
            digest = MD.confirmation_digest(body)
            if row["state"] != MD.OPEN:
                return self.released_again(row, digest)
            now = self.now_ms()
            if now > row["confirm_until"]:
                raise Refusal(410, "the order has expired")
            state, result = check_confirmation(self.config.merchant_id,
                                               self.config.shared_key,
                                               self.terminal_keys, row, txn_id, body)
            # the checks are done: one conditional UPDATE decides who releases the goods
            receipt = {"txn_id": txn_id.hex(), "amount": int(row["amount"]),
                       "psam_id": result.psam_id.hex().upper(),
                       "terminal_txn_number": result.terminal_txn_number,
                       "card_serial": result.card_serial.hex().upper(),
                       "card_counter": result.card_counter,
                       "status": ("authentication OK"
                                  if result.status == M.STATUS_AUTHENTICATED else "paid"),
                       "proven": state == MD.PAID}
            release = self.db.release if self.pons is None else self.pons.release
            if not await self.sql(release, txn_id.hex(), state, json.dumps(receipt), now,
                                  digest):
                row = await self.sql(self.db.get, txn_id.hex())  # a copy won: which one?
                if row is None:
                    raise Refusal(404, "no such order")
                return self.released_again(row, digest)
        except Refusal as exc:
            return self.refuse(exc.status, exc.reason, exc.headers)
        return JSONResponse({"released": True, "goods": row["goods"], "item": row["item"],
                             "proven": state == MD.PAID, "receipt": receipt})

    def released_again(self, row: dict[str, Any], digest: str) -> Response:
        """A confirmation for an order no longer open: the very confirmation that released it
        (byte for byte: a client whose answer was lost) gets the same goods and receipt again;
        any other one, forged or altered, is refused 409 and gets nothing."""
        kept = row.get("confirmation") or ""
        if row["state"] not in MD.RELEASED or not kept or not hmac.compare_digest(kept, digest):
            return self.refuse(409, "this confirmation was already used: goods released once")
        note(outcome="the same confirmation again")
        return JSONResponse({"released": True, "goods": row["goods"], "item": row["item"],
                             "proven": row["state"] == MD.PAID,
                             "receipt": json.loads(row["receipt"]) if row["receipt"] else {}})

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/catalogue", self.catalogue, methods=["GET"]),
            Route("/v1/checkout/{sku}", self.checkout, methods=["GET", "POST"]),
            Route("/v1/status/{txn}", self.status, methods=["POST"]),
            Route("/shop/", self.shop, methods=["GET"]),
            Route(page.SCRIPT_PATH, page.script, methods=["GET"]),
            Route(page.STYLE_PATH, page.style, methods=["GET"]),
            Route("/v1/health", HealthCheck(
                "merchant", {"database": database_check(self.db.engine, MD.orders)},
                lambda: {"merchant_id": self.config.merchant_id.hex().upper()}).answer,
                methods=["GET"]),
            openapi_route("merchant"),
            *(self.pons.routes() if self.pons is not None else disabled_routes(self)),
        ], exception_handlers=dict(JSON_STORAGE_ERROR_HANDLERS),
            lifespan=with_writer_drained(self.sql),
            middleware=[Middleware(RequestLog, server="merchant")])

