"""The mediating trusted agent, the merchant operator's value acquirer (seed 004, 203): takes
an account manager's amended initiation (claim 4: the deposit in the customer's currency, the
currency, the customer's pseudonym, txn, merchant), converts the deposit into the merchant's
currency at its bank's exchange table (the rate then fixed for the session; the leftover
minor units booked to its rounding account), sends the merchant agent the information message
(claim 5) and, on the merchant's signed acknowledgement (claim 6), acknowledges the customer
and the deposit to the account manager with the exchange rate (claims 7, 8).

``POST /v1/initiations``: the amended initiation signed by a known account manager, for a
session in that account manager's own namespace (``AM.n``). Answers: 200 a signed agent ack,
``accepted`` true (rate, both deposits, the merchant ack's digest) or false with the reason
(an unknown merchant, an expired exchange table, the merchant refused); 400/413 malformed;
401 bad signature or stale; 403 an unknown signer; 409 the session id was used with another
message. A replay of the same message answers the same acknowledgement again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from fractions import Fraction
from typing import Any

import httpx
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...kit.db import first_row, step
from ...kit.http import JSON_STORAGE_ERROR_HANDLERS, Refused, SqlRunner, openapi_route
from ...kit.request_log import RequestLog, note
from ...kit.serving import with_writer_drained
from .. import db as D
from .. import messages as M
from .. import signing as S
from ..config import AcquirerConfig
from ..money import Amount, MoneyError, conversion_postings, convert
from ..trust import certs
from ..trust.party import TrustedParty
from .closer import Closer
from .common import authenticated, refused, signed_json, verified_answer

MAX_SESSION_MS = 7 * 86_400_000   # the longest session this agent holds a deposit for
# an initiation still undecided this long was interrupted here (the merchant is waited for at
# most 30 s): a lookup then refuses it, so the deposit is not held for ever
INFORMING_TIMEOUT_MS = 300_000


def rate_text(rate: Fraction) -> str:
    return f"{rate.numerator}/{rate.denominator}"


def record(engine: Engine, row: dict[str, Any], postings: list[tuple[str, Amount]],
           now: int) -> str:
    """The session's row and the conversion's postings, in one transaction: ``new``, or
    ``replay`` when the session exists already (the caller compares digests)."""
    try:
        with step(engine) as conn:
            conn.execute(insert(D.acq_sessions).values(**row))
            conn.execute(insert(D.acq_postings), [
                {"session": row["session"], "event": "deposit", "account": account,
                 "currency": amount.code, "minor": amount.minor, "at": now}
                for account, amount in postings])
            return "new"
    except IntegrityError:
        return "replay"


def conclude(engine: Engine, session: str, state: str, reason: str, merchant_ack: str | None,
             answer: str, now: int) -> bool:
    """``informing`` -> ``state``; a refusal reverses the deposit's postings, in the same
    transaction."""
    with step(engine) as conn:
        return _conclude(conn, session, state, reason, merchant_ack, answer, now)


def _conclude(conn: Any, session: str, state: str, reason: str, merchant_ack: str | None,
              answer: str, now: int) -> bool:
    s, p = D.acq_sessions.c, D.acq_postings.c
    changed = conn.execute(update(D.acq_sessions).where(
        s.session == session, s.state == D.INFORMING).values(
        state=state, reason=reason[:300], merchant_ack=merchant_ack, answer=answer,
        updated=now)).rowcount == 1
    if changed and state == D.REFUSED:
        rows = conn.execute(select(D.acq_postings).where(p.session == session)).all()
        conn.execute(insert(D.acq_postings), [
            {"session": session, "event": "refused", "account": r.account,
             "currency": r.currency, "minor": -r.minor, "at": now} for r in rows])
    return bool(changed)


def decide(engine: Engine, data: dict[str, Any], refusal: dict[str, Any],
           now: int) -> dict[str, Any] | None:
    """A lookup: the session's row; one this agent never saw is recorded refused first (a
    tombstone, in the same step), so the amended message, if it comes later, can never open
    it. None: the session exists under another txn."""
    s = D.acq_sessions.c
    with step(engine) as conn:
        row = conn.execute(select(D.acq_sessions).where(s.session == data["session"])).first()
        if row is None:
            conn.execute(insert(D.acq_sessions).values(
                session=data["session"], account_manager=data["account_manager"],
                txn=data["txn"], digest="", merchant="", pseudonym="", session_key="",
                deposit_customer=0, currency_customer="", deposit_merchant=0,
                currency_merchant="", rate="", rounding=0, table_issuer="",
                state=D.REFUSED, reason=refusal["reason"],
                answer=json.dumps({"payload": refusal}), expires=0, created=now,
                updated=now))
            row = conn.execute(select(D.acq_sessions).where(
                s.session == data["session"])).first()
        elif row.state == D.INFORMING and row.answer is None and \
                row.txn == data["txn"] and row.created < now - INFORMING_TIMEOUT_MS:
            stopped = {**refusal, "reason": "the initiation was interrupted at the mediating "
                                            "agent: it is closed"}
            _conclude(conn, data["session"], D.REFUSED, stopped["reason"], None,
                      json.dumps({"payload": stopped}), now)
            row = conn.execute(select(D.acq_sessions).where(
                s.session == data["session"])).first()
        assert row is not None
        found = dict(row._mapping)
    return found if found["txn"] == data["txn"] else None


class Acquirer:
    def __init__(self, config: AcquirerConfig, *, clock: Callable[[], float] = time.time,
                 ) -> None:
        self.config = config
        self.clock = clock
        self.engine = D.acq_engine(config.db_url)
        self.sql = SqlRunner(config.db_url)
        self.http: httpx.AsyncClient | None = None   # the lifespan's, reused
        self.closer = Closer(self)
        self.party = TrustedParty(self)      # FIG. 4: K2 held, released once

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self.http = httpx.AsyncClient(timeout=30)
        task = asyncio.create_task(self.closer.clock())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.http.aclose()
            self.http = None

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def close(self) -> None:
        if self.sql.executor is not None:
            self.sql.executor.shutdown(wait=True)
        self.engine.dispose()

    async def _am_key(self, signer: str, data: dict[str, Any]) -> bytes | None:
        if data["account_manager"] != signer or not data["session"].startswith(signer + "."):
            return None   # an account manager speaks only for itself and its own sessions
        return self.config.account_managers.get(signer)

    def _ack(self, data: dict[str, Any], accepted: bool, reason: str,
             **fields: Any) -> dict[str, Any]:
        return {"acquirer": self.config.id, "session": data["session"], "txn": data["txn"],
                "accepted": accepted, "reason": reason, **fields}

    def _answer(self, payload: dict[str, Any]) -> Response:
        return signed_json(self.config.private_key, self.config.id, S.AGENT_ACK, payload)

    async def initiation(self, request: Request) -> Response:
        try:
            return await self._initiation(request)
        except Refused as exc:
            return refused(exc)

    async def _initiation(self, request: Request) -> Response:
        now = self.now_ms()
        body, data, _ = await authenticated(request, M.AMENDED, "amended initiation",
                                            S.AMENDED, self._am_key, now // 1000)
        note(txn=data["session"], step="amended")
        if not now < data["expires"] <= now + MAX_SESSION_MS:
            return self._answer(self._ack(data, False, "the session's expiry is past or more "
                                                       f"than {MAX_SESSION_MS // 3_600_000} h "
                                                       "away"))
        merchant = self.config.merchants.get(data["merchant"])
        if merchant is None:
            return self._answer(self._ack(data, False, f"{data['merchant']} is not a merchant "
                                                       "of this operator"))
        table = self.config.table
        try:
            rate = table.rate(data["currency"], merchant.currency, now)
            conv = convert(Amount(data["deposit"], data["currency"]), merchant.currency, rate)
        except MoneyError as exc:
            return self._answer(self._ack(data, False, str(exc)))
        if conv.target.minor == 0:
            return self._answer(self._ack(data, False, "the deposit is worth less than one "
                                                       "minor unit of the merchant's currency"))
        try:    # the customer's FI vouches for the session key: signed again for the merchant
            cert = certs.relay(self.config.private_key, data["account_manager"],
                               self.config.account_managers[data["account_manager"]],
                               data["cert"], data["session"],
                               bytes.fromhex(data["session_key"]), now // 1000)
        except certs.CertError as exc:
            return self._answer(self._ack(data, False, exc.reason))
        digest = M.digest(body)
        row = {"session": data["session"], "account_manager": data["account_manager"],
               "txn": data["txn"], "digest": digest, "merchant": merchant.id,
               "pseudonym": data["pseudonym"], "session_key": data["session_key"],
               "deposit_customer": data["deposit"], "currency_customer": data["currency"],
               "deposit_merchant": conv.target.minor, "currency_merchant": merchant.currency,
               "rate": rate_text(rate), "rounding": conv.rounding.minor,
               "table_issuer": table.issuer, "state": D.INFORMING, "reason": "",
               "expires": data["expires"], "created": now, "updated": now}
        postings = conversion_postings(conv, f"am:{data['account_manager']}",
                                       f"deposit:{data['session']}")
        if await self.sql(record, self.engine, row, postings, now) == "replay":
            return await self._replayed(data["session"], digest)
        info = {"acquirer": self.config.id, "merchant": merchant.id,
                "session": data["session"], "pseudonym": data["pseudonym"],
                "deposit": conv.target.minor, "currency": merchant.currency,
                "cert": cert, "expires": data["expires"], "created": now // 1000}
        info_body, headers = S.signed(self.config.private_key, self.config.id, S.INFORMATION,
                                      info)
        try:
            answer = await self._inform(f"{merchant.url}/v1/sessions", info_body, headers)
        except httpx.HTTPError as exc:
            return await self._refuse(data, f"the merchant agent did not answer: "
                                            f"{type(exc).__name__}")
        ack_body = verified_answer(answer, merchant.public_key, merchant.id, S.MERCHANT_ACK)
        if ack_body is None:
            return await self._refuse(data, f"the merchant agent refused (HTTP "
                                            f"{answer.status_code})")
        try:
            ack = M.parse(ack_body, M.MERCHANT_ACK, "merchant ack")
        except Refused:
            return await self._refuse(data, "the merchant's acknowledgement is malformed")
        if ack != {"merchant": merchant.id, "session": data["session"],
                   "pseudonym": data["pseudonym"], "deposit": conv.target.minor,
                   "currency": merchant.currency, "information": M.digest(info_body)}:
            return await self._refuse(data, "the merchant acknowledged another session or "
                                            "deposit")
        payload = self._ack(data, True, "", pseudonym=data["pseudonym"], merchant=merchant.id,
                            deposit_customer=data["deposit"],
                            currency_customer=data["currency"],
                            deposit_merchant=conv.target.minor,
                            currency_merchant=merchant.currency, rate=rate_text(rate),
                            rounding=conv.rounding.minor, table=table.issuer,
                            merchant_ack=M.digest(ack_body),
                            merchant_cert=certs.issue(self.config.private_key, self.config.id,
                                                      data["session"], merchant.public_key,
                                                      now // 1000).decode())
        stored = json.dumps({"payload": payload, "merchant_ack": ack_body.decode()})
        if not await self.sql(conclude, self.engine, data["session"], D.OPEN, "",
                              ack_body.decode(), stored, self.now_ms()):
            return await self._decided(data["session"])   # settled meanwhile: its answer
        return self._answer(payload)

    async def _inform(self, url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        """The information message, sent again ONCE on a connection error (a kept-alive
        connection the merchant closed for idleness under the request): the same bytes
        again get the same acknowledgement (the merchant keeps the message's digest)."""
        for attempt in (1, 2):
            try:
                if self.http is not None:
                    return await self.http.post(url, content=body, headers=headers)
                async with httpx.AsyncClient(timeout=30) as http:
                    return await http.post(url, content=body, headers=headers)
            except (httpx.NetworkError, httpx.RemoteProtocolError):
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def lookup(self, request: Request) -> Response:
        """An account manager asks again about one of its sessions (after a restart, or an
        answer it never got): the acknowledgement given, signed again."""
        try:
            now = self.now_ms()
            _, data, _ = await authenticated(request, M.LOOKUP, "lookup", S.LOOKUP,
                                             self._am_key, now // 1000)
            refusal = self._ack(data, False, "the mediating agent never received this "
                                             "session's initiation: it is closed")
            row = await self.sql(decide, self.engine, data, refusal, now)
            if row is None:
                raise Refused(409, 409, f"session {data['session']} has another txn")
            if row["answer"] is None:
                raise Refused(409, 409, f"session {data['session']} is being initiated; ask "
                                        "again", {"Retry-After": "1"})
            return self._answer(json.loads(row["answer"])["payload"])
        except Refused as exc:
            return refused(exc)

    async def _refuse(self, data: dict[str, Any], reason: str) -> Response:
        payload = self._ack(data, False, reason)
        if not await self.sql(conclude, self.engine, data["session"], D.REFUSED, reason, None,
                              json.dumps({"payload": payload}), self.now_ms()):
            return await self._decided(data["session"])
        return self._answer(payload)

    async def _decided(self, session: str) -> Response:
        """The answer the session's row holds (it was decided by another step)."""
        row = await self.sql(first_row, self.engine, D.acq_sessions, session=session)
        if row is None or row["answer"] is None:
            raise Refused(409, 409, f"session {session} is being initiated; ask again",
                          {"Retry-After": "1"})
        return self._answer(json.loads(row["answer"])["payload"])

    async def _replayed(self, session: str, digest: str) -> Response:
        """The same message again: its answer again (once decided); another message under
        a session id already used: refused."""
        row = await self.sql(first_row, self.engine, D.acq_sessions, session=session)
        if row is None or row["digest"] != digest:
            raise Refused(409, 409, f"session {session} was initiated with another message")
        if row["answer"] is None:
            raise Refused(409, 409, f"session {session} is being initiated; ask again",
                          {"Retry-After": "1"})
        return self._answer(json.loads(row["answer"])["payload"])

    async def health(self, request: Request) -> Response:
        return JSONResponse({"server": "trade-acquirer", "id": self.config.id})

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/initiations", self.initiation, methods=["POST"]),
            Route("/v1/initiations/lookup", self.lookup, methods=["POST"]),
            Route("/v1/records", self.closer.merchant_record, methods=["POST"]),
            Route("/v1/records/customer", self.closer.customer_record, methods=["POST"]),
            Route("/v1/party-key", self.party.key, methods=["GET"]),
            Route("/v1/deliveries", self.party.lodge, methods=["POST"]),
            Route("/v1/deliveries/release", self.party.release, methods=["POST"]),
            Route("/v1/deliveries/link", self.party.link, methods=["POST"]),
            Route("/v1/health", self.health, methods=["GET"]),
            openapi_route("trade-acquirer"),
        ], exception_handlers=dict(JSON_STORAGE_ERROR_HANDLERS),
            lifespan=with_writer_drained(self.sql, self.lifespan),
            middleware=[Middleware(RequestLog, server="trade-acquirer")])
