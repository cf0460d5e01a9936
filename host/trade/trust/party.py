"""FIG. 4's trusted party in the mediating agent's server (seed 004, claims 24-26): holds each
order's K2 and releases it once, against the customer's signed acceptance only. Its state is
the acquirer's database (``trade_acq_deliveries``); every check-then-act is ONE step.

``GET /v1/party-key``: the agent's X25519 key (derived from its Ed25519 key under its own
label), signed, so its merchants can seal K2 to it.

``POST /v1/deliveries`` (lodge): ``{description, signature, sealed}`` signed by a merchant of
this agent (``X-Svcard-Signer``, label ``svcard-trade-lodge/1``): the description signed by
that same merchant, for a session open (or cleared) here with it, and K2 sealed to this party
and matching the description's commitment. Lodged once per (session, order): the same again
is taken again ("same"), another description for that order is 409. At most
``closing.MAX_ENTRIES`` per session (one per purchase).

``POST /v1/deliveries/release``: ``{session, order, acceptance}``, from anyone (the merchant
relays it): the acceptance must be signed by the session's key (the one its temporary
certificate vouched for), for this session and order, of exactly the lodged description, made
within 300 s. The answer is K2 sealed to the acceptance's K1 (only the customer opens it),
signed by the agent. The same acceptance again gets the same answer, stored in the step that
released it, at any age; another acceptance of that order, or an acceptance's unique id used
for another order, is 409. Nothing else ever takes K2 out.

Fair exchange: a lodge with ``held`` and ``units`` (a product whose link is not paid yet)
keeps them in ``trade_acq_links``; its release needs the acceptance's ``link`` with
``H^units(link) = held`` (402), the session neither cleared nor expired and the order not
closed (409), and stores the link in the release's step; the answer carries it.
``POST /v1/deliveries/link`` (signed by the session's merchant, ``svcard-trade-link-ask/1``):
the same answer; with ``close`` an order not released is closed for good in ONE step (a
signed answer with an empty ``sealed`` and ``link``).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import Response

from ...kit.db import first_row, step
from ...kit.http import Refused, check_json_shape, read_body
from ...kit.request_log import note
from .. import closing as K
from .. import db as D
from .. import messages as M
from .. import signing as S
from ..server.common import refused, signed_json
from . import delivery as V

if TYPE_CHECKING:
    from ..server.acquirer import Acquirer

PARTY_KEY = b"svcard-trade-party-key/1\n"   # the agent's X25519 key, for its merchants
LODGE = b"svcard-trade-lodge/1\n"           # merchant -> agent: K2 for one order
LODGED = b"svcard-trade-lodged/1\n"         # agent -> merchant: taken
RELEASED = b"svcard-trade-released/1\n"     # agent -> customer (relayed): K2 under K1
LINK_ASK = b"svcard-trade-link-ask/1\n"     # merchant -> agent: the release of one order
MAX_LODGE = 16_384           # bytes of a lodge request (a description's text may be escaped)
MAX_RELEASE = 8_192
SEALED_HEX = 2 * (32 + 12 + 32 + 16)
OPEN_STATES = (D.OPEN, D.CLEARED)   # a product bought in a session may be fetched after it

LODGE_BODY: dict[str, Any] = {
    "description": M._text(MAX_LODGE), "signature": M.SIGNATURE,
    "sealed": lambda v: isinstance(v, str) and len(v) == SEALED_HEX and M.KEY(v[:64])
    and all(c in "0123456789abcdef" for c in v),
    "held": M.LINK_OR_NONE, "units": M._int(0, 10_000)}
LINK_ASK_BODY: dict[str, Any] = {"session": M.SESSION, "order": M.DIGEST,
                                 "created": M.SECONDS, "close": M.BOOL}
RELEASE_BODY: dict[str, Any] = {"session": M.SESSION, "order": M.DIGEST,
                                "acceptance": M._text(4096)}


def exchange_key(private: bytes) -> tuple[bytes, bytes]:
    """The agent's X25519 (private, public) pair, derived from its Ed25519 private key under
    a label of its own: one secret to keep, and a key that signs is never used to agree."""
    seed = HKDF(SHA256(), 32, None, b"svcard-trade-party-x25519/1").derive(private)
    return seed, X25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()


def parse(body: bytes, fields: dict[str, Any], what: str) -> dict[str, Any]:
    check_json_shape(body, max_depth=3, max_items=16)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise M.MessageError(f"{what}: not JSON") from None
    return M.check(data, fields, what)


def paid_by(link: bytes, units: int, held: bytes) -> bool:
    """Does ``link`` pay ``units`` links on from ``held`` (hashes only)?"""
    for _ in range(units):
        link = hashlib.sha256(link).digest()
    return link == held


def lodge(engine: Engine, row: dict[str, Any], most: int,
          fair: dict[str, Any] | None = None) -> str:
    """ONE step: the session open here with this merchant, the order's key not lodged yet
    (or lodged with the very same description: "same"), fewer than ``most`` in the session.
    ``fair`` (held, units): the order's link is not paid yet; it comes with the acceptance."""
    d, s = D.acq_deliveries.c, D.acq_sessions.c
    try:
        with step(engine) as conn:
            old = conn.execute(select(D.acq_deliveries).where(
                d.session == row["session"], d.order_digest == row["order_digest"])).first()
            if old is not None:
                if old.description != row["description"]:
                    raise Refused(409, 409, "order: another description is lodged for it")
                return "same"
            known = conn.execute(select(D.acq_sessions).where(
                s.session == row["session"])).first()
            if known is None or known.state not in OPEN_STATES or \
                    known.merchant != row["merchant"]:
                raise Refused(403, 403, "description: not a session open here with this "
                                        "merchant")
            if conn.execute(select(func.count()).where(
                    d.session == row["session"])).scalar_one() >= most:
                raise Refused(409, 409, f"session: already {most} keys lodged")
            conn.execute(insert(D.acq_deliveries).values(**row))
            if fair is not None:
                conn.execute(insert(D.acq_links).values(
                    session=row["session"], order_digest=row["order_digest"], link=None,
                    **fair))
            return "new"
    except IntegrityError:      # lodged meanwhile by a twin request: judged again
        return lodge(engine, row, most, fair)


def release(engine: Engine, session: str, order: str, unique: str, acceptance: str,
            answer: str, now: int, link: str = "") -> str:
    """ONE step: the order's K2 released to this acceptance if none was before; the same
    acceptance again finds its stored answer; any other is refused. A product bought fairly
    (a ``trade_acq_links`` row): its paying ``link`` is stored in the same step, so K2 never
    goes out without the merchant's payment, and only while the session is not cleared."""
    d, k, s = D.acq_deliveries.c, D.acq_links.c, D.acq_sessions.c
    try:
        with step(engine) as conn:
            fair = conn.execute(select(D.acq_links).where(
                k.session == session, k.order_digest == order)).first()
            if fair is not None and fair.link == "":
                raise Refused(409, 409, "order: the merchant closed it before it was accepted")
            if fair is not None and fair.link is None:
                known = conn.execute(select(s.state, s.expires).where(
                    s.session == session)).first()
                if known is None or known.state == D.CLEARED or known.expires <= now:
                    raise Refused(409, 409, "session: ended here; the product's link can "
                                            "no longer be paid")
                if not link or not paid_by(bytes.fromhex(link), fair.units,
                                           bytes.fromhex(fair.held)):
                    raise Refused(402, 402, "acceptance: its link does not pay the order")
            if conn.execute(update(D.acq_deliveries).where(
                    d.session == session, d.order_digest == order,
                    d.accepted.is_(None)).values(
                    accepted=unique, acceptance=acceptance, answer=answer,
                    updated=now)).rowcount == 1:
                if fair is not None:
                    conn.execute(update(D.acq_links).where(
                        k.id == fair.id, k.link.is_(None)).values(link=link))
                return answer
            row = conn.execute(select(D.acq_deliveries).where(
                d.session == session, d.order_digest == order)).first()
            if row is None:
                raise Refused(404, 404, "order: no key lodged for it")
            if row.accepted != unique or row.acceptance != acceptance:
                raise Refused(409, 409, "order: already accepted by another acceptance")
            return str(row.answer)
    except IntegrityError:
        raise Refused(409, 409, "acceptance: its unique id was used for another order") \
            from None


def close_order(engine: Engine, session: str, order: str, now: int) -> str | None:
    """ONE step, the merchant ending its session: an order of a product bought fairly that no
    acceptance released is closed for good (its K2 never goes out, nothing is owed: the
    compare-and-set on ``accepted`` is the one a release makes). The stored answer if one
    was released first, else None."""
    d, k = D.acq_deliveries.c, D.acq_links.c
    with step(engine) as conn:
        row = conn.execute(select(D.acq_deliveries).where(
            d.session == session, d.order_digest == order)).first()
        if row is None:
            return None
        if conn.execute(update(D.acq_deliveries).where(
                d.id == row.id, d.accepted.is_(None)).values(
                accepted=f"closed-{row.id}", updated=now)).rowcount == 1:
            conn.execute(update(D.acq_links).where(
                k.session == session, k.order_digest == order, k.link.is_(None)).values(
                link=""))
            return None
        return None if row.answer is None else str(row.answer)


class TrustedParty:
    """The routes above, on the acquirer's database and keys."""

    def __init__(self, acquirer: Acquirer) -> None:
        self.acq = acquirer
        self._private, self.public = exchange_key(acquirer.config.private_key)

    def __repr__(self) -> str:
        return f"TrustedParty({self.acq.config.id})"

    def _answer(self, domain: bytes, payload: dict[str, Any]) -> Response:
        return signed_json(self.acq.config.private_key, self.acq.config.id, domain, payload)

    async def key(self, request: Request) -> Response:
        return self._answer(PARTY_KEY, {"acquirer": self.acq.config.id,
                                        "key": self.public.hex()})

    async def lodge(self, request: Request) -> Response:
        try:
            body = await read_body(request, MAX_LODGE)
            data = parse(body, LODGE_BODY, "lodge")
            signer = request.headers.get(S.SIGNER, "")
            merchant = self.acq.config.merchants.get(signer)
            if merchant is None:
                raise Refused(403, 403, f"lodge: {signer[:32]!r} is not a merchant here")
            if not S.verify(merchant.public_key, LODGE, body,
                            request.headers.get(S.SIGNATURE)):
                raise Refused(401, 401, "lodge: the signature does not verify")
            raw = data["description"].encode()
            try:
                d = V.check_description(raw, data["signature"], merchant.public_key)
                if d["merchant"] != signer:
                    raise V.DeliveryError("description: names another merchant")
                V.lodged_key(self._private, bytes.fromhex(data["sealed"]), raw)
            except V.DeliveryError as exc:
                raise Refused(400, 400, exc.reason) from None
            note(txn=d["session"], step="lodge")
            now = self.acq.now_ms()
            taken = await self.acq.sql(lodge, self.acq.engine, {
                "session": d["session"], "order_digest": d["order"], "merchant": signer,
                "description": data["description"], "signature": data["signature"],
                "sealed": data["sealed"], "created": now, "updated": now}, K.MAX_ENTRIES,
                {"held": data["held"], "units": data["units"]} if data["held"] else None)
            return self._answer(LODGED, {"acquirer": self.acq.config.id,
                                         "session": d["session"], "order": d["order"],
                                         "taken": taken})
        except Refused as exc:
            return refused(exc)

    async def release(self, request: Request) -> Response:
        try:
            data = parse(await read_body(request, MAX_RELEASE), RELEASE_BODY, "release")
            session, order = data["session"], data["order"]
            note(txn=session, step="release")
            row = await self.acq.sql(first_row, self.acq.engine, D.acq_deliveries,
                                     session=session, order_digest=order)
            known = await self.acq.sql(first_row, self.acq.engine, D.acq_sessions,
                                       session=session)
            if row is None or known is None or not known["session_key"]:
                raise Refused(404, 404, "order: no key lodged for it")
            raw = data["acceptance"].encode()
            try:
                a = V.check_acceptance(raw, bytes.fromhex(known["session_key"]))
            except V.DeliveryError as exc:
                raise Refused(401, 401, exc.reason) from None
            if a["session"] != session or a["order"] != order:
                raise Refused(403, 403, "acceptance: for another session or order")
            if a["description"] != M.digest(row["description"].encode()):
                raise Refused(409, 409, "acceptance: of another description")
            now = self.acq.now_ms()
            if row["answer"] is not None and row["acceptance"] == data["acceptance"]:
                answer = str(row["answer"])                # the same one again, at any age
            else:
                if abs(now // 1000 - a["created"]) > M.MAX_SKEW:
                    raise Refused(401, 401, "acceptance: too old or from the future")
                k2 = V.lodged_key(self._private, bytes.fromhex(row["sealed"]),
                                  row["description"].encode())
                try:
                    sealed = V.key_for_customer(k2, raw).hex()
                except V.DeliveryError as exc:
                    raise Refused(400, 400, exc.reason) from None
                answer = await self.acq.sql(
                    release, self.acq.engine, session, order, a["unique"], data["acceptance"],
                    sealed, now, a["link"])
            return await self._released(session, order, answer)
        except Refused as exc:
            return refused(exc)

    async def _released(self, session: str, order: str, answer: str) -> Response:
        """The signed release: K2 under K1 for the customer and, for a product bought
        fairly, the link that pays the merchant (the same answer to both, every time)."""
        fair = await self.acq.sql(first_row, self.acq.engine, D.acq_links, session=session,
                                  order_digest=order)
        link = "" if fair is None or fair["link"] is None else str(fair["link"])
        return self._answer(RELEASED, {"acquirer": self.acq.config.id, "session": session,
                                       "order": order, "sealed": answer, "link": link})

    async def link(self, request: Request) -> Response:
        """``POST /v1/deliveries/link``: the merchant of the session, signed (label
        ``svcard-trade-link-ask/1``), asks for an order's release: the same signed answer
        the customer got (so the link reaches the merchant even when the customer went to
        this party directly); 409 while nothing is released."""
        try:
            body = await read_body(request, MAX_RELEASE)
            data = parse(body, LINK_ASK_BODY, "link")
            signer = request.headers.get(S.SIGNER, "")
            merchant = self.acq.config.merchants.get(signer)
            if merchant is None or not S.verify(merchant.public_key, LINK_ASK, body,
                                                request.headers.get(S.SIGNATURE)):
                raise Refused(401, 401, "link: not signed by a merchant here")
            if abs(self.acq.now_ms() // 1000 - data["created"]) > M.MAX_SKEW:
                raise Refused(401, 401, "link: too old or from the future")
            row = await self.acq.sql(first_row, self.acq.engine, D.acq_deliveries,
                                     session=data["session"], order_digest=data["order"])
            if row is None or row["merchant"] != signer:
                raise Refused(404, 404, "order: no key lodged for it by this merchant")
            answer = row["answer"]
            if answer is None and data["close"]:
                answer = await self.acq.sql(close_order, self.acq.engine, data["session"],
                                            data["order"], self.acq.now_ms())
                if answer is None:      # closed: signed, so the merchant may end without it
                    return self._answer(RELEASED, {
                        "acquirer": self.acq.config.id, "session": data["session"],
                        "order": data["order"], "sealed": "", "link": ""})
            if answer is None:
                raise Refused(409, 409, "order: not accepted yet")
            return await self._released(data["session"], data["order"], str(answer))
        except Refused as exc:
            return refused(exc)
