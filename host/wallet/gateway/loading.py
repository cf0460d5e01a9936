"""A real card charged through seed 002's load flow (FIG. 17-18), the gateway in the bank's
role.

A charge of a *real* card moves the money at the financial system as for a virtual card (the
source debited, the card's balance there credited: it counts what the purse holds or is owed)
and makes ONE **load order** here, by the charge's unique ref (a cash top-up's order is made
when the financial system's report of it arrives). The order is paid out to the card's purse
by the load flow: the page gives the card helper the bank URL (on the web server, the page's
own origin), the order id as ``account`` and the order's token (an HMAC under the gateway's own
key) as ``secret``; the helper runs :func:`svcard.host.load.client.load`, which asks
:func:`start` for the load parameters (the ticket sealed under the key the gateway shares
with the load server, binding amount, currency, the card's serial and issuer), lets the load
server and its HSM load the card, and carries the load server's sealed confirmation to
:func:`status`.

States: ``ready`` -> ``debited`` (a load started: its transaction id and the client's request
id kept) -> ``loaded``; a load the load server decided **not loaded** goes back to ``ready``
(the money stays owed to the card: the next contact loads it). Only the order's card (its
purse serial is ``0000`` + the card number) and only its amount are loaded; a start with
another request id while a load is under way is refused (the helper's journal finishes that
one: its own resume asks again with the same request id, and gets the same load). Nothing is
ever loaded twice: the load server decides each transaction once, and a confirmation counts
once (compare-and-set on ``debited``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import BigInteger, Column, Engine, Integer, String, Table, insert, select, update
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ....protocols import loadmsg as L
from ....protocols import messages as M
from ....protocols import secure
from ...kit.db import now_ms, reading, step
from ...kit.http import Refused, read_body, read_json
from ...kit.request_log import note
from ..base import crash_point
from .purse import card_serial, metadata

if TYPE_CHECKING:
    from .app import GatewayServer

READY, DEBITED, LOADED = "ready", "debited", "loaded"
ORDER = re.compile(r"^[0-9a-f]{32}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
ORDER_SECONDS = 600
MAX_CONFIRMATION = 4096

loads = Table(
    "wg_loads", metadata,
    Column("order_id", String(32), primary_key=True),
    Column("ref", String(64), nullable=False, unique=True),      # the movement's ref
    Column("member", String(40), nullable=False),
    Column("card", String(16), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency", Integer, nullable=False),
    Column("state", String(8), nullable=False),
    Column("txn_id", String(32), unique=True),                   # the load under way or done
    Column("request_id", String(64)),                            # its client's request id
    Column("issuer_id", String(16), nullable=False),
    Column("reason", String(200), nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
)


def order_id(ref: str) -> str:
    return hashlib.sha256(b"svcard-wallet-load-order\n" + ref.encode()).hexdigest()[:32]


def load_token(key: bytes, order: str) -> str:
    return hmac.new(key, b"svcard-wallet-load-v1\n" + order.encode(),
                    hashlib.sha256).hexdigest()


# --- database steps ---------------------------------------------------------------------------

def ensure(engine: Engine, ref: str, member: str, card: str, amount: int,
           currency: int) -> str:
    """The load order of movement ``ref`` (made once: a repeated charge finds it)."""
    order = order_id(ref)
    now = now_ms()
    try:
        with step(engine) as conn:
            if conn.execute(select(loads.c.order_id).where(loads.c.ref == ref)).first() is None:
                conn.execute(insert(loads).values(
                    order_id=order, ref=ref, member=member, card=card, amount=amount,
                    currency=currency, state=READY, txn_id=None, request_id=None,
                    issuer_id="", reason="", created=now, updated=now))
    except IntegrityError:
        pass   # the same ref at the same moment: the other made it
    return order


def get(engine: Engine, **where: str) -> dict[str, Any] | None:
    with reading(engine) as conn:
        row = conn.execute(select(loads).where(
            *[loads.c[k] == v for k, v in where.items()])).first()
    return dict(row._mapping) if row is not None else None


def pending(engine: Engine, member: str) -> list[dict[str, Any]]:
    with reading(engine) as conn:
        rows = conn.execute(select(loads).where(
            loads.c.member == member, loads.c.state.in_((READY, DEBITED)))
            .order_by(loads.c.created)).all()
    return [dict(r._mapping) for r in rows]


def begin(engine: Engine, order: str, txn_id: str, request_id: str | None,
          issuer: str) -> bool:
    """``ready`` -> ``debited`` with this load's transaction, once (compare-and-set)."""
    with step(engine) as conn:
        return bool(conn.execute(update(loads).where(
            loads.c.order_id == order, loads.c.state == READY).values(
            state=DEBITED, txn_id=txn_id, request_id=request_id, issuer_id=issuer,
            updated=now_ms())).rowcount)


def register(engine: Engine, txn_id: str, loaded: bool, reason: str) -> bool:
    """The load server's decision, once: loaded, or the order ``ready`` again."""
    with step(engine) as conn:
        values: dict[str, Any] = {"state": LOADED, "reason": reason[:200]} if loaded else {
            "state": READY, "txn_id": None, "request_id": None, "reason": reason[:200]}
        return bool(conn.execute(update(loads).where(
            loads.c.txn_id == txn_id, loads.c.state == DEBITED).values(
            updated=now_ms(), **values)).rowcount)


# --- the bank's face, for the card helper -----------------------------------------------------

def _int(value: Any, name: str, high: int = 0xFFFFFFFF) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        raise Refused(400, 400, f"{name}: an integer 0..{high}")
    return value


def _text(data: Any, name: str, pattern: re.Pattern[str]) -> str:
    value = data.get(name) if isinstance(data, dict) else None
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise Refused(400, 400, f"{name}: not a valid value")
    return value


async def page(server: GatewayServer, request: Request) -> Response:
    """``GET /v1/bank``: where a load starts."""
    s = server.purse()
    return JSONResponse({"bank_id": s.bank_id.hex(), "currency_code": server.config.currency,
                         "currency_exponent": s.exponent,
                         "start_url": f"{s.public_url}/v1/bank/start"})


async def start(server: GatewayServer, request: Request) -> Response:
    """``POST /v1/bank/start`` (steps 872-874): the load parameters of an order."""
    s = server.purse()
    data = await read_json(request, 4096)
    order = _text(data, "account", ORDER)
    given = _text(data, "secret", HEX64)
    if not hmac.compare_digest(given, load_token(server.config.secret_key, order)):
        raise Refused(403, 403, "unknown account or wrong secret")
    card = data.get("card")
    if not isinstance(card, dict):
        raise Refused(400, 400, "card: an object")
    serial = _text(card, "serial", re.compile(r"^[0-9A-Fa-f]{20}$")).lower()
    issuer = _text(card, "issuer_id", re.compile(r"^[0-9A-Fa-f]{16}$")).lower()
    balance = _int(card.get("balance"), "card.balance")
    limit = card.get("limit")
    currency = _int(card.get("currency_code"), "card.currency_code", 0xFFFF)
    amount = _int(data.get("amount"), "amount")
    request_id = data.get("request_id")
    if request_id is not None and (not isinstance(request_id, str)
                                   or not REQUEST_ID.fullmatch(request_id)):
        raise Refused(400, 400, "request_id: 8 to 64 letters, digits, - or _")
    row = await server.sql(get, server.engine, order_id=order)
    if row is None:
        raise Refused(403, 403, "unknown account or wrong secret")
    note(txn=order, step="load-start")
    if serial != card_serial(row["card"]).hex():
        raise Refused(403, 403, "this charge is for another card")
    if (amount, currency) != (row["amount"], row["currency"]):
        raise Refused(400, 400, "the amount or currency is not the charge's")
    room = min(s.balance_limit, s.balance_limit if limit is None
               else _int(limit, "card.limit")) - balance
    if amount > room:
        raise Refused(400, 400, f"the card can take at most {max(room, 0)} more")
    if row["state"] == READY and data.get("lookup_only") is not True:
        txn = os.urandom(16).hex()
        if await server.sql(begin, server.engine, order, txn, request_id, issuer):
            return JSONResponse(_parameters(server, bytes.fromhex(txn), row, issuer))
        row = await server.sql(get, server.engine, order_id=order) or row
    if row["state"] == DEBITED and request_id is not None and \
            row["request_id"] == request_id and row["issuer_id"] == issuer:
        return JSONResponse(_parameters(server, bytes.fromhex(row["txn_id"]), row, issuer))
    if row["state"] == READY:
        raise Refused(404, 404, "no load with this request id: nothing was started")
    raise Refused(409, 409, f"this charge is {row['state']} already: its own load is "
                            "finished by the card helper's journal")


def _parameters(server: GatewayServer, txn_id: bytes, row: dict[str, Any],
                issuer: str) -> dict[str, Any]:
    s = server.purse()
    tsk = secure.new_key()
    now = int(time.time())
    etsk = L.seal_ticket(s.bank_key, s.bank_id, txn_id, {
        "version": L.LOAD_TICKET_VERSION, "tsk": tsk, "amount": row["amount"],
        "currency_code": row["currency"], "currency_exponent": s.exponent,
        "card_serial": card_serial(row["card"]), "bank_time": now,
        "expires": now + ORDER_SECONDS, "terminal_id": s.load_terminal,
        "issuer_id": bytes.fromhex(issuer)})
    return {"version": M.VERSION, "amount": row["amount"], "currency_code": row["currency"],
            "currency_exponent": s.exponent, "load_url": s.load_url, "txn_id": txn_id.hex(),
            "bank_id": s.bank_id.hex(), "terminal_id": s.load_terminal.hex(),
            "bank_time": now, "status_url": f"{s.public_url}/v1/bank/status/{txn_id.hex()}",
            "card_serial": card_serial(row["card"]).hex(), "account": row["order_id"],
            "tsk": tsk.hex(), "etsk": etsk.hex()}


async def status(server: GatewayServer, request: Request) -> Response:
    """``POST /v1/bank/status/{txn}`` (step 891-892): the load server's sealed decision."""
    s = server.purse()
    txn_hex = request.path_params["txn"]
    if not ORDER.fullmatch(txn_hex):
        raise Refused(400, 400, "the transaction id is not 16 bytes of hex")
    row = await server.sql(get, server.engine, txn_id=txn_hex)
    if row is None:
        raise Refused(409, 409, "no load under way with this transaction (registered already)")
    txn_id = bytes.fromhex(txn_hex)
    try:
        msg = M.parse(L.BankConfirmation, await read_body(request, MAX_CONFIRMATION),
                      "load confirmation")
        if msg.txn_id != txn_id:
            raise Refused(400, 400, "the confirmation is for another load")
        conf = L.open_confirmation(s.bank_key, s.bank_id, txn_id, msg.confirmation)
    except (M.MessageError, secure.SealError) as exc:
        raise Refused(400, 400, f"forged confirmation: {exc}") from None
    if (conf.bank_id, conf.txn_id, conf.amount, conf.card_serial) != (
            s.bank_id, txn_id, row["amount"], card_serial(row["card"])):
        raise Refused(400, 400, "the confirmation does not match the load")
    loaded = conf.outcome == L.OUTCOME_LOADED
    note(txn=row["order_id"], step="load-status", outcome="loaded" if loaded else "not loaded")
    crash_point("gateway-after-load")   # the card loaded (or not), nothing registered here
    if not await server.sql(register, server.engine, txn_hex, loaded, conf.reason):
        raise Refused(409, 409, "this load was already registered")
    return JSONResponse({"registered": True, "outcome": "loaded" if loaded else "not loaded",
                         "amount": row["amount"], "refunded": 0, "reason": conf.reason,
                         "again": not loaded})
