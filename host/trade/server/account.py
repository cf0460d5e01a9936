"""The customer account manager (seed 004, 202): takes a customer agent's initiation, vouches
for the customer and reserves the deposit against its credit limit, amends the initiation for
the mediating trusted agent of the merchant's operator, and forwards that agent's signed
acknowledgement, with the exchange rate, to the customer agent (claims 1, 3, 4, 7-9).

``POST /v1/sessions``: the initiation, signed by the customer's key. Answers: 200 the session
is open (signed ``opened`` body: session id, deposits in both currencies, the rate, the
acquirer's signed acknowledgement); 400/413 malformed; 401 a signature that does not verify or
a stale message; 402 over the credit limit (nothing reserved); 403 an unknown customer; 404 an
unknown merchant operator; 409 a replayed txn (the session it repeats); 422 the mediating agent
refused (signed; the reservation is given back); 502 no signed answer from it (the session is
``in_doubt`` and keeps its reservation). ``GET /v1/health``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...kit.db import first_row, reading, step
from ...kit.http import JSON_STORAGE_ERROR_HANDLERS, Refused, SqlRunner, openapi_route
from ...kit.request_log import RequestLog, note
from ...kit.serving import with_writer_drained
from .. import db as D
from .. import messages as M
from .. import signing as S
from ..config import AccountManagerConfig, Peer
from ..money import table_payload
from ..trust import certs
from .billing import AccountClearing, export, withdrawal_extra
from .common import authenticated, refused, signed_json, verified_answer
from .purse import PurseDesk

log = logging.getLogger("svcard.trade")
RECOVER_AFTER_MS = 120_000   # an initiation still undecided this long was interrupted


def add_customer(engine: Engine, customer: str, public_key: bytes, currency: str,
                 credit_limit: int, now: int | None = None) -> None:
    now = now if now is not None else int(time.time() * 1000)
    with step(engine) as conn:
        conn.execute(insert(D.am_customers).values(
            id=customer, public_key=public_key.hex(), currency=currency,
            credit_limit=credit_limit, reserved=0, created=now, updated=now))


def reserve(engine: Engine, am_id: str, data: dict[str, Any], digest: str, pseudonym: str,
            expires: int, max_sessions: int, now: int) -> dict[str, Any]:
    """The credit check over all the customer's open sessions and the session's row, in ONE
    transaction: a conditional ``UPDATE`` of the customer's ``reserved`` (the sum of its
    sessions' deposits not yet ended) that succeeds only within the limit. Concurrent
    initiations cannot both pass a limit only one fits (SQLite: one writer; PostgreSQL: the
    row lock, the WHERE checked again on the updated row)."""
    c = D.am_customers.c
    deposit = int(data["deposit"])
    try:
        with step(engine) as conn:
            open_count = conn.execute(select(func.count()).where(
                D.am_sessions.c.customer == data["customer"],
                D.am_sessions.c.state.in_(D.RESERVING))).scalar_one()
            if open_count >= max_sessions:
                return {"state": "limit", "reason": f"more than {max_sessions} open sessions"}
            ok = conn.execute(update(D.am_customers).where(
                c.id == data["customer"], c.currency == data["currency"],
                c.reserved + deposit <= c.credit_limit).values(
                reserved=c.reserved + deposit, updated=now)).rowcount == 1
            if not ok:
                row = conn.execute(select(D.am_customers).where(
                    c.id == data["customer"])).first()
                if row is not None and row.currency != data["currency"]:
                    why = f"the account is kept in {row.currency}, not {data['currency']}"
                else:
                    why = (f"over the credit limit: {row.reserved if row else 0} reserved in "
                           f"open sessions + {deposit} > {row.credit_limit if row else 0}")
                return {"state": "limit", "reason": why}
            row_id = conn.execute(insert(D.am_sessions).values(
                customer=data["customer"], txn=data["txn"], digest=digest,
                merchant=data["merchant"], operator=data["operator"], pseudonym=pseudonym,
                session_key=data["registration"]["session_key"], deposit=deposit,
                currency=data["currency"], order_info=json.dumps(data["order"]),
                state=D.INITIATING, reason="", expires=expires, created=now,
                updated=now)).inserted_primary_key
            assert row_id is not None
            session = f"{am_id}.{row_id[0]}"
            conn.execute(update(D.am_sessions).where(D.am_sessions.c.id == row_id[0]).values(
                session=session))
            return {"state": D.INITIATING, "session": session}
    except IntegrityError:
        pass
    first = first_row(engine, D.am_sessions, customer=data["customer"], txn=data["txn"])
    if first is None:
        raise Refused(409, 409, "the initiation could not be recorded; send it again with a "
                                "new txn")
    return {"state": "replay", "session": first["session"], "was": first["state"]}


def settle_initiation(engine: Engine, session: str, state: str, reason: str,
                      opened: str | None, now: int) -> bool:
    """``initiating`` or ``in_doubt`` -> ``state`` (compare-and-set); ``refused`` gives the
    deposit back, in the same transaction."""
    s = D.am_sessions.c
    with step(engine) as conn:
        row = conn.execute(select(D.am_sessions).where(s.session == session)).first()
        if row is None or row.state not in (D.INITIATING, D.IN_DOUBT) or row.state == state:
            return False
        changed = conn.execute(update(D.am_sessions).where(
            s.session == session, s.state == row.state).values(
            state=state, reason=reason[:300], opened=opened, updated=now)).rowcount == 1
        if changed and state == D.REFUSED:
            c = D.am_customers.c
            conn.execute(update(D.am_customers).where(c.id == row.customer).values(
                reserved=c.reserved - row.deposit, updated=now))
        return changed


def _rows(engine: Engine, query: Any) -> list[dict[str, Any]]:
    with reading(engine) as conn:
        return [dict(r._mapping) for r in conn.execute(query).all()]


class AccountManager:
    def __init__(self, config: AccountManagerConfig, *,
                 clock: Callable[[], float] = time.time,
                 http: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self.clock = clock
        self.engine = D.am_engine(config.db_url)
        self.sql = SqlRunner(config.db_url)
        self.http = http          # made in the lifespan when not given
        self.clearing = AccountClearing(self)
        self.purse = PurseDesk(self)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def close(self) -> None:
        if self.sql.executor is not None:
            self.sql.executor.shutdown(wait=True)
        self.engine.dispose()

    async def _customer_key(self, signer: str, data: dict[str, Any]) -> bytes | None:
        if signer != data["customer"]:
            return None   # a customer signs only its own initiation
        row = await self.sql(first_row, self.engine, D.am_customers, id=signer)
        return None if row is None else bytes.fromhex(row["public_key"])

    async def initiate(self, request: Request) -> Response:
        try:
            return await self._initiate(request)
        except Refused as exc:
            return refused(exc)

    async def _initiate(self, request: Request) -> Response:
        now = self.now_ms()
        body, data, _signer = await authenticated(request, M.INITIATION, "initiation",
                                                  S.INITIATION, self._customer_key,
                                                  now // 1000)
        return await self.open_initiation(data, M.digest(body))

    def operator_of(self, data: dict[str, Any]) -> Peer:
        operator = self.config.operators.get(data["operator"])
        if operator is None:
            raise Refused(404, 404, f"initiation.operator: {data['operator']} is not an "
                                    "operator this account manager reaches")
        return operator

    async def open_initiation(self, data: dict[str, Any], digest: str) -> Response:
        """Reserve the deposit and open the session of an authenticated initiation (also
        the purse desk's, once the card has paid the deposit: ``purse.py``)."""
        now = self.now_ms()
        operator = self.operator_of(data)
        pseudonym = "p" + secrets.token_hex(12)
        expires = now + self.config.session_ms
        got = await self.sql(reserve, self.engine, self.config.id, data, digest,
                             pseudonym, expires, self.config.max_sessions, now)
        note(txn=got.get("session", ""), step="initiation")
        if got["state"] == "limit":
            return JSONResponse({"reason": got["reason"]}, status_code=402)
        if got["state"] == "replay":
            return JSONResponse({"reason": "this txn was used already: the session is not "
                                           "opened twice", "session": got["session"],
                                 "state": got["was"]}, status_code=409)
        amended = {"account_manager": self.config.id, "session": got["session"],
                   "txn": data["txn"], "merchant": data["merchant"],
                   "deposit": data["deposit"], "currency": data["currency"],
                   "pseudonym": pseudonym,
                   "session_key": data["registration"]["session_key"], "vouched": True,
                   "expires": expires, "created": now // 1000,
                   # the temporary certificate (seed 004 PKI): the session key, vouched by
                   # this FI for the merchant's FI; it holds no customer identity
                   "cert": certs.issue(self.config.private_key, self.config.id,
                                       got["session"],
                                       bytes.fromhex(data["registration"]["session_key"]),
                                       now // 1000).decode()}
        return await self._forward(operator, got["session"], amended, data)

    async def _forward(self, operator: Peer, session: str, amended: dict[str, Any],
                       data: dict[str, Any]) -> Response:
        body, headers = S.signed(self.config.private_key, self.config.id, S.AMENDED, amended)
        return await self._conclude(operator, session, amended,
                                    await self._post(self.http, f"{operator.url}/v1/initiations",
                                                     body, headers))

    @staticmethod
    async def _post(http: httpx.AsyncClient | None, url: str, body: bytes,
                    headers: dict[str, str]) -> httpx.Response | str:
        """The answer (through ``http``, or a client of its own), or why there is none."""
        try:
            if http is not None:
                return await http.post(url, content=body, headers=headers)
            async with httpx.AsyncClient(timeout=30) as own:
                return await own.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"the mediating agent did not answer: {type(exc).__name__}"

    async def _conclude(self, operator: Peer, session: str, amended: dict[str, Any],
                        answer: httpx.Response | str) -> Response:
        """Act on the mediating agent's answer about ``session`` (``amended`` holds what was
        asked: txn, merchant, deposit, currency, pseudonym, expires): open it or give the
        reservation back on a signed answer; anything else leaves it ``in_doubt``."""
        if isinstance(answer, str):
            return await self._in_doubt(session, answer)
        ack_body = verified_answer(answer, operator.public_key, operator.id, S.AGENT_ACK)
        if ack_body is None:
            return await self._in_doubt(session, f"no signed answer from the mediating agent "
                                                 f"(HTTP {answer.status_code})")
        try:
            ack = M.parse_agent_ack(ack_body)
        except Refused:
            return await self._in_doubt(session, "the mediating agent's answer is malformed")
        if ack["session"] != session or ack["txn"] != amended["txn"] or \
                ack["acquirer"] != operator.id:
            return await self._in_doubt(session, "the mediating agent answered for another "
                                                 "session")
        now = self.now_ms()
        if not ack["accepted"]:
            await self.sql(settle_initiation, self.engine, session, D.REFUSED, ack["reason"],
                           None, now)
            return JSONResponse({"session": session, "reason": "the mediating agent refused: "
                                 + ack["reason"]}, status_code=422)
        expected = {"pseudonym": amended["pseudonym"], "merchant": amended["merchant"],
                    "deposit_customer": amended["deposit"],
                    "currency_customer": amended["currency"]}
        if any(ack[k] != v for k, v in expected.items()):
            return await self._in_doubt(session, "the mediating agent acknowledged another "
                                                 "deposit or customer")
        opened = {"session": session, "txn": amended["txn"], "merchant": amended["merchant"],
                  "account_manager": self.config.id, "acquirer": operator.id,
                  "pseudonym": amended["pseudonym"], "deposit": amended["deposit"],
                  "currency": amended["currency"],
                  "deposit_merchant": ack["deposit_merchant"],
                  "currency_merchant": ack["currency_merchant"], "rate": ack["rate"],
                  "rounding": ack["rounding"], "expires": amended["expires"],
                  "acquirer_ack": ack_body.decode(),
                  "acquirer_signature": answer.headers[S.SIGNATURE],
                  "acquirer_url": operator.url}   # FIG. 4: the trusted party, reached directly
        try:   # the merchant's key for this session, vouched by its FI, signed again for ours
            opened["merchant_cert"] = certs.relay(   # of any age: the signed ack carried it
                self.config.private_key, operator.id, operator.public_key,  # (a lookup's too)
                ack["merchant_cert"], session, None, None)
        except certs.CertError:
            opened["merchant_cert"] = ""    # no FIG. 4 delivery in this session
        text = S.canonical(opened).decode()
        if not await self.sql(settle_initiation, self.engine, session, D.OPEN, "", text, now):
            raise Refused(409, 409, "the session changed state while opening")
        return signed_json(self.config.private_key, self.config.id, S.OPENED, opened)

    async def recover(self, older_than_ms: int = RECOVER_AFTER_MS) -> dict[str, int]:
        """Settle the sessions left ``in_doubt``, or ``initiating`` for longer than
        ``older_than_ms`` (the account manager stopped mid-initiation): ask the mediating agent
        (a signed lookup; it answers the acknowledgement it gave, or closes a session it never
        saw so that it can never open later) and act on its signed answer. Counts by outcome."""
        now = self.now_ms()
        s = D.am_sessions.c
        rows = await self.sql(_rows, self.engine, select(D.am_sessions).where(
            (s.state == D.IN_DOUBT) | ((s.state == D.INITIATING) &
                                       (s.created < now - older_than_ms))))
        done = {"open": 0, "refused": 0, "in_doubt": 0}
        for row in rows:
            operator = self.config.operators.get(row["operator"])
            if operator is None:
                done["in_doubt"] += 1
                continue
            body, headers = S.signed(self.config.private_key, self.config.id, S.LOOKUP, {
                "account_manager": self.config.id, "session": row["session"],
                "txn": row["txn"], "created": now // 1000})
            answer = await self._post(None, f"{operator.url}/v1/initiations/lookup", body,
                                      headers)
            if not isinstance(answer, str) and answer.status_code == 409:
                done["in_doubt"] += 1     # still being decided there: next time
                continue
            try:
                got = await self._conclude(operator, row["session"], row, answer)
            except Refused:
                continue
            outcome = {200: "open", 422: "refused"}.get(got.status_code, "in_doubt")
            done[outcome] += 1
        return done

    async def _clock(self) -> None:
        while True:
            try:
                done = await self.recover()
                if any(done.values()):
                    log.info("recovered: %s", done, extra=done)
            except Exception:   # the next tick tries again; never kills the server
                log.exception("recovery")
            await asyncio.sleep(self.config.recover_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        own_http = self.http is None
        if own_http:   # one client for the server's life: its connections are reused
            self.http = httpx.AsyncClient(timeout=30)
        await self.sql(export, self.engine, D.am_withdrawals, self.config.billing,
                       "withdrawals", withdrawal_extra)
        task = asyncio.create_task(self._clock())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if own_http and self.http is not None:
                await self.http.aclose()
                self.http = None

    async def _in_doubt(self, session: str, reason: str) -> Response:
        await self.sql(settle_initiation, self.engine, session, D.IN_DOUBT, reason, None,
                       self.now_ms())
        return JSONResponse({"session": session, "state": D.IN_DOUBT, "reason": reason},
                            status_code=502)

    async def table(self, request: Request) -> Response:
        """The bank's exchange table with its lifespan stamp, signed: the customer's device
        keeps it and shows prices in the customer's currency while it is valid."""
        if self.config.table is None:
            return refused(Refused(404, 404, "this account manager publishes no exchange "
                                             "table"))
        return signed_json(self.config.private_key, self.config.id, S.TABLE,
                           table_payload(self.config.table))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"server": "trade-account-manager", "id": self.config.id})

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/sessions", self.initiate, methods=["POST"]),
            Route("/v1/exchange-table", self.table, methods=["GET"]),
            Route("/v1/clearings", self.clearing.clearing, methods=["POST"]),
            Route("/v1/sessions/{session}/record", self.clearing.record, methods=["POST"]),
            Route("/v1/sessions/{session}/clearing", self.clearing.show, methods=["GET"]),
            Route("/v1/health", self.health, methods=["GET"]),
            *self.purse.routes(),
            openapi_route("trade-account-manager"),
        ], exception_handlers=dict(JSON_STORAGE_ERROR_HANDLERS),
            lifespan=with_writer_drained(self.sql, self.lifespan),
            middleware=[Middleware(RequestLog, server="trade-account-manager")])
