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
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ...kit.db import first_row, step
from ...kit.http import Refused, read_body
from ...kit.request_log import note
from .. import db as D
from .. import messages as M
from .. import signing as S
from ..money import Amount
from ..server.common import refused, same_pseudonym, verified_answer
from . import delivery as V
from .party import LODGE, LODGED, PARTY_KEY, RELEASED

if TYPE_CHECKING:
    from ..server.merchant import MerchantAgent


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
        body, headers = S.signed(c.private_key, c.id, LODGE, {
            "description": offer["description"], "signature": offer["signature"],
            "sealed": offer["sealed"]})
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
            sealed = json.loads(released)["sealed"]
            await a.sql(mark, a.engine, got["id"], acceptance=body.decode(), answer=sealed,
                        updated=a.now_ms())
            return self._answer(row["session"], index, sealed)
        except Refused as exc:
            return refused(exc)

    @staticmethod
    def _answer(session: str, index: int, sealed: str) -> Response:
        return JSONResponse({"session": session, "index": index, "sealed": sealed})
