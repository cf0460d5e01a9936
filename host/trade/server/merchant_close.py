"""The merchant agent's end of a session (seed 004 FIG. 3, claims 10, 11): the session stops
(the deposit spent, the customer's terminate message, the merchant's own decision, or the
mediating agent's timeout) and the merchant's signed transaction record is made ONCE, in the
step that ends the session, then sent to the mediating agent.

``POST /v1/sessions/{session}/end``: the mediating agent, signed (``svcard-trade-end/1``:
acquirer, merchant, session, reason, created), ends a session (its timeout, or the customer's
record arrived first) and gets the merchant's record back, signed (``svcard-trade-record/1``).
The record is stored, so every copy sent is the same bytes: the mediating agent takes one
record per side and refuses a different second one.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import Engine, insert, select, update
from starlette.requests import Request
from starlette.responses import Response

from ...kit.db import step
from ...kit.http import Refused
from .. import closing as K
from .. import db as D
from .. import messages as M
from .. import signing as S
from .common import authenticated, refused

if TYPE_CHECKING:
    from .merchant import MerchantAgent

END: dict[str, Any] = {"acquirer": M.IDENT, "merchant": M.IDENT, "session": M.SESSION,
                       "reason": lambda v: v in ("timeout", "terminated"),
                       "created": M.SECONDS}


def _record(conn: Any, row: Any, merchant: str, private: bytes, ended: str,
            now: int) -> dict[str, Any]:
    p = D.ma_purchases.c
    bought = conn.execute(select(D.ma_purchases).where(p.session == row.session).order_by(
        p.link_index)).all()
    entries = [K.entry(b.link_index, b.item, b.units, b.order_signature) for b in bought]
    evidence = None
    if bought:
        last = bought[-1]
        c = json.loads(row.commitment)
        evidence = {"index": last.link_index, "link": last.link,
                    "commitment": S.canonical(c["commitment"]).decode(),
                    "commitment_signature": c["signature"], "order": last.order_body,
                    "order_signature": last.order_signature}
    key = K.record_key(private, row.session, "merchant")
    return K.make_record(row.session, "merchant", merchant, ended, row.currency,
                         int(row.unit or 0), entries, key, now // 1000, evidence)


def end_session(engine: Engine, session: str, ended: str, merchant: str, private: bytes,
                now: int) -> tuple[str, str] | None:
    """End ``session`` (if it still takes purchases) and make its record, in ONE step; the
    record (body, signature), the same one every time; None: no such session."""
    s, r = D.ma_sessions.c, D.ma_records.c
    with step(engine) as conn:
        row = conn.execute(select(D.ma_sessions).where(s.session == session)).first()
        if row is None:
            return None
        kept = conn.execute(select(D.ma_records).where(r.session == session)).first()
        if kept is not None:
            return str(kept.body), str(kept.signature)
        if row.state in (D.INFORMED, D.OPEN):
            conn.execute(update(D.ma_sessions).where(
                s.session == session, s.state == row.state).values(
                state=D.TERMINATED, updated=now))
        elif row.state == D.SPENT:
            ended = "spent"
        payload = _record(conn, row, merchant, private, ended, now)
        body = S.canonical(payload).decode()
        signature = S.sign(private, S.RECORD, body.encode())
        conn.execute(insert(D.ma_records).values(session=session, ended=ended, body=body,
                                                 signature=signature, sent=0, at=now))
        return body, signature


def mark_sent(engine: Engine, session: str) -> None:
    with step(engine) as conn:
        conn.execute(update(D.ma_records).where(D.ma_records.c.session == session).values(
            sent=1))


class MerchantCloser:
    def __init__(self, agent: MerchantAgent) -> None:
        self.agent = agent

    async def end(self, session: str, ended: str = "merchant") -> tuple[str, str] | None:
        """End ``session`` (the merchant's own decision by default) and send the record."""
        a = self.agent
        got = await a.sql(end_session, a.engine, session, ended, a.config.id,
                          a.config.private_key, a.now_ms())
        if got is not None:
            await self.send(session, *got)
        return got

    async def send(self, session: str, body: str, signature: str) -> bool:
        """The record to the mediating agent (when its URL is known); False if it did not
        take it now (it asks for the record itself at the session's end)."""
        url = self.agent.config.acquirer.url
        if not url:
            return False
        headers = {S.SIGNATURE: signature, S.SIGNER: self.agent.config.id,
                   "Content-Type": "application/json"}
        try:
            async with httpx.AsyncClient(timeout=30) as http:
                answer = await http.post(f"{url}/v1/records", content=body.encode(),
                                         headers=headers)
        except httpx.HTTPError:
            return False
        if answer.status_code != 200:
            return False
        await self.agent.sql(mark_sent, self.agent.engine, session)
        return True

    async def _acquirer_key(self, signer: str, data: dict[str, Any]) -> bytes | None:
        a = self.agent.config.acquirer
        if signer != a.id or data["acquirer"] != a.id or \
                data["merchant"] != self.agent.config.id:
            return None
        return a.public_key

    async def end_request(self, request: Request) -> Response:
        """The mediating agent ends a session and takes the merchant's record."""
        try:
            a = self.agent
            now = a.now_ms()
            _, data, _ = await authenticated(request, END, "end", S.END, self._acquirer_key,
                                             now // 1000)
            if data["session"] != request.path_params["session"]:
                raise Refused(400, 400, "end: for another session")
            got = await a.sql(end_session, a.engine, data["session"], data["reason"],
                              a.config.id, a.config.private_key, now)
            if got is None:
                raise Refused(404, 404, f"no session {data['session']}")
            body, signature = got
            return Response(body.encode(), headers={S.SIGNATURE: signature,
                                                    S.SIGNER: a.config.id},
                            media_type="application/json")
        except Refused as exc:
            return refused(exc)
