"""FIG. 4 at the merchant agent (seed 004, claims 24-26): a purchase whose item is one of the
merchant's digital products (``[[product]]`` in its file) is delivered as an offer, the
product under a fresh K2 with a signed description, and K2 is lodged with the trusted party
(the mediating agent) before the customer sees the offer.

``GET /v1/sessions/{session}/purchases/{index}/offer?pseudonym=``: the offer for the purchase
paid by link ``index`` (made once, in ONE step: the same offer on every later call; lodged
again until the trusted party has taken K2: 503 meanwhile). 404 for anyone without the
session's pseudonym, a purchase that does not exist, or an item that is no digital product.

``POST /v1/sessions/{session}/purchases/{index}/accept``: the customer's signed acceptance
(``sign(accept, unique)^c``), checked against the session key the temporary certificate gave
and the offer's description, then relayed to the trusted party; its answer (K2 sealed to the
customer's K1, which this merchant cannot open) is kept with the acceptance as the merchant's
evidence and passed on. The same acceptance again gets the same answer.

Fair exchange: a purchase of a product with ``"link": ""`` is pending (``trade_ma_pending``,
nothing paid, no other purchase in the session until it settles); its lodge carries the held
link and units; the release's answer carries the paying link, applied in ONE step
(:func:`apply_link`). ``POST /v1/sessions/{session}/collect`` (and the agent's end) asks the
party for a release the customer got directly; the customer's terminate asks with ``close``,
which closes an unreleased order at the party before the merchant's record is made.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import Connection, Engine, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ...kit.db import first_row, step
from ...kit.http import Refused, read_body
from ...kit.request_log import note
from .. import closing as K
from .. import db as D
from .. import messages as M
from .. import signing as S
from ..money import Amount
from ..payword import MAX_STEP, PaywordError
from ..server.common import refused, same_pseudonym, verified_answer
from . import delivery as V
from .party import LINK_ASK, LODGE, LODGED, PARTY_KEY, RELEASED, paid_by

if TYPE_CHECKING:
    from ..server.merchant import MerchantAgent

PENDING = "pending"     # a product purchase whose link the trusted party has not released


def pending_units(row: Any, index: int) -> int:
    """Units a product purchase at ``index`` pays on from the held link (its link not shown:
    the same bounds as a paid one)."""
    units = index - row.held_index
    if index > row.length:
        raise PaywordError(f"link {index} is past the chain's end ({row.length})")
    if units <= 0:
        raise PaywordError(f"link {index} was paid already (the merchant holds "
                           f"{row.held_index}): a replay")
    if units > MAX_STEP:
        raise PaywordError(f"at most {MAX_STEP} links at once")
    return int(units)


def take_pending(conn: Connection, row: Any, data: dict[str, Any], units: int,
                 order_body: str, now: int) -> dict[str, Any]:
    """In the purchase's step: a product bought fairly is recorded as pending, the held link
    does not move (nothing is paid), and no other purchase is taken until its link comes."""
    session = row.session
    if conn.execute(select(func.count()).where(D.ma_purchases.c.session == session)
                    ).scalar_one() >= K.MAX_ENTRIES:
        raise Refused(409, 409, f"session {session}: too many purchases for one record")
    s = D.ma_sessions.c     # the compare-and-set an ordinary purchase makes too (PostgreSQL:
    if conn.execute(update(D.ma_sessions).where(     # the later one sees the row changed)
            s.session == session, s.state == D.OPEN, s.held_index == row.held_index,
            s.updated == row.updated).values(updated=max(now, row.updated + 1))
            ).rowcount != 1:
        raise Refused(409, 409, "another purchase took this link first")
    conn.execute(insert(D.ma_pending).values(      # unique per session: one at a time
        session=session, link_index=data["index"], units=units, amount=units * row.unit,
        item=data["order"]["item"], held=row.held_link, order_body=order_body,
        order_signature=data["signature"], at=now))
    return {"session": session, "index": data["index"], "units": units,
            "amount": units * row.unit, "currency": row.currency, "state": PENDING,
            "left": (row.length - row.held_index) * row.unit}


def apply_link(engine: Engine, session: str, index: int, link: str, now: int) -> str | None:
    """ONE step: the link the trusted party released pays the pending product: checked with
    hashes against the held link it was bought on, the purchase row written, the held link
    moved and the pending row gone together. The session's state, or None (nothing to do)."""
    n, s = D.ma_pending.c, D.ma_sessions.c
    with step(engine) as conn:
        p = conn.execute(select(D.ma_pending).where(n.session == session,
                                                    n.link_index == index)).first()
        row = conn.execute(select(D.ma_sessions).where(s.session == session)).first()
        if p is None or row is None or not M.KEY(link):
            return None
        if not paid_by(bytes.fromhex(link), p.units, bytes.fromhex(p.held)):
            return None
        state = D.SPENT if index == row.length and row.state == D.OPEN else row.state
        if conn.execute(update(D.ma_sessions).where(
                s.session == session, s.held_index == index - p.units,
                s.held_link == p.held).values(held_index=index, held_link=link, state=state,
                                              updated=now)).rowcount != 1:
            return None
        conn.execute(insert(D.ma_purchases).values(
            session=session, link_index=index, units=p.units, amount=p.amount, item=p.item,
            link=link, order_body=p.order_body, order_signature=p.order_signature, at=now))
        conn.execute(delete(D.ma_pending).where(n.id == p.id))
        return str(state)


def store_offer(engine: Engine, row: dict[str, Any]) -> dict[str, Any]:
    """ONE step: the purchase's offer, the first one made (a twin request's is dropped)."""
    o = D.ma_offers.c
    try:
        with step(engine) as conn:
            conn.execute(insert(D.ma_offers).values(**row))
    except IntegrityError:
        pass
    with step(engine) as conn:
        got = conn.execute(select(D.ma_offers).where(
            o.session == row["session"], o.link_index == row["link_index"])).first()
        assert got is not None
        return dict(got._mapping)


def mark(engine: Engine, offer_id: int, **values: Any) -> bool:
    o = D.ma_offers.c
    with step(engine) as conn:
        query = update(D.ma_offers).where(o.id == offer_id)
        if "acceptance" in values:      # evidence kept once: the first relayed answer
            query = query.where(o.acceptance.is_(None) | (o.acceptance == values["acceptance"]))
        return bool(conn.execute(query.values(**values)).rowcount == 1)


def read_product(path: Path) -> bytes:
    with path.open("rb") as f:
        data = f.read(V.MAX_PRODUCT + 1)
    if len(data) > V.MAX_PRODUCT:
        raise Refused(503, 503, "the product is larger than a delivery carries")
    return data


class Shop:
    def __init__(self, agent: MerchantAgent) -> None:
        self.agent = agent
        self._party: bytes | None = None     # the trusted party's X25519 key, once fetched

    async def _post(self, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        url = self.agent.config.acquirer.url
        try:
            async with httpx.AsyncClient(timeout=30) as http:
                return await http.post(f"{url}{path}", content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise Refused(503, 503, f"the trusted party did not answer: "
                                    f"{type(exc).__name__}; ask again") from None

    async def party_key(self) -> bytes:
        if self._party is None:
            a = self.agent.config.acquirer
            try:
                async with httpx.AsyncClient(timeout=30) as http:
                    answer = await http.get(f"{a.url}/v1/party-key")
            except httpx.HTTPError as exc:
                raise Refused(503, 503, f"the trusted party did not answer: "
                                        f"{type(exc).__name__}; ask again") from None
            body = verified_answer(answer, a.public_key, a.id, PARTY_KEY)
            data = json.loads(body) if body is not None else {}
            if data.get("acquirer") != a.id or not M.KEY(data.get("key")):
                raise Refused(503, 503, "the trusted party's key is not signed by it")
            self._party = bytes.fromhex(data["key"])
        return self._party

    async def _session(self, request: Request) -> tuple[dict[str, Any], int]:
        session = request.path_params["session"]
        index = request.path_params["index"]
        row = await self.agent._session(session)
        if not (index.isdigit() and len(index) <= 7 and M.INDEX(int(index))):
            raise Refused(404, 404, "no such purchase")
        return row, int(index)

    async def _lodge(self, offer: dict[str, Any]) -> None:
        c = self.agent.config
        a = self.agent
        pending = await a.sql(first_row, a.engine, D.ma_pending, session=offer["session"],
                              link_index=offer["link_index"])
        body, headers = S.signed(c.private_key, c.id, LODGE, {
            "description": offer["description"], "signature": offer["signature"],
            "sealed": offer["sealed"],
            "held": "" if pending is None else pending["held"],
            "units": 0 if pending is None else pending["units"]})
        answer = await self._post("/v1/deliveries", body, headers)
        took = verified_answer(answer, c.acquirer.public_key, c.acquirer.id, LODGED)
        if took is None:
            raise Refused(503, 503, f"the trusted party did not take the key (HTTP "
                                    f"{answer.status_code}); ask again")
        await self.agent.sql(mark, self.agent.engine, offer["id"], lodged=1)

    async def offer(self, request: Request) -> Response:
        try:
            row, index = await self._session(request)
            if not same_pseudonym(request.query_params.get("pseudonym"), row["pseudonym"]):
                raise Refused(404, 404, "no such session")
            a = self.agent
            got = await a.sql(first_row, a.engine, D.ma_offers, session=row["session"],
                              link_index=index)
            if got is None:
                got = await self._make(row, index)
            if not got["lodged"]:
                await self._lodge(got)
            note(txn=row["session"], step="offer")
            return JSONResponse({"session": row["session"], "index": index,
                                 "description": got["description"],
                                 "signature": got["signature"],
                                 "ciphertext": base64.b64encode(got["ciphertext"]).decode()})
        except Refused as exc:
            return refused(exc)

    async def _make(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        a = self.agent
        bought = await a.sql(first_row, a.engine, D.ma_purchases, session=row["session"],
                             link_index=index) or \
            await a.sql(first_row, a.engine, D.ma_pending, session=row["session"],
                        link_index=index)
        if bought is None:
            raise Refused(404, 404, "no such purchase")
        product = a.config.products.get(bought["item"])
        if product is None:
            raise Refused(404, 404, f"{bought['item']} is not a digital product here")
        plaintext = await asyncio.to_thread(read_product, product[0])
        made, sealed = await asyncio.to_thread(
            V.offer, a.config.private_key, a.config.id, row["session"],
            V.signed_order(bought["order_body"].encode(), bought["order_signature"]),
            bought["item"], product[1], Amount(bought["amount"], row["currency"]), plaintext,
            await self.party_key())
        now = a.now_ms()
        return await a.sql(store_offer, a.engine, {
            "session": row["session"], "link_index": index,
            "description": made.description.decode(), "signature": made.signature,
            "ciphertext": made.ciphertext, "sealed": sealed.hex(), "lodged": 0,
            "created": now, "updated": now})

    async def accept(self, request: Request) -> Response:
        try:
            row, index = await self._session(request)
            body = await read_body(request, M.MAX_MESSAGE)
            a = self.agent
            got = await a.sql(first_row, a.engine, D.ma_offers, session=row["session"],
                              link_index=index)
            if got is None or not got["lodged"]:
                raise Refused(404, 404, "no offer was made for this purchase")
            try:    # the session key its own FI's certificate gave
                acc = V.check_acceptance(body, bytes.fromhex(row["session_key"]))
            except V.DeliveryError as exc:
                raise Refused(401, 401, exc.reason) from None
            order = json.loads(got["description"])["order"]
            if acc["session"] != row["session"] or acc["order"] != order:
                raise Refused(403, 403, "acceptance: for another session or order")
            if acc["description"] != M.digest(got["description"].encode()):
                raise Refused(409, 409, "acceptance: of another description")
            note(txn=row["session"], step="accept")
            if got["acceptance"] == body.decode() and got["answer"]:
                return self._answer(row["session"], index, got["answer"])
            c = a.config
            answer = await self._post("/v1/deliveries/release", S.canonical({
                "session": row["session"], "order": order, "acceptance": body.decode()}),
                {"Content-Type": "application/json"})
            released = verified_answer(answer, c.acquirer.public_key, c.acquirer.id,
                                       RELEASED)
            if released is None:
                status = answer.status_code if 400 <= answer.status_code < 500 else 503
                try:
                    reason = str(answer.json().get("reason", "")) if status != 503 else ""
                except ValueError:
                    reason = ""
                raise Refused(status, status, f"the trusted party refused: {reason}"[:300])
            data = json.loads(released)
            sealed = data["sealed"]
            await a.sql(mark, a.engine, got["id"], acceptance=body.decode(), answer=sealed,
                        updated=a.now_ms())
            await self._paid(row["session"], index, str(data.get("link", "")))
            return self._answer(row["session"], index, sealed)
        except Refused as exc:
            return refused(exc)

    async def _paid(self, session: str, index: int, link: str) -> None:
        """The link released with K2 pays the pending product (nothing when there is none)."""
        if link:
            a = self.agent
            state = await a.sql(apply_link, a.engine, session, index, link, a.now_ms())
            if state == D.SPENT:
                await a.closer.end(session, "spent")

    async def collect(self, session: str, close: bool = False) -> int:
        """Ask the trusted party (signed) for the release of this session's pending product:
        the customer may have accepted there directly. The links applied (0 or 1).
        ``close`` (the session ends here): an order not released is closed at the party in
        its ONE step, so no K2 goes out after this merchant's record is made; without the
        party's signed word on it the end is refused (503, ask again)."""
        a, c = self.agent, self.agent.config
        pending = await a.sql(first_row, a.engine, D.ma_pending, session=session)
        offer = pending and await a.sql(first_row, a.engine, D.ma_offers, session=session,
                                        link_index=pending["link_index"])
        if not pending or not offer or not offer["lodged"]:
            return 0        # never lodged: the party holds no K2 for it, nothing to close
        order = json.loads(offer["description"])["order"]
        body, headers = S.signed(c.private_key, c.id, LINK_ASK, {
            "session": session, "order": order, "created": a.now_ms() // 1000,
            "close": close})
        try:
            answer = await self._post("/v1/deliveries/link", body, headers)
        except Refused:
            if close:
                raise
            return 0
        released = verified_answer(answer, c.acquirer.public_key, c.acquirer.id, RELEASED)
        data = json.loads(released) if released is not None else {}
        if data.get("session") != session or data.get("order") != order:
            if close:
                raise Refused(503, 503, "the trusted party did not close the product's "
                                        "order; ask again")
            return 0
        await self._paid(session, int(pending["link_index"]), str(data.get("link", "")))
        return 1

    async def collect_request(self, request: Request) -> Response:
        """``POST /v1/sessions/{session}/collect``: fetch a released link now (anyone may
        ask: it only takes the trusted party's signed word)."""
        try:
            row = await self.agent._session(request.path_params["session"])
            return JSONResponse({"session": row["session"],
                                 "collected": await self.collect(row["session"])})
        except Refused as exc:
            return refused(exc)

    @staticmethod
    def _answer(session: str, index: int, sealed: str) -> Response:
        return JSONResponse({"session": session, "index": index, "sealed": sealed})
