"""The merchant agent (seed 004, 200): takes its mediating agent's information message (claim
5) and acknowledges it, signed (claim 6); then, with the customer agent alone, takes the
session's PayWord commitment and the purchases inside the deposit, and the customer's
terminate message (claim 10).

``POST /v1/sessions``: the information message, signed by the merchant's mediating agent.
200: the signed merchant ack; 409: that session id was used with another message.

``POST /v1/sessions/{session}/commitment``: ``{"commitment": {...}, "signature": hex}``, the
commitment signed by the session's key (from the information message): root, length and unit
value within the deposit, this merchant, this session, the merchant's currency, not expired.
``POST /v1/sessions/{session}/purchases``: the next link(s) and the signed order. The link is
checked with hashes only against the held one, and the held link moves in ONE compare-and-set
with the purchase's row: two purchases racing for the same index cannot both be taken.
``POST /v1/sessions/{session}/terminate``: signed by the session's key. The session also stops
by itself when its last link is paid (``spent``: the deposit is used up).
``GET /v1/sessions/{session}``: state, held index, amount taken (for the customer agent).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...kit.db import first_row, step
from ...kit.http import JSON_STORAGE_ERROR_HANDLERS, Refused, SqlRunner, openapi_route, read_body
from ...kit.request_log import RequestLog, note
from ...kit.serving import with_writer_drained
from .. import closing as K
from .. import db as D
from .. import messages as M
from .. import signing as S
from ..config import MerchantConfig
from ..payword import Commitment, PaywordError, Verifier
from ..trust import certs
from ..trust.shop import Shop, pending_units, take_pending
from .common import authenticated, refused, same_pseudonym, signed_json
from .merchant_close import MerchantCloser


def record_information(engine: Engine, data: dict[str, Any], digest: str, now: int) -> str:
    try:
        with step(engine) as conn:
            conn.execute(insert(D.ma_sessions).values(
                session=data["session"], digest=digest, pseudonym=data["pseudonym"],
                session_key=data["session_key"], deposit=data["deposit"],
                currency=data["currency"], expires=data["expires"], state=D.INFORMED,
                held_index=0, held_link="", created=now, updated=now))
            return "new"
    except IntegrityError:
        return "replay"


def take_commitment(engine: Engine, session: str, c: Commitment, text: str, now: int) -> bool:
    s = D.ma_sessions.c
    with step(engine) as conn:
        return conn.execute(update(D.ma_sessions).where(
            s.session == session, s.state == D.INFORMED).values(
            state=D.OPEN, commitment=text, length=c.length, unit=c.unit, held_index=0,
            held_link=c.root.hex(), updated=now)).rowcount == 1


def check_order(session: str, session_key: bytes, data: dict[str, Any]) -> bytes:
    """The purchase's signed order: for this session and this link, signed with the session's
    key. Its canonical bytes (the evidence kept), or Refused."""
    order = data["order"]
    if data["session"] != session or order["session"] != session or \
            order["index"] != data["index"]:
        raise Refused(400, 400, "purchase: the order is for another session or link")
    order_body = S.canonical(order)
    if not S.verify(session_key, S.ORDER, order_body, data["signature"]):
        raise Refused(401, 401, "purchase: the order's signature does not verify")
    return order_body


def take_purchase(engine: Engine, session: str, data: dict[str, Any], order_body: str,
                  now: int) -> dict[str, Any]:
    """Check the link against the held one and move it, with the purchase's row, in ONE
    transaction (the UPDATE's WHERE names the held index it checked against)."""
    s = D.ma_sessions.c
    with step(engine) as conn:
        row = conn.execute(select(D.ma_sessions).where(s.session == session)).first()
        if row is None:
            raise Refused(404, 404, f"no session {session}")
        if row.state != D.OPEN:
            raise Refused(409, 409, f"session {session} is {row.state}")
        if row.expires <= now:
            raise Refused(409, 409, f"session {session} has expired")
        c = Commitment(session, "-", bytes.fromhex(row.held_link), row.length, row.unit,
                       row.currency, row.expires)
        verifier = Verifier(c, row.held_index, bytes.fromhex(row.held_link))
        try:
            units = verifier.check(data["index"], bytes.fromhex(data["link"])) \
                if data["link"] else pending_units(row, data["index"])
        except PaywordError as exc:
            status = 409 if "replay" in str(exc) else 402
            raise Refused(status, status, str(exc)) from None
        if units != data["order"]["units"]:
            raise Refused(409, 409, f"the order is for {data['order']['units']} units, the "
                                    f"link pays {units}: an earlier purchase is missing "
                                    "(send them in order)")
        if conn.execute(select(D.ma_pending.c.id).where(
                D.ma_pending.c.session == session)).first() is not None:
            raise Refused(409, 409, f"session {session}: a product bought awaits its "
                                    "acceptance at the trusted party")
        if not data["link"]:    # a FIG. 4 product bought fairly: its link comes with K2
            return take_pending(conn, row, data, units, order_body, now)
        p = D.ma_purchases.c
        if conn.execute(select(func.count()).where(p.session == session)).scalar_one() \
                >= K.MAX_ENTRIES:     # its record could not list one more: never paid for
            raise Refused(409, 409, f"session {session} has taken {K.MAX_ENTRIES} purchases, "
                                    "the most one record lists: end it and open another")
        state = D.SPENT if data["index"] == row.length else D.OPEN
        if conn.execute(update(D.ma_sessions).where(
                s.session == session, s.state == D.OPEN, s.held_index == row.held_index,
                s.updated == row.updated).values(     # a pending product bumps ``updated``
                held_index=data["index"], held_link=data["link"], state=state,
                updated=now)).rowcount != 1:
            raise Refused(409, 409, "another purchase took this link first")
        conn.execute(insert(D.ma_purchases).values(
            session=session, link_index=data["index"], units=units, amount=units * row.unit,
            item=data["order"]["item"], link=data["link"], order_body=order_body,
            order_signature=data["signature"], at=now))
        return {"session": session, "index": data["index"], "units": units,
                "amount": units * row.unit, "currency": row.currency, "state": state,
                "left": (row.length - data["index"]) * row.unit}


def terminate(engine: Engine, session: str, now: int) -> str | None:
    s = D.ma_sessions.c
    with step(engine) as conn:
        row = conn.execute(select(D.ma_sessions).where(s.session == session)).first()
        if row is None:
            return None
        if row.state in (D.INFORMED, D.OPEN):
            conn.execute(update(D.ma_sessions).where(
                s.session == session, s.state == row.state).values(
                state=D.TERMINATED, updated=now))
            return D.TERMINATED
        return str(row.state)


class MerchantAgent:
    def __init__(self, config: MerchantConfig, *, clock: Callable[[], float] = time.time,
                 ) -> None:
        self.config = config
        self.clock = clock
        self.engine = D.ma_engine(config.db_url)
        self.sql = SqlRunner(config.db_url)
        self.closer = MerchantCloser(self)
        self.shop = Shop(self)          # FIG. 4: digital products delivered under K2

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def close(self) -> None:
        if self.sql.executor is not None:
            self.sql.executor.shutdown(wait=True)
        self.engine.dispose()

    async def _acquirer_key(self, signer: str, data: dict[str, Any]) -> bytes | None:
        a = self.config.acquirer
        if signer != a.id or data["acquirer"] != a.id or data["merchant"] != self.config.id:
            return None
        return a.public_key

    async def information(self, request: Request) -> Response:
        try:
            now = self.now_ms()
            body, data, _ = await authenticated(request, M.INFORMATION, "information",
                                                S.INFORMATION, self._acquirer_key,
                                                now // 1000)
            note(txn=data["session"], step="information")
            if data["currency"] != self.config.currency:
                raise Refused(422, 422, f"information.currency: this merchant takes "
                                        f"{self.config.currency}")
            try:    # the session's key, from the certificate its own FI signed, only
                held = certs.verify(self.config.acquirer.public_key, data["cert"].encode(),
                                    data["session"], now // 1000)
            except certs.CertError as exc:
                raise Refused(403, 403, f"information.{exc.reason}") from None
            data = {**data, "session_key": held.key.hex()}
            digest = M.digest(body)
            if await self.sql(record_information, self.engine, data, digest, now) == "replay":
                row = await self.sql(first_row, self.engine, D.ma_sessions,
                                     session=data["session"])
                if row is None or row["digest"] != digest:
                    raise Refused(409, 409, f"session {data['session']} was announced with "
                                            "another message")
            ack = {"merchant": self.config.id, "session": data["session"],
                   "pseudonym": data["pseudonym"], "deposit": data["deposit"],
                   "currency": data["currency"], "information": digest}
            return signed_json(self.config.private_key, self.config.id, S.MERCHANT_ACK, ack)
        except Refused as exc:
            return refused(exc)

    async def _session(self, session: str) -> dict[str, Any]:
        if not M.SESSION(session):
            raise Refused(404, 404, "no such session")
        row = await self.sql(first_row, self.engine, D.ma_sessions, session=session)
        if row is None:
            raise Refused(404, 404, f"no session {session}")
        return row

    async def commitment(self, request: Request) -> Response:
        try:
            session = request.path_params["session"]
            row = await self._session(session)
            data = M.check(M.load(await read_body(request, M.MAX_MESSAGE), "commitment"),
                           {"commitment": lambda v: isinstance(v, dict),
                            "signature": M.SIGNATURE, "acquirer_ack": M.ACK_TEXT,
                            "acquirer_signature": M.SIGNATURE}, "commitment")
            self._check_acceptance(row, data["acquirer_ack"], data["acquirer_signature"])
            body = S.canonical(data["commitment"])
            now = self.now_ms()
            try:
                v = Verifier.open(body, data["signature"], bytes.fromhex(row["session_key"]),
                                  session, self.config.id, now)
            except PaywordError as exc:
                raise Refused(401 if "signature" in str(exc) else 400, 400, str(exc)) from None
            c = v.commitment
            if c.currency != row["currency"] or c.value > row["deposit"] or \
                    c.expires > row["expires"]:
                raise Refused(402, 402, f"the commitment ({c.length} x {c.unit} "
                                        f"{c.currency}, until {c.expires}) is not within the "
                                        f"deposit ({row['deposit']} {row['currency']}, until "
                                        f"{row['expires']})")
            text = json.dumps(data)
            if not await self.sql(take_commitment, self.engine, session, c, text, now):
                raise Refused(409, 409, f"session {session} has a commitment already")
            return JSONResponse({"session": session, "state": D.OPEN, "length": c.length,
                                 "unit": c.unit, "currency": c.currency})
        except Refused as exc:
            return refused(exc)

    def _check_acceptance(self, row: dict[str, Any], ack_text: str, signature: str) -> None:
        """The session opens only on the mediating agent's signed acceptance of it (the agent
        ack that the customer got through its account manager): a session the agent refused
        after this merchant acknowledged it (its ack lost on the way) never opens here."""
        a = self.config.acquirer
        ack_body = ack_text.encode()
        if not S.verify(a.public_key, S.AGENT_ACK, ack_body, signature):
            raise Refused(401, 401, "commitment: the acquirer's acceptance does not verify")
        ack = M.parse_agent_ack(ack_body)
        if not ack["accepted"] or ack["acquirer"] != a.id or \
                ack["session"] != row["session"] or ack["merchant"] != self.config.id or \
                ack["pseudonym"] != row["pseudonym"] or \
                ack["deposit_merchant"] != row["deposit"] or \
                ack["currency_merchant"] != row["currency"]:
            raise Refused(403, 403, "commitment: the acquirer did not accept this session "
                                    "with this deposit")

    async def purchase(self, request: Request) -> Response:
        try:
            session = request.path_params["session"]
            row = await self._session(session)
            data = M.parse(await read_body(request, M.MAX_MESSAGE), M.PURCHASE, "purchase")
            order_body = check_order(session, bytes.fromhex(row["session_key"]), data)
            if not data["link"] and data["order"]["item"] not in self.config.products:
                raise Refused(400, 400, "purchase: no link, and the item is no digital "
                                        "product here")
            note(txn=session, step="purchase")
            got = await self.sql(take_purchase, self.engine, session, data,
                                 order_body.decode(), self.now_ms())
            if got["state"] == D.SPENT:     # the deposit is used up: the session ends
                await self.closer.end(session, "spent")
            return JSONResponse(got)
        except Refused as exc:
            return refused(exc)

    async def _session_key(self, signer: str, data: dict[str, Any]) -> bytes | None:
        row = await self.sql(first_row, self.engine, D.ma_sessions, session=data["session"])
        if row is None or signer != row["pseudonym"]:
            return None
        return bytes.fromhex(row["session_key"])

    async def terminate(self, request: Request) -> Response:
        try:
            session = request.path_params["session"]
            now = self.now_ms()
            _, data, _ = await authenticated(request, M.TERMINATE, "terminate", S.TERMINATE,
                                             self._session_key, now // 1000)
            if data["session"] != session:
                raise Refused(400, 400, "terminate: for another session")
            await self.shop.collect(session, close=True)   # its link, or closed for good
            state = await self.sql(terminate, self.engine, session, now)
            await self.closer.end(session, "terminated")
            row = await self._session(session)
            return JSONResponse({"session": session, "state": state,
                                 "index": row["held_index"],
                                 "taken": row["held_index"] * (row["unit"] or 0)})
        except Refused as exc:
            return refused(exc)

    async def end_request(self, request: Request) -> Response:
        """The mediating agent ends the session (at its expiry, after which the trusted party
        releases nothing): a link released before is collected first, into the record."""
        session = request.path_params["session"]
        if M.SESSION(session) and await self.sql(first_row, self.engine, D.ma_sessions,
                                                  session=session) is not None:
            await self.shop.collect(session)
        return await self.closer.end_request(request)

    async def status(self, request: Request) -> Response:
        """A session's state, for whoever knows its pseudonym (``?pseudonym=``): session ids
        are sequential, so the id alone would show anyone what a session spent."""
        try:
            row = await self._session(request.path_params["session"])
            if not same_pseudonym(request.query_params.get("pseudonym"), row["pseudonym"]):
                raise Refused(404, 404, "no such session")
        except Refused as exc:
            return refused(exc)
        return JSONResponse({"session": row["session"], "state": row["state"],
                             "index": row["held_index"], "deposit": row["deposit"],
                             "currency": row["currency"],
                             "taken": row["held_index"] * (row["unit"] or 0)})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"server": "trade-merchant", "id": self.config.id})

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/sessions", self.information, methods=["POST"]),
            Route("/v1/sessions/{session}/commitment", self.commitment, methods=["POST"]),
            Route("/v1/sessions/{session}/purchases", self.purchase, methods=["POST"]),
            Route("/v1/sessions/{session}/terminate", self.terminate, methods=["POST"]),
            Route("/v1/sessions/{session}/end", self.end_request, methods=["POST"]),
            Route("/v1/sessions/{session}/purchases/{index}/offer", self.shop.offer,
                  methods=["GET"]),
            Route("/v1/sessions/{session}/purchases/{index}/accept", self.shop.accept,
                  methods=["POST"]),
            Route("/v1/sessions/{session}/collect", self.shop.collect_request,
                  methods=["POST"]),
            Route("/v1/sessions/{session}", self.status, methods=["GET"]),
            Route("/v1/health", self.health, methods=["GET"]),
            openapi_route("trade-merchant"),
        ], exception_handlers=dict(JSON_STORAGE_ERROR_HANDLERS),
            lifespan=with_writer_drained(self.sql),
            middleware=[Middleware(RequestLog, server="trade-merchant")])
