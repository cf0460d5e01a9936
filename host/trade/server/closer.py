"""The mediating trusted agent's clearing (seed 004 FIG. 3, claim 11): it takes each side's
signed transaction record, compares them and clears the session in ONE step, then sends the
signed clearing information to the customer's account manager and the merchant's account
manager until each sends back a signed receipt.

``POST /v1/records``: the merchant agent's record, signed by the merchant
(``svcard-trade-record/1``). ``POST /v1/records/customer``: the customer's record (signed by
the session's key, which this agent registered at initiation) inside the customer account
manager's signed envelope (``svcard-trade-forward/1``). One record per side and session: the
same bytes again are answered again, a different second record is refused (409), and a
record for a session already cleared is refused (409). The records carry no freshness stamp
check: a record is bound to its session and side, and a session clears once.

When the customer's record comes first, the agent asks the merchant agent for its record
(``/end``: the session stops there too). Its clock (every ``close_seconds``) ends sessions
past their expiry (the merchant is told to stop and asked for its record), clears a session
whose customer's record has not come ``grace_ms`` after the merchant's (or the expiry) with
the merchant's alone (``one-sided``), and sends clearing information that has no receipt
yet. Without the merchant's record it never clears: it asks again (backing off from 5 s to
10 min) until ``abandon_ms`` after the expiry (7 days; the deposit stays reserved), then
clears with what it has. A restart finds a session ``cleared`` or ``open``, never half.
"""

from __future__ import annotations

import asyncio
import json
import logging
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ...kit.db import first_row, step
from ...kit.http import Refused, read_body
from .. import closing as K
from .. import db as D
from .. import messages as M
from .. import signing as S
from ..money import Amount
from .common import refused, verified_answer

if TYPE_CHECKING:
    from .acquirer import Acquirer

log = logging.getLogger("svcard.trade")
ENVELOPE: dict[str, Any] = {"account_manager": M.IDENT, "session": M.SESSION,
                            "record": lambda v: isinstance(v, str) and len(v) <= K.MAX_RECORD,
                            "signature": M.SIGNATURE}
RECEIPT: dict[str, Any] = {"party": M.IDENT, "session": M.SESSION, "clearing": M.DIGEST}
TICK_IN_FLIGHT = 64     # sessions the clock works on at once
PULL_FIRST_MS = 5_000   # the first wait before asking a silent merchant agent again ...
PULL_MAX_MS = 600_000   # ... doubled each time, up to this
MAX_SKIPPED = 20_000    # sessions waiting out their backoff that one query leaves out


def store_record(engine: Engine, session: str, side: str, signer: str, body: str,
                 signature: str, envelope: str, now: int) -> str:
    """``new`` | ``same`` (this record again) | ``other`` (another record for this side) |
    ``closed`` (the session is cleared or was never opened)."""
    s, r = D.acq_sessions.c, D.acq_records.c
    digest = M.digest(body.encode())
    try:
        with step(engine) as conn:
            kept = conn.execute(select(D.acq_records).where(
                r.session == session, r.side == side)).first()
            if kept is not None:
                return "same" if kept.digest == digest else "other"
            state = conn.execute(select(s.state).where(s.session == session)).scalar()
            if state != D.OPEN:
                return "closed"
            conn.execute(insert(D.acq_records).values(
                session=session, side=side, signer=signer, digest=digest, body=body,
                signature=signature, envelope=envelope, at=now))
            return "new"
    except IntegrityError:
        return "other"


def prejudge(engine: Engine, session: str) -> tuple[frozenset[str], K.Decision] | None:
    """The comparison made BEFORE the clearing step (its evidence check may hash a long
    chain): the records' digests it used and its decision. The step uses it only if the
    session still has exactly those records (records never change once stored, and the
    session's key, merchant and deposit are fixed at initiation)."""
    s, r = D.acq_sessions.c, D.acq_records.c
    with engine.connect() as conn:
        row = conn.execute(select(D.acq_sessions).where(s.session == session)).first()
        recs = conn.execute(select(D.acq_records).where(r.session == session)).all()
    if row is None or row.state != D.OPEN:
        return None
    parsed = {x.side: K.parse_record(x.body.encode()) for x in recs}
    decision = K.compare(dict(row._mapping), parsed.get("merchant"), parsed.get("customer"))
    return frozenset(x.digest for x in recs), decision


def clear(engine: Engine, session: str, acquirer: str, private: bytes, ended_by: str,
          now: int, judged: tuple[frozenset[str], K.Decision] | None = None
          ) -> dict[str, Any] | None:
    """Compare the records and clear ``session`` in ONE step: the decision (``judged``'s, if
    made on the same records), the postings that empty the deposit (the merchant's part, the
    rest converted back), the signed clearing information and the state ``cleared``. The
    clearing row when cleared (now or before); None when the session is not open."""
    s, r, c = D.acq_sessions.c, D.acq_records.c, D.acq_clearings.c
    with step(engine) as conn:
        row = conn.execute(select(D.acq_sessions).where(s.session == session)).first()
        if row is None:
            return None
        if row.state == D.CLEARED:
            done = conn.execute(select(D.acq_clearings).where(c.session == session)).first()
            return None if done is None else dict(done._mapping)
        if row.state != D.OPEN:
            return None
        stored = conn.execute(select(D.acq_records).where(r.session == session)).all()
        recs = {x.side: K.parse_record(x.body.encode()) for x in stored}
        if judged is not None and judged[0] == frozenset(x.digest for x in stored):
            decision = judged[1]
        else:
            decision = K.compare(dict(row._mapping), recs.get("merchant"), recs.get("customer"))
        rate = Fraction(*map(int, row.rate.split("/")))
        st = K.settle(Amount(row.deposit_customer, row.currency_customer),
                      Amount(row.deposit_merchant, row.currency_merchant), 1 / rate,
                      decision.amount)
        m, cu = recs.get("merchant"), recs.get("customer")
        info = {"acquirer": acquirer, "session": session,
                "account_manager": row.account_manager, "merchant": row.merchant,
                "pseudonym": row.pseudonym, "ended": m["ended"] if m else ended_by,
                "outcome": decision.outcome, "reasons": "; ".join(decision.reasons)[:2000],
                "index": decision.index, "paid": st.paid.minor,
                "deposit_merchant": row.deposit_merchant,
                "currency_merchant": row.currency_merchant,
                "deposit_customer": row.deposit_customer,
                "currency_customer": row.currency_customer,
                "returned": st.back.target.minor, "withdrawal": st.withdrawal.minor,
                "rounding": st.back.rounding.minor, "rate": row.rate,
                "merchant_list": m["list_hash"] if m else "",
                "customer_list": cu["list_hash"] if cu else "", "created": now // 1000}
        body = S.canonical(info).decode()
        if conn.execute(update(D.acq_sessions).where(
                s.session == session, s.state == D.OPEN).values(
                state=D.CLEARED, updated=now)).rowcount != 1:
            return None
        values = {"session": session, "account_manager": row.account_manager,
                  "merchant": row.merchant, "outcome": decision.outcome, "info": body,
                  "signature": S.sign(private, S.CLEARING, body.encode()), "am_done": 0,
                  "mam_done": 0, "created": now, "updated": now}
        conn.execute(insert(D.acq_clearings).values(**values))
        conn.execute(insert(D.acq_postings), [
            {"session": session, "event": "clearing", "account": account,
             "currency": amount.code, "minor": amount.minor, "at": now}
            for account, amount in K.clearing_postings(st, session, row.account_manager,
                                                       row.merchant)])
        return values


class Closer:
    def __init__(self, acquirer: Acquirer) -> None:
        self.a = acquirer
        self.sending: set[asyncio.Task[None]] = set()   # deliveries under way (kept alive)
        # sessions whose merchant agent did not give its record: (next try, wait) in ms;
        # in memory only (a restart asks each one at once), an entry per open session at most
        self.waiting: dict[str, tuple[int, int]] = {}

    async def _row(self, session: str) -> dict[str, Any]:
        row = await self.a.sql(first_row, self.a.engine, D.acq_sessions, session=session)
        if row is None or not row["merchant"]:
            raise Refused(404, 404, f"no session {session}")
        return row

    async def merchant_record(self, request: Request) -> Response:
        try:
            body = await read_body(request, K.MAX_RECORD)
            rec = self._parse(body)
            row = await self._row(rec["session"])
            signer = request.headers.get(S.SIGNER, "")
            merchant = self.a.config.merchants.get(signer)
            if merchant is None or rec["side"] != "merchant" or rec["party"] != signer or \
                    row["merchant"] != signer:
                raise Refused(403, 403, "record: not the merchant of this session")
            signature = request.headers.get(S.SIGNATURE, "")
            if not S.verify(merchant.public_key, S.RECORD, body, signature):
                raise Refused(401, 401, "record: the signature does not verify")
            return await self._take(row, "merchant", signer, body, signature, "")
        except Refused as exc:
            return refused(exc)

    async def customer_record(self, request: Request) -> Response:
        try:
            body = await read_body(request, K.MAX_RECORD + 4096)
            try:
                env = M.check(json.loads(body), ENVELOPE, "envelope")
            except (ValueError, RecursionError):
                raise M.MessageError("envelope: not JSON") from None
            signer = request.headers.get(S.SIGNER, "")
            key = self.a.config.account_managers.get(signer)
            if key is None or env["account_manager"] != signer:
                raise Refused(403, 403, "envelope: not an account manager this agent knows")
            if not S.verify(key, S.FORWARD, body, request.headers.get(S.SIGNATURE)):
                raise Refused(401, 401, "envelope: the signature does not verify")
            inner = env["record"].encode()
            rec = self._parse(inner)
            row = await self._row(env["session"])
            if row["account_manager"] != signer or rec["session"] != env["session"] or \
                    rec["side"] != "customer" or rec["party"] != row["pseudonym"]:
                raise Refused(403, 403, "record: not the customer of this session")
            if not S.verify(bytes.fromhex(row["session_key"]), S.RECORD, inner,
                            env["signature"]):
                raise Refused(401, 401, "record: not signed by the session's key")
            return await self._take(row, "customer", signer, inner, env["signature"],
                                    body.decode())
        except Refused as exc:
            return refused(exc)

    @staticmethod
    def _parse(body: bytes) -> dict[str, Any]:
        try:
            return K.parse_record(body)
        except K.ClosingError as exc:
            raise M.MessageError(str(exc)) from None

    async def _take(self, row: dict[str, Any], side: str, signer: str, body: bytes,
                    signature: str, envelope: str) -> Response:
        session = row["session"]
        got = await self.a.sql(store_record, self.a.engine, session, side, signer,
                               body.decode(), signature, envelope, self.a.now_ms())
        if got == "other":
            raise Refused(409, 409, f"session {session} has another {side} record")
        if got == "closed":
            raise Refused(409, 409, f"session {session} is {row['state']}: a record comes "
                                    "too late or for a session that never opened")
        cleared = await self.close(row, "terminated", pull=side == "customer")
        answer: dict[str, Any] = {"session": session, "side": side, "taken": got}
        if cleared is not None:
            answer["clearing"] = json.loads(cleared["info"])
            task = asyncio.get_running_loop().create_task(self.deliver(cleared))
            self.sending.add(task)
            task.add_done_callback(self.sending.discard)
        return JSONResponse(answer)

    async def _pull(self, row: dict[str, Any], reason: str) -> bool:
        """Ask the merchant agent to end the session and give its record; whether the
        merchant's record is now stored."""
        for attempt in (0, 1):
            if await self.a.sql(first_row, self.a.engine, D.acq_records,
                                session=row["session"], side="merchant") is not None:
                return True
            if not attempt:
                await self._ask(row, reason)
        return False

    async def _ask(self, row: dict[str, Any], reason: str) -> None:
        merchant = self.a.config.merchants.get(row["merchant"])
        if merchant is None:
            return
        body, headers = S.signed(self.a.config.private_key, self.a.config.id, S.END, {
            "acquirer": self.a.config.id, "merchant": merchant.id, "session": row["session"],
            "reason": reason, "created": self.a.now_ms() // 1000})
        try:
            async with httpx.AsyncClient(timeout=30) as http:
                answer = await http.post(f"{merchant.url}/v1/sessions/{row['session']}/end",
                                         content=body, headers=headers)
        except httpx.HTTPError:
            return
        if answer.status_code != 200 or len(answer.content) > K.MAX_RECORD:
            return
        rec_body = verified_answer_large(answer, merchant.public_key, merchant.id)
        if rec_body is None:
            return
        try:
            rec = K.parse_record(rec_body)
        except K.ClosingError:
            return
        if rec["session"] == row["session"] and rec["side"] == "merchant" and \
                rec["party"] == merchant.id:
            await self.a.sql(store_record, self.a.engine, row["session"], "merchant",
                             merchant.id, rec_body.decode(), answer.headers[S.SIGNATURE], "",
                             self.a.now_ms())

    async def close(self, row: dict[str, Any], reason: str, force: bool = False,
                    pull: bool = True) -> dict[str, Any] | None:
        """Clear ``row``'s session once both records are in (asking the merchant for its
        own when ``pull``), or with what there is when ``force``."""
        session = row["session"]
        if pull:
            await self._pull(row, reason)
        sides = {r for r in ("merchant", "customer") if await self.a.sql(
            first_row, self.a.engine, D.acq_records, session=session, side=r) is not None}
        if sides != {"merchant", "customer"} and not force:
            return None
        judged = await asyncio.to_thread(prejudge, self.a.engine, session)
        cleared = await self.a.sql(clear, self.a.engine, session, self.a.config.id,
                                   self.a.config.private_key, reason, self.a.now_ms(), judged)
        if cleared is not None:
            self.waiting.pop(session, None)
        return cleared

    async def deliver(self, cl: dict[str, Any]) -> None:
        """The signed clearing information to both account managers; each receipt marked."""
        cfg = self.a.config
        targets = [("am_done", cl["account_manager"],
                    cfg.account_manager_urls.get(cl["account_manager"], ""),
                    cfg.account_managers.get(cl["account_manager"]))]
        if cfg.merchant_account is not None:
            m = cfg.merchant_account
            targets.append(("mam_done", m.id, m.url, m.public_key))
        headers = {S.SIGNATURE: cl["signature"], S.SIGNER: cfg.id,
                   "Content-Type": "application/json"}
        for column, party, url, key in targets:
            if cl.get(column) or not url or key is None:
                continue
            try:
                async with httpx.AsyncClient(timeout=30) as http:
                    answer = await http.post(f"{url}/v1/clearings",
                                             content=cl["info"].encode(), headers=headers)
            except httpx.HTTPError:
                continue
            got = verified_answer(answer, key, party, S.RECEIPT)
            if got is None:
                continue
            receipt = json.loads(got)
            if receipt == {"party": party, "session": cl["session"],
                           "clearing": M.digest(cl["info"].encode())}:
                await self.a.sql(K.mark_delivered, self.a.engine, cl["session"], column,
                                 self.a.now_ms())

    async def tick(self) -> dict[str, int]:
        """One round of the clock (see the module docstring); counts of what it did. The
        sessions due are worked on together (at most :data:`TICK_IN_FLIGHT` at once): each
        clearing is still its own step, and the writer's group commit lets their steps
        share one commit (one fsync) instead of one each."""
        now = self.a.now_ms()
        done = {"cleared": 0, "delivered": 0}
        gate = asyncio.Semaphore(TICK_IN_FLIGHT)

        async def one(row: dict[str, Any]) -> None:
            async with gate:
                await self._due(row, now, done)

        skip = [k for k, (at, _) in self.waiting.items() if at > now][:MAX_SKIPPED]
        rows = await self.a.sql(K.due, self.a.engine, now, self.a.config.grace_ms, skip)
        failed = [r for r in await asyncio.gather(*(one(row) for row in rows),
                                                  return_exceptions=True) if r is not None]
        if failed:      # the others went on; the clock logs the first
            raise failed[0]
        return done

    async def _due(self, row: dict[str, Any], now: int, done: dict[str, int]) -> None:
        if row["kind"] == "close":
            cl = await self._settle(row, now)
            if cl is not None:
                done["cleared"] += 1
                await self.deliver(cl)
        else:
            await self.deliver(row)
            done["delivered"] += 1

    async def _settle(self, row: dict[str, Any], now: int) -> dict[str, Any] | None:
        """A session due: cleared with the merchant's record (asked for, with backoff,
        while it is missing), or without it only ``abandon_ms`` after the expiry."""
        session, cfg = row["session"], self.a.config
        expired = row["expires"] <= now
        reason = "timeout" if expired else "terminated"
        if row["expires"] + cfg.abandon_ms <= now:      # given up on: one last try, then
            return await self.close(row, reason, force=True)    # what there is
        if not await self._pull(row, reason):    # no evidence of the merchant's own yet:
            _, wait = self.waiting.get(session, (0, PULL_FIRST_MS // 2))   # never paid 0
            wait = min(wait * 2, PULL_MAX_MS)
            self.waiting[session] = (now + wait, wait)
            return None
        self.waiting.pop(session, None)
        # the merchant's record is in: the customer's is waited for until the grace
        force = not expired or row["expires"] + cfg.grace_ms <= now
        return await self.close(row, reason, force=force, pull=False)

    async def clock(self) -> None:
        while True:
            try:
                done = await self.tick()
                if any(done.values()):
                    log.info("clearing: %s", done, extra=done)
            except Exception:   # the next tick tries again; never kills the server
                log.exception("clearing")
            await asyncio.sleep(self.a.config.close_seconds)


def verified_answer_large(answer: httpx.Response, public: bytes, signer: str) -> bytes | None:
    """A signed record (larger than a message) from ``signer``, or None."""
    if answer.headers.get(S.SIGNER) != signer:
        return None
    if not S.verify(public, S.RECORD, answer.content, answer.headers.get(S.SIGNATURE)):
        return None
    return answer.content
