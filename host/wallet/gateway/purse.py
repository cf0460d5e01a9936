"""A real card pays by its own purse (seed 003 embodiment 1 with a chip card; seed 002's
payment flow, with the gateway as the mall's merchant).

When a member's wallet chooses a *real* card for a mall's purchase, the gateway gives the page
a **checkout token** (the purchase id and an HMAC under the gateway's own key). The page hands
the checkout URL (on the web server, the page's own origin) to the local card helper (``svcard
helper``), which runs seed 002's payment: ``POST`` checkout -> this module's :func:`checkout`
makes ONE payment order for the purchase (a transaction id, the ticket sealed under the key
the mall's merchant id shares with the payment server: amount and currency of the purchase,
FIG. 6, an expiry no later than the purchase's); the payment server and its PSAM debit the
card and verify its MAC2; the helper brings the confirmation to :func:`status`, which opens
debit result M under that key and checks it is THIS order's (merchant = the mall's merchant
id, transaction, amount, variant, status OK) and made by the card chosen (its application
serial is ``0000`` + the card number; another card's verified debit is refused as this
purchase's payment, but that card's copy at the financial system is debited too, so its
balance follows its purse: :func:`paid_by_another`). Only then is the purchase marked paid
by the purse (one conditional UPDATE, ``open`` -> ``paid``). The mall's approval request is
matched as for a virtual card, and a real card's purchase is approved only once its purse payment is
recorded (:func:`purse_paid`). The financial system's copy of the card's value is debited as
soon as the purse payment is recorded (:func:`mirror`), under ``pay:PURCHASE``, the ref the
approval asks again: one debit, and the card's balance there follows its purse.

One order (one transaction id) per purchase, ever: a checkout asked again while that order is
open (not paid, not expired: the helper lost the answer, or the card refused before its debit,
e.g. its balance was too low and it was loaded since) gets a fresh ticket for the SAME
transaction; the payment server takes one draw per transaction, so it is one debit at most.
Once the order is paid, a checkout is refused. An exact repeat of the releasing confirmation (the
helper's answer was lost) gets the same answer again; any other confirmation is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ....protocols import messages as M
from ....protocols import secure
from ...kit.db import now_ms, reading, step
from ...kit.http import Refused, read_body
from ...kit.request_log import note
from ...kit.schema import Schema, prepare
from ..base import crash_point
from ..links import text
from . import db as D
from . import matching as X

if TYPE_CHECKING:
    from .app import GatewayServer

metadata = MetaData()
OPEN, PAID = "open", "paid"
TOKEN = re.compile(r"^[0-9a-f]{96}$")
TXN = re.compile(r"^[0-9a-f]{32}$")
MAX_CONFIRMATION = 4096
ORDER_SECONDS = 600
CLIENT_HEADER = ("X-Svcard-Client", "1")

orders = Table(
    "wg_purse_orders", metadata,
    Column("txn_id", String(32), primary_key=True),
    Column("purchase", String(32), nullable=False, unique=True),   # one order per purchase
    Column("card", String(16), nullable=False),
    Column("merchant_id", String(16), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency", Integer, nullable=False),
    Column("expires", BigInteger, nullable=False),                 # ms: the ticket's expiry
    Column("state", String(8), nullable=False),                    # open -> paid
    Column("confirmation", String(64), nullable=False),            # SHA-256 of the releasing one
    Column("receipt", String(400), nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
)

SCHEMA = Schema("wallet-gateway-purse", 1, metadata)


def open_tables(engine: Engine) -> None:
    prepare(engine, SCHEMA)


def card_serial(card: str) -> bytes:
    """A real card's purse application serial: ``0000`` + its number (fin/mail.py)."""
    return bytes.fromhex("0000" + card)


def checkout_token(key: bytes, pid: str) -> str:
    mac = hmac.new(key, b"svcard-wallet-purse-checkout-v1\n" + pid.encode(), hashlib.sha256)
    return pid + mac.hexdigest()


def token_purchase(key: bytes, value: str) -> str | None:
    if not TOKEN.fullmatch(value):
        return None
    pid = value[:32]
    return pid if hmac.compare_digest(checkout_token(key, pid), value) else None


# --- database steps ---------------------------------------------------------------------------

def new_order(engine: Engine, row: dict[str, Any]) -> bool:
    """Store the purchase's one order; False if it has one already (unique purchase)."""
    try:
        with step(engine) as conn:
            conn.execute(insert(orders).values(**row))
    except IntegrityError:
        return False
    return True


def order_of(engine: Engine, pid: str) -> dict[str, Any] | None:
    """The order of purchase ``pid`` (it has one at most), or None."""
    with reading(engine) as conn:
        row = conn.execute(select(orders).where(orders.c.purchase == pid)).first()
    return dict(row._mapping) if row is not None else None


def order(engine: Engine, txn_id: str) -> dict[str, Any] | None:
    with reading(engine) as conn:
        row = conn.execute(select(orders).where(orders.c.txn_id == txn_id)).first()
    return dict(row._mapping) if row is not None else None


def mark_paid(engine: Engine, txn_id: str, digest: str, receipt: str) -> bool:
    """``open`` -> ``paid``, once (compare-and-set)."""
    with step(engine) as conn:
        return bool(conn.execute(update(orders).where(
            orders.c.txn_id == txn_id, orders.c.state == OPEN).values(
            state=PAID, confirmation=digest, receipt=receipt, updated=now_ms())).rowcount)


def match_paid(engine: Engine, p: dict[str, Any], now: int, state: str = D.CHOSEN,
               extra: dict[str, str] | None = None) -> tuple[str, dict[str, Any] | None]:
    """:func:`matching.match` for a purchase its card's purse paid before it expired:
    ``chosen`` -> ``approving`` whatever the time, if every field equals the mall's view and
    a paid order of the same card, amount and currency exists (both in ONE conditional
    UPDATE). (``matched``, the purchase), else (its state, or ``expired``, and it)."""
    c = D.purchases.c
    wanted = {column: p[name] for name, column in X.FIELDS.items()} | (extra or {})
    evidence = select(orders.c.txn_id).where(
        orders.c.purchase == c.id, orders.c.state == PAID, orders.c.card == c.card,
        orders.c.amount == c.amount, orders.c.currency == c.currency).exists()
    with step(engine) as conn:
        done = conn.execute(update(D.purchases).where(
            *[c[column] == value for column, value in wanted.items()],
            c.state == state, evidence).values(state=D.APPROVING, updated=now)).rowcount
        row = conn.execute(select(D.purchases).where(
            c.mall == p["mall"], c.mall_order == p["order"])).first()
    found = dict(row._mapping) if row is not None else None
    if done == 1:
        return "matched", found
    state = found["state"] if found is not None else ""
    return (state if state in (D.APPROVING, D.APPROVED, D.DECLINED) else "expired"), found


def purse_paid(engine: Engine, pid: str) -> dict[str, Any] | None:
    """The paid purse order of purchase ``pid`` (the evidence its approval needs), or None."""
    with reading(engine) as conn:
        row = conn.execute(select(orders).where(orders.c.purchase == pid,
                                                orders.c.state == PAID)).first()
    return dict(row._mapping) if row is not None else None


MIRROR_AGAIN_MS = 7 * 86_400_000   # paid orders this recent are mirrored again at a start


def unmirrored(engine: Engine, since: int) -> list[str]:
    """Purchases paid by their purse (since ``since``, ms) that the mall has not asked
    approval of: their financial system's debit may never have been made (:func:`mirror`
    is best effort, and the gateway may have died right after recording the payment)."""
    c = D.purchases.c
    with reading(engine) as conn:
        rows = conn.execute(select(orders.c.purchase).join(
            D.purchases, c.id == orders.c.purchase).where(
            orders.c.state == PAID, orders.c.updated >= since,
            c.state.in_((D.CHOSEN, D.FILLED)))).all()
    return [str(r[0]) for r in rows]


def payable(server: GatewayServer, p: dict[str, Any]) -> None:
    """A purchase a real card's purse can pay here, else Refused (400), nothing stored."""
    if p["mall"] not in server.purse().merchants:
        raise Refused(400, 400, "purchase.mall: this mall takes no real card here")
    if p["amount"] > min(server.purse().balance_limit, 0xFFFFFFFF):
        # never payable by a purse (nor in a payment ticket's 32 bits)
        raise Refused(400, 400, "purchase.amount: more than a real card's purse can hold")


# --- the card helper's requests ---------------------------------------------------------------

async def checkout(server: GatewayServer, request: Request) -> Response:
    """``POST /v1/purse/checkout`` (the web server's link; the helper's checkout POST passed
    on): ``{"token": CHECKOUT_TOKEN}`` -> seed 002's payment parameters for the purchase."""
    _, data = await server.linked(request, server.config.web_keys)
    settings = server.purse()
    pid = token_purchase(server.config.secret_key, text(data, "token", TOKEN))
    if pid is None:
        raise Refused(403, 403, "not a checkout this gateway made")
    found = await server.sql(X.purchase, server.engine, pid)
    now = server.now_ms()
    if found is None or found["state"] not in (D.CHOSEN, D.FILLED):
        raise Refused(409, 409, "this purchase is not waiting for its card's payment")
    if found["expires"] <= now:
        raise Refused(410, 410, "the purchase expired")
    merchant = settings.merchants.get(found["mall"])
    if merchant is None:
        raise Refused(409, 409, "this mall takes no real card here")
    if await server.card_kind(found["member"], found["card"]) != "real":
        raise Refused(409, 409, "the purchase's card is not a real card")
    merchant_id, key = merchant
    made = None
    if await server.sql(order_of, server.engine, pid) is None:
        txn_id, expires = os.urandom(16), min(now // 1000 + ORDER_SECONDS,
                                              found["expires"] // 1000)
        made = {"txn_id": txn_id.hex(), "purchase": pid, "card": found["card"],
                "merchant_id": merchant_id.hex(), "amount": found["amount"],
                "currency": found["currency"], "expires": expires * 1000, "state": OPEN,
                "confirmation": "", "receipt": "", "created": now, "updated": now}
        if not await server.sql(new_order, server.engine, made):
            made = None   # raced: another checkout made the purchase's order first
    row = made or await server.sql(order_of, server.engine, pid)
    if row is None or row["state"] != OPEN:
        raise Refused(409, 409, "this purchase is paid by its card already: it is never "
                                "paid twice (the card helper finishes an interrupted one)")
    if row["expires"] <= now:
        raise Refused(410, 410, "the purchase's card payment order expired")
    if row["merchant_id"] != merchant_id.hex():
        raise Refused(409, 409, "the mall's merchant id changed: this order is not its own")
    # the order's ticket, fresh (a new session key) for the SAME transaction every time: the
    # payment server takes one draw per transaction, so tickets answered again stay one debit
    txn_id, expires = bytes.fromhex(row["txn_id"]), int(row["expires"]) // 1000
    tsk = secure.new_key()
    etsk = M.seal_ticket(key, merchant_id, txn_id, {
        "version": M.VERSION, "tsk": tsk, "amount": int(row["amount"]),
        "currency_code": int(row["currency"]), "currency_exponent": settings.exponent,
        "variant": M.FIG6_SERVER_COMPARES, "purpose": M.PURPOSE_PAYMENT,
        "expires": expires, "terminal_id": settings.payment_terminal})
    note(txn=pid, step="purse-checkout")
    return JSONResponse({
        "version": M.VERSION, "amount": int(row["amount"]), "currency_code": int(row["currency"]),
        "currency_exponent": settings.exponent,
        "description": f"{found['mall']} order {found['mall_order']}",
        "payment_url": settings.payment_url, "txn_id": txn_id.hex(),
        "merchant_id": merchant_id.hex(), "terminal_id": settings.payment_terminal.hex(),
        "status_url": f"{settings.public_url}/v1/purse/status/{txn_id.hex()}",
        "variant": "fig6", "purpose": "payment", "client_terminal": "", "expires": expires,
        "tsk": tsk.hex(), "etsk": etsk.hex()})


def check(key: bytes, row: dict[str, Any], txn_id: bytes, body: bytes) -> dict[str, Any]:
    """Every check of a confirmation for the order ``row``: the receipt, else Refused."""
    merchant_id = bytes.fromhex(row["merchant_id"])
    try:
        conf = M.parse(M.Confirmation, body, "confirmation")
        if conf.version != M.VERSION or conf.txn_id != txn_id or \
                conf.variant != M.FIG6_SERVER_COMPARES:
            raise Refused(400, 400, "the confirmation is not for this order")
        result = M.open_result_m(key, merchant_id, txn_id, conf.result_m)
    except (M.MessageError, secure.SealError) as exc:
        raise Refused(400, 400, f"forged confirmation: {exc}") from None
    if result.status != M.STATUS_OK:
        raise Refused(402, 402, f"the payment server did not confirm: {result.reason}")
    if (result.merchant_id, result.txn_id, result.amount, result.variant) != (
            merchant_id, txn_id, int(row["amount"]), M.FIG6_SERVER_COMPARES):
        raise Refused(400, 400, "the confirmation does not match the order")
    return {"txn_id": txn_id.hex(), "amount": int(row["amount"]),
            "psam_id": result.psam_id.hex().upper(),
            "terminal_txn_number": result.terminal_txn_number,
            "card_serial": result.card_serial.hex().upper(),
            "card_counter": result.card_counter, "status": "paid", "proven": True}


async def status(server: GatewayServer, request: Request) -> Response:
    """``POST /v1/purse/status/{txn}``: the card's payment confirmed (seed 002 step 636)."""
    settings = server.purse()
    txn_hex = request.path_params["txn"]
    if not TXN.fullmatch(txn_hex):
        raise Refused(400, 400, "the transaction id is not 16 bytes of hex")
    body = await read_body(request, MAX_CONFIRMATION)
    row = await server.sql(order, server.engine, txn_hex)
    if row is None:
        raise Refused(404, 404, "no such order")
    digest = hashlib.sha256(body).hexdigest()
    note(txn=row["purchase"], step="purse-status")
    if row["state"] == OPEN:
        # no deadline here: a confirmation that verifies is a debit the payment server made
        # before the ticket expired (the card's value is the mall's), however late the
        # helper's journal brings it; refusing it lost the payment (review2)
        # the key of the purchase's own mall (not the first mall named with this merchant id)
        bought = await server.sql(X.purchase, server.engine, row["purchase"])
        merchant = settings.merchants.get(bought["mall"]) if bought is not None else None
        if merchant is None or merchant[0].hex() != row["merchant_id"]:
            raise Refused(409, 409, "the mall no longer takes real cards here")
        receipt = check(merchant[1], row, bytes.fromhex(txn_hex), body)
        if receipt["card_serial"] != card_serial(row["card"]).hex().upper():
            # the payment server debited another card for this mall: never this purchase's
            # payment, but that card's copy at the financial system follows its purse
            await paid_by_another(server, row, receipt["card_serial"], txn_hex)
            raise Refused(403, 403, "another card paid: the purchase's card must pay it")
        crash_point("gateway-after-purse")        # the card debited, nothing recorded here
        if await server.sql(mark_paid, server.engine, txn_hex, digest,
                            json.dumps(receipt, sort_keys=True)):
            crash_point("gateway-after-purse-paid")   # recorded, the answer never sent
            await mirror(server, row["purchase"])
            return _released(row, receipt)
        row = await server.sql(order, server.engine, txn_hex) or row
    if row["state"] == PAID and hmac.compare_digest(row["confirmation"], digest):
        await mirror(server, row["purchase"])   # once by its ref: a mirror missed is made
        return _released(row, json.loads(row["receipt"]))   # the same one again: lost answer
    raise Refused(409, 409, "this order was paid already: confirmed once")


async def mirror(server: GatewayServer, pid: str) -> None:
    """The purse has paid: the financial system's copy of the card's value is debited now,
    under the purchase's own ref ``pay:PURCHASE`` (the approval asks the same ref again, so
    it is one debit whenever it comes; a mall that never asks still sees the card's balance
    agree with its purse). Best effort: an unreachable financial system is asked again by
    the approval."""
    found = await server.sql(X.purchase, server.engine, pid)
    if found is None or found["state"] not in (D.CHOSEN, D.FILLED):
        return   # the approval has asked for (or made) the same debit already
    status, _ = await server.ask_fin_quietly("/v1/debits", {
        "ref": "pay:" + pid, "card": found["card"], "amount": found["amount"],
        "currency": found["currency"], "mall": found["mall"], "order": found["mall_order"]})
    note(step="purse-mirrored" if status == 200 else "purse-mirror-later")


async def paid_by_another(server: GatewayServer, row: dict[str, Any], serial: str,
                          txn_hex: str) -> None:
    """A verified purse debit of card ``serial`` (not the purchase's) for order ``row``: the
    financial system's copy of that card is debited too, once (ref ``purse:TXN``), so its
    balance and statement agree with its purse; the purchase stays unpaid (review2)."""
    number = serial[4:]
    found = await server.sql(X.purchase, server.engine, row["purchase"])
    if not serial.startswith("0000") or not number.isdigit() or found is None:
        return
    status, _ = await server.ask_fin_quietly("/v1/debits", {
        "ref": "purse:" + txn_hex, "card": number, "amount": int(row["amount"]),
        "currency": int(row["currency"]), "mall": found["mall"], "order": found["mall_order"]})
    note(step="purse-other-card-mirrored" if status == 200 else "purse-other-card-later")


def _released(row: dict[str, Any], receipt: dict[str, Any]) -> Response:
    return JSONResponse({"released": True, "goods": f"wallet purchase {row['purchase']}",
                         "item": "a purchase from the wallet", "proven": True,
                         "receipt": receipt})
