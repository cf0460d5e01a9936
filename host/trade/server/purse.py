"""The account manager's purse desk (issue 15 point 7): a purse card funds a session.

The deposit is ONE seed-002 purchase into a payment server's PSAM, this account manager being
that server's merchant; the unspent rest goes back by ONE seed-002 load onto the same card,
this account manager in the bank's role. ``POST /v1/purse/orders`` (the customer's signed
initiation) makes a payment order (``/v1/purse/{order}/checkout``); its confirmation
(``/v1/purse/{order}/status``) must carry debit result M of exactly this order (merchant,
transaction, amount, FIG. 6, currency, status OK), kept with the card's serial, counter and
TAC in one step; only then does the initiation run, and the signed ``opened`` answer goes
back in the receipt. The same confirmation again gets the same session; a session that
cannot open makes the whole deposit due back. At the clearing the rest becomes due
(``billing.take_withdrawal``); ``/v1/purse/bank*`` is the bank's side of ``svcard load``:
account = the order, secret = the session key's signature of it, only the card that paid,
only the rest, one load at a time (``due`` -> ``started`` -> ``loaded``, or ``due`` again
when the load server decides "not loaded"). docs/trade.md, "A purse card funds a session".
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ....protocols import loadmsg as L
from ....protocols import messages as PM
from ....protocols import secure
from ...kit.db import first_row, step
from ...kit.http import Refused, read_body, read_json
from ...kit.request_log import note
from .. import db as D
from .. import messages as M
from .. import signing as S
from ..config import PurseSettings
from ..money import exponent
from .common import authenticated, refused

if TYPE_CHECKING:
    from .account import AccountManager

LOAD = b"svcard-trade-purse-load/1\n"     # the session key: "load the rest of this order"
ORDER_SECONDS = 600
ORDER_ID = re.compile(r"[0-9a-f]{32}")
REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
MAX_CONFIRMATION = 4096
ORDERED, PAID, OPENED, REFUSED = "ordered", "paid", "open", "refused"
NONE, DUE, STARTED, LOADED = "none", "due", "started", "loaded"
P = D.am_purse.c


def load_secret(session_key: bytes, order_id: str) -> str:
    """The ``secret`` of the rest's load: the session key's signature of the order id."""
    return S.sign(session_key, LOAD, order_id.encode())


# --- database steps ----------------------------------------------------------------------

def _row(conn: Any, **where: Any) -> dict[str, Any] | None:
    got = conn.execute(select(D.am_purse).filter_by(**where)).first()
    return None if got is None else dict(got._mapping)


def new_order(engine: Engine, values: dict[str, Any]) -> dict[str, Any]:
    """The order of (customer, txn): this one, or the one made before."""
    try:
        with step(engine) as conn:
            conn.execute(insert(D.am_purse).values(**values))
    except IntegrityError:
        pass
    found = first_row(engine, D.am_purse, customer=values["customer"], txn=values["txn"])
    assert found is not None
    return found


def take_payment(engine: Engine, order_id: str, digest: str, result: Any,
                 now: int) -> dict[str, Any]:
    """``ordered`` -> ``paid`` with the card's evidence, in ONE step; the row after."""
    with step(engine) as conn:
        conn.execute(update(D.am_purse).where(P.order_id == order_id, P.state == ORDERED)
                     .values(state=PAID, confirmation=digest,
                             card_serial=result.card_serial.hex(),
                             card_counter=result.card_counter, tac=result.tac.hex(),
                             updated=now))
        row = _row(conn, order_id=order_id)
    assert row is not None
    return row


def settle_order(engine: Engine, order_id: str, state: str, session: str | None,
                 now: int) -> None:
    """``paid`` -> ``open`` | ``refused`` (compare-and-set); refused: the whole deposit is
    due back to the card, in the same step."""
    values: dict[str, Any] = {"state": state, "session": session, "updated": now}
    if state == REFUSED:
        values.update(rest=P.amount, load_state=DUE)
    with step(engine) as conn:
        conn.execute(update(D.am_purse).where(P.order_id == order_id, P.state == PAID)
                     .values(**values))


def start_load(engine: Engine, order_id: str, request_id: str, txn: str,
               now: int) -> tuple[str, dict[str, Any] | None]:
    """``due`` -> ``started`` for this request, in ONE step: (``new`` | ``same`` (this
    request's load again) | ``busy`` (another request's) | the load state, the row)."""
    with step(engine) as conn:
        row = _row(conn, order_id=order_id)
        if row is None:
            return "none", None
        if row["load_state"] == STARTED:
            return ("same" if row["load_request"] == request_id else "busy"), row
        if row["load_state"] != DUE:
            return row["load_state"], row
        conn.execute(update(D.am_purse).where(P.order_id == order_id, P.load_state == DUE)
                     .values(load_state=STARTED, load_request=request_id, load_txn=txn,
                             updated=now))
        return "new", _row(conn, order_id=order_id)


def finish_load(engine: Engine, load_txn: str, loaded: bool, now: int) -> bool:
    """``started`` -> ``loaded`` (or ``due`` again when not loaded), once."""
    with step(engine) as conn:
        return conn.execute(update(D.am_purse).where(
            P.load_txn == load_txn, P.load_state == STARTED).values(
            load_state=LOADED if loaded else DUE, updated=now)).rowcount == 1


def check_confirmation(p: PurseSettings, row: dict[str, Any], body: bytes) -> Any:
    """Debit result M of this order, every field checked (else Refused)."""
    order = bytes.fromhex(row["order_id"])
    try:
        conf = PM.parse(PM.Confirmation, body, "confirmation")
        if conf.version != PM.VERSION or conf.txn_id != order or \
                conf.variant != PM.FIG6_SERVER_COMPARES:
            raise Refused(400, 400, "the confirmation is not for this order")
        result = PM.open_result_m(p.payment_key, p.merchant_id, order, conf.result_m)
    except (PM.MessageError, secure.SealError) as exc:
        raise Refused(400, 400, f"forged confirmation: {exc}") from None
    if result.status != PM.STATUS_OK:
        raise Refused(402, 402, f"the payment server did not confirm: {result.reason}")
    if (result.merchant_id, result.txn_id, result.amount, result.variant,
            result.currency_code) != (p.merchant_id, order, row["amount"],
                                      PM.FIG6_SERVER_COMPARES, p.currency_code):
        raise Refused(400, 400, "the confirmation does not match the order")
    return result


class PurseDesk:
    def __init__(self, am: AccountManager) -> None:
        self.am = am

    def settings(self) -> PurseSettings:
        if self.am.config.purse is None:
            raise Refused(404, 404, "this account manager takes no purse deposits")
        return self.am.config.purse

    def routes(self) -> list[Route]:
        def route(path: str, handler: Any, method: str = "POST") -> Route:
            async def call(request: Request) -> Response:
                try:
                    answer: Response = await handler(request)
                    return answer
                except Refused as exc:
                    return refused(exc)
            return Route(path, call, methods=[method])
        return [route("/v1/purse/orders", self._order),
                route("/v1/purse/bank", self._bank, "GET"),
                route("/v1/purse/bank/start", self._start),
                route("/v1/purse/bank/status/{txn}", self._loaded),
                route("/v1/purse/{order}/checkout", self._checkout),
                route("/v1/purse/{order}/status", self._status)]

    async def _order_row(self, request: Request) -> dict[str, Any]:
        order = request.path_params["order"]
        row = await self.am.sql(first_row, self.am.engine, D.am_purse, order_id=order) \
            if ORDER_ID.fullmatch(order) else None
        if row is None:
            raise Refused(404, 404, "no such purse order")
        return row

    # --- the deposit: a purchase into this desk's PSAM ------------------------------------
    async def _order(self, request: Request) -> Response:
        am = self.am
        now = am.now_ms()
        body, data, _ = await authenticated(request, M.INITIATION, "initiation", S.INITIATION,
                                            am._customer_key, now // 1000)
        p = self.settings()
        if data["currency"] != p.currency:
            raise Refused(400, 400, f"initiation.currency: the purse cards here hold "
                                    f"{p.currency}, not {data['currency']}")
        if not 0 < data["deposit"] <= 0xFFFFFFFF:
            raise Refused(400, 400, "initiation.deposit: a purse pays 1..4294967295")
        am.operator_of(data)            # an unknown operator: refused before the card pays
        who = await am.sql(first_row, am.engine, D.am_customers, id=data["customer"])
        if who is None or who["currency"] != data["currency"] or \
                who["reserved"] + data["deposit"] > who["credit_limit"]:
            raise Refused(402, 402, "over the credit limit or another account currency "
                                    "(checked again when the session opens)")
        order_id = os.urandom(16)
        tsk, expires = secure.new_key(), now // 1000 + ORDER_SECONDS
        etsk = PM.seal_ticket(p.payment_key, p.merchant_id, order_id, {
            "version": PM.VERSION, "tsk": tsk, "amount": data["deposit"],
            "currency_code": p.currency_code, "currency_exponent": exponent(p.currency),
            "variant": PM.FIG6_SERVER_COMPARES, "purpose": PM.PURPOSE_PAYMENT,
            "expires": expires, "terminal_id": p.payment_terminal})
        params = {"version": PM.VERSION, "amount": data["deposit"],
                  "currency_code": p.currency_code,
                  "currency_exponent": exponent(p.currency), "payment_url": p.payment_url,
                  "txn_id": order_id.hex(), "merchant_id": p.merchant_id.hex(),
                  "terminal_id": p.payment_terminal.hex(), "variant": "fig6",
                  "purpose": "payment", "client_terminal": "", "expires": expires,
                  "description": f"trading-session deposit ({data['merchant']})",
                  "status_url": f"{p.public_url}/v1/purse/{order_id.hex()}/status",
                  "tsk": tsk.hex(), "etsk": etsk.hex()}
        row = await am.sql(new_order, am.engine, {
            "order_id": order_id.hex(), "customer": data["customer"], "txn": data["txn"],
            "initiation": json.dumps(data), "digest": M.digest(body),
            "amount": data["deposit"], "currency": data["currency"],
            "params": json.dumps(params), "state": ORDERED, "confirmation": "",
            "card_serial": "", "card_counter": 0, "tac": "", "session": None, "rest": 0,
            "load_state": NONE, "load_txn": "", "load_request": "", "created": now,
            "updated": now})
        if row["digest"] != M.digest(body):
            raise Refused(409, 409, "this txn was used for another order")
        note(txn=row["order_id"], step="purse-order")
        return JSONResponse({"order": row["order_id"], "amount": row["amount"],
                             "currency": row["currency"], "checkout_url":
                             f"{p.public_url}/v1/purse/{row['order_id']}/checkout"})

    async def _checkout(self, request: Request) -> Response:
        self.settings()
        return JSONResponse(json.loads((await self._order_row(request))["params"]))

    async def _status(self, request: Request) -> Response:
        p, am = self.settings(), self.am
        row = await self._order_row(request)
        body = await read_body(request, MAX_CONFIRMATION)
        digest = hashlib.sha256(body).hexdigest()
        note(txn=row["order_id"], step="purse-status")
        if row["state"] == ORDERED:
            result = check_confirmation(p, row, body)
            row = await am.sql(take_payment, am.engine, row["order_id"], digest, result,
                               am.now_ms())
        if not hmac.compare_digest(row["confirmation"], digest):
            raise Refused(409, 409, "this order was paid by another confirmation")
        if row["state"] == PAID:
            row = await self._open(row)
        if row["state"] == PAID:
            return JSONResponse({"released": False, "reason": "the session's opening is in "
                                 "doubt: send the confirmation again later"}, status_code=503)
        receipt: dict[str, Any] = {"order": row["order_id"], "session": row["session"] or ""}
        if row["state"] == OPENED:
            held = await am.sql(first_row, am.engine, D.am_sessions, session=row["session"])
            assert held is not None and held["opened"]
            receipt.update(opened=held["opened"], signature=S.sign(
                am.config.private_key, S.OPENED, held["opened"].encode()))
        else:
            receipt.update(refused="the session did not open: the whole deposit is "
                                   "loaded back onto the card", load_due=row["rest"])
        return JSONResponse({"released": True, "goods": f"trading session "
                             f"{row['session'] or '(not opened)'}", "proven": True,
                             "item": "trading-session deposit", "receipt": receipt})

    async def _open(self, row: dict[str, Any]) -> dict[str, Any]:
        """Run the paid order's initiation (once: a second run finds its session by txn)."""
        am = self.am
        data = json.loads(row["initiation"])

        async def held() -> dict[str, Any] | None:
            return await am.sql(first_row, am.engine, D.am_sessions,
                                customer=row["customer"], txn=row["txn"])
        if await held() is None:
            with contextlib.suppress(Refused):    # no session made: refused below
                await am.open_initiation(data, row["digest"])
        found = await held()
        found = found if found and found["digest"] == row["digest"] else None  # this one's only
        if found is None or found["state"] == D.REFUSED:
            await am.sql(settle_order, am.engine, row["order_id"], REFUSED,
                         found and found["session"], am.now_ms())
        elif found["state"] in (D.OPEN, D.CLEARED):
            await am.sql(settle_order, am.engine, row["order_id"], OPENED, found["session"],
                         am.now_ms())
        got = await am.sql(first_row, am.engine, D.am_purse, order_id=row["order_id"])
        assert got is not None
        return got

    # --- the rest: a load onto the card that paid -----------------------------------------
    async def _bank(self, request: Request) -> Response:
        p = self.settings()
        return JSONResponse({"bank_id": p.bank_id.hex(), "currency_code": p.currency_code,
                             "currency_exponent": exponent(p.currency),
                             "start_url": f"{p.public_url}/v1/purse/bank/start"})

    async def _start(self, request: Request) -> Response:
        p, am = self.settings(), self.am
        d = await read_json(request)
        try:
            card, order, secret = d["card"], str(d["account"]), str(d["secret"])
            amount, request_id = d["amount"], d.get("request_id")
            serial, issuer = bytes.fromhex(card["serial"]), bytes.fromhex(card["issuer_id"])
            balance, limit, code = card["balance"], card.get("limit"), card["currency_code"]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise Refused(400, 400, "bad load request: account, secret, amount, request_id, "
                                    "card {serial, issuer_id, balance, currency_code}") from None
        if not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id) or \
                len(serial) != 10 or len(issuer) != 8 or \
                not all(isinstance(v, int) and not isinstance(v, bool)
                        for v in (amount, balance, code, 0 if limit is None else limit)):
            raise Refused(400, 400, "bad load request: a field is malformed")
        row = await am.sql(first_row, am.engine, D.am_purse, order_id=order) \
            if ORDER_ID.fullmatch(order) else None
        key = bytes.fromhex(json.loads(row["initiation"])["registration"]["session_key"]) \
            if row else b""
        if row is None or not S.verify(key, LOAD, order.encode(), secret):
            raise Refused(403, 403, "unknown order or wrong secret")
        if serial.hex() != row["card_serial"]:
            raise Refused(403, 403, "only the card that paid the deposit takes its rest")
        if code != p.currency_code:
            raise Refused(400, 400, f"the card holds currency {code}, not {p.currency_code}")
        if d.get("lookup_only") is True and not (row["load_state"] == STARTED and
                                                  row["load_request"] == request_id):
            raise Refused(404, 404, "no load with this request id: nothing was started")
        if amount != row["rest"] or amount <= 0:
            raise Refused(400, 400, f"the rest due to this card is {row['rest']}, not "
                                    f"{amount}")
        if limit is not None and balance + amount > limit:
            raise Refused(400, 400, f"the card can take at most {max(limit - balance, 0)} "
                                    "more")
        got, row = await am.sql(start_load, am.engine, order, request_id, os.urandom(16).hex(),
                                am.now_ms())
        if got not in ("new", "same") or row is None:
            raise Refused(409, 409, {
                "busy": "a load of this rest is under way: resume it (svcard load resume)",
                LOADED: "the rest was loaded already", NONE: "nothing to load yet: the "
                "session is not cleared"}.get(got, f"the load is {got}"))
        note(txn=row["load_txn"], step="purse-load")
        return JSONResponse(self._load_parameters(p, row, issuer))

    @staticmethod
    def _load_parameters(p: PurseSettings, row: dict[str, Any], issuer: bytes
                         ) -> dict[str, Any]:
        txn, tsk, now = bytes.fromhex(row["load_txn"]), secure.new_key(), int(time.time())
        etsk = L.seal_ticket(p.load_key, p.bank_id, txn, {
            "version": L.LOAD_TICKET_VERSION, "tsk": tsk, "amount": row["rest"],
            "currency_code": p.currency_code, "currency_exponent": exponent(p.currency),
            "card_serial": bytes.fromhex(row["card_serial"]), "bank_time": now,
            "expires": now + ORDER_SECONDS, "terminal_id": p.load_terminal,
            "issuer_id": issuer})
        return {"version": PM.VERSION, "amount": row["rest"], "currency_code": p.currency_code,
                "currency_exponent": exponent(p.currency), "load_url": p.load_url,
                "txn_id": txn.hex(), "bank_id": p.bank_id.hex(),
                "terminal_id": p.load_terminal.hex(), "bank_time": now,
                "status_url": f"{p.public_url}/v1/purse/bank/status/{txn.hex()}",
                "card_serial": row["card_serial"], "account": row["order_id"],
                "tsk": tsk.hex(), "etsk": etsk.hex()}

    async def _loaded(self, request: Request) -> Response:
        p, am = self.settings(), self.am
        txn_hex = request.path_params["txn"]
        row = await am.sql(first_row, am.engine, D.am_purse, load_txn=txn_hex) \
            if ORDER_ID.fullmatch(txn_hex) else None
        if row is None:
            raise Refused(404, 404, "no such load")
        txn = bytes.fromhex(txn_hex)
        try:
            msg = PM.parse(L.BankConfirmation, await read_body(request, MAX_CONFIRMATION),
                           "load confirmation")
            conf = L.open_confirmation(p.load_key, p.bank_id, txn, msg.confirmation)
        except (PM.MessageError, secure.SealError) as exc:
            raise Refused(400, 400, f"forged confirmation: {exc}") from None
        if msg.txn_id != txn or (conf.bank_id, conf.txn_id, conf.amount,
                                 conf.card_serial.hex()) != (p.bank_id, txn, row["rest"],
                                                             row["card_serial"]):
            raise Refused(400, 400, "the confirmation does not match the load")
        loaded = conf.outcome == L.OUTCOME_LOADED
        if not await am.sql(finish_load, am.engine, txn_hex, loaded, am.now_ms()):
            raise Refused(409, 409, "this load was registered already")
        if row["session"]:
            await am.clearing.rewrite(row["session"])
        note(txn=txn_hex, outcome="loaded" if loaded else "not loaded: due again")
        return JSONResponse({"registered": True, "outcome": "loaded" if loaded else
                             "not loaded", "amount": row["rest"], "refunded": 0,
                             "reason": conf.reason})
