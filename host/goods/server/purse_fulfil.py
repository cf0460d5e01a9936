"""The fulfilment server's half of a good the purse pays (docs/goods.md, "The purse pays").

``POST /v1/purse/goods`` (payment server, ``PURSE_GOOD``): the merchant's signed digital order
(checked here: the payment server's word on the good is not enough) and the card session the
payment server opened a PSAM purchase for: card, offline counter, random. In one step the good
is kept ``capp`` and the session recorded for this order (unique per card, counter and random,
and per the serial's rightmost 8 bytes, counter and random, what the card's keys see: a
session gets one order's record, once, under any spelling of the card's serial); every
session of a good has one counter, the one its first had. The answer: UPDATE CAPP DATA CACHE
``84 DE`` with the MAC under the card's goods key over that session's random and counter, so
the record is good only inside that session's DEBIT, whose MAC1 the PSAM made for this
order's amount: a record cannot be moved to another order's purchase, another card or a later
session.
``POST /v1/purse/paid`` (``PURSE_PAID``): the payment server matched the card's MAC2 for a
session of this good: ``capp`` (or ``expired``) -> ``written``. The card commits the record and
the debit together, so the good is on the card.
A ``capp`` good past its pick-up deadline is ``expired``: no debit was ever proved, and the
purse gives back nothing because it never paid (a late proof still makes it ``written``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import Response

from ....protocols import goods as G
from ...kit.db import step
from ...kit.http import Refused
from ...terminal.goods_key import GoodsKeyService
from .. import db as D
from .. import wire as W
from .common import PartyServer, handled
from .payment import DIGITAL_FIELDS

SFI_OF_KIND = {"ticket": 0x11, "coupon": 0x12, "transit": 0x13, "voucher": 0x14}
PURSE_GOOD_FIELDS: dict[str, W.Checker] = {
    "order": W.ORDER, "card": W.SERIAL, "device": W.DEVICE, "counter": W.COUNTER,
    "random": W.RANDOM, "digital_order": W.INNER, "merchant_signature": W.SIGNATURE_HEX,
    "created": W.SECONDS}
PURSE_PAID_FIELDS: dict[str, W.Checker] = {
    "order": W.ORDER, "card": W.SERIAL, "counter": W.COUNTER, "random": W.RANDOM,
    "tac": W.MAC, "created": W.SECONDS}


class PurseFulfil(PartyServer):
    """Mixed into the fulfilment server: its purse routes and expiry."""

    keys: GoodsKeyService

    async def purse_goods(self, request: Request) -> Response:
        async def work() -> Response:
            _, data, _ = await self.authenticated(request, PURSE_GOOD_FIELDS, "purse good",
                                                  W.PURSE_GOOD, ("payment",))
            order = self._merchant_order(data)
            record = await self.sql(self._keep_session, data, order)
            apdu = self.keys.capp_update(bytes.fromhex(data["card"]),
                                         bytes.fromhex(data["random"]), data["counter"],
                                         SFI_OF_KIND[order["kind"]], bytes.fromhex(record))
            return self.reply(W.PURSE_GOOD, {"order": data["order"], "card": data["card"],
                                             "apdu": apdu.hex().upper()})
        return await handled(work)

    def _merchant_order(self, data: dict[str, Any]) -> dict[str, Any]:
        inner = data["digital_order"].encode()
        if not W.verify(self.system.peer("merchant").public_key, W.DIGITAL_ORDER, inner,
                        data["merchant_signature"]):
            raise Refused(401, 401, "purse good: the merchant's signature does not verify")
        order = W.parse(inner, DIGITAL_FIELDS, "digital order")
        if order["order"] != data["order"] or order["device"] != data["device"]:
            raise Refused(409, 409, "purse good: not this order's device")
        record = bytes.fromhex(order["record"])
        try:
            G.check(record)
        except G.GoodsRecordError as exc:
            raise Refused(400, 400, f"purse good: {exc}") from None
        if record[2:10] != self.system.merchant_issuer or \
                G.KIND_OF_TAG[record[0]] != order["kind"]:
            raise Refused(409, 409, "purse good: not a good of this merchant")
        return order

    def _keep_session(self, data: dict[str, Any], order: dict[str, Any]) -> str:
        """One step: the good kept ``capp`` (or found) and this card session recorded for it;
        the good's record, or a refusal that changed nothing."""
        g, s = D.purse_goods, D.capp_sessions
        now = self.now_ms()
        try:
            with step(self.engine) as conn:
                row = conn.execute(select(g).where(g.c.order_ref == data["order"])
                                   .with_for_update()).first()
                if row is None:
                    conn.execute(insert(g).values(
                        order_ref=data["order"], state=D.CAPP, card=data["card"],
                        device=data["device"], merchant=order["merchant"],
                        record=order["record"], sfi=SFI_OF_KIND[order["kind"]],
                        counter=data["counter"],
                        deadline=now + self.system.pickup_seconds * 1000,
                        amount=order["amount"], currency_code=order["currency"],
                        created=now, updated=now))
                elif row.state != D.CAPP:
                    raise Refused(409, 409, f"purse good: the good is {row.state}")
                elif row.card != data["card"] or row.counter != data["counter"]:
                    raise Refused(409, 409, "purse good: the good's purchase began on another "
                                            "card or at another counter")
                conn.execute(insert(s).values(order_ref=data["order"], card=data["card"],
                                              counter=data["counter"], random=data["random"],
                                              created=now))
                conn.execute(insert(D.capp_session_keys).values(   # the keys' view of it
                    factor=data["card"][-16:], counter=data["counter"],
                    random=data["random"], order_ref=data["order"], created=now))
        except IntegrityError:
            raise Refused(409, 409, "purse good: this card session had a record already") \
                from None
        return str(order["record"])

    async def purse_paid(self, request: Request) -> Response:
        async def work() -> Response:
            _, data, _ = await self.authenticated(request, PURSE_PAID_FIELDS, "purse paid",
                                                  W.PURSE_PAID, ("payment",))
            state = await self.sql(self._purse_written, data)
            if state is None:
                raise Refused(404, 404, "purse paid: no such session of this good")
            return self.reply(W.PURSE_PAID, {"order": data["order"], "state": state})
        return await handled(work)

    def _purse_written(self, data: dict[str, Any]) -> str | None:
        g, s = D.purse_goods, D.capp_sessions
        with step(self.engine) as conn:
            session = conn.execute(select(s.c.id).where(
                s.c.order_ref == data["order"], s.c.card == data["card"],
                s.c.counter == data["counter"], s.c.random == data["random"])).first()
            if session is None:
                return None
            conn.execute(update(g).where(g.c.order_ref == data["order"],
                                         g.c.state.in_((D.CAPP, D.EXPIRED)))
                         .values(state=D.WRITTEN, updated=self.now_ms()))
            row = conn.execute(select(g.c.state).where(g.c.order_ref == data["order"])
                               ).first()
        return str(row.state) if row else None

    def purse_redelivery(self, card: str, device: str, challenge: str,
                         held: set[str]) -> dict[str, Any] | None:
        """At a pick-up through the device that bought it: a purse good paid (``written``)
        that the card does not hold, written again by secure messaging (a device that sent the
        DEBIT without the record). By its tag: a card holding it already (a device hiding it
        from ``held``) keeps its own record, used or not; so a re-delivery needs no state."""
        g = D.purse_goods
        with step(self.engine) as conn:
            rows = conn.execute(select(g).where(g.c.card == card, g.c.device == device,
                                                g.c.state == D.WRITTEN).order_by(g.c.id)
                                .limit(256)).all()
        for row in rows:
            if row.record[4:36] not in held:
                apdu = self.keys.update_record(bytes.fromhex(card), bytes.fromhex(challenge),
                                               row.sfi, bytes.fromhex(row.record))
                return {"order": row.order_ref, "card": card, "apdu": apdu.hex().upper(),
                        "state": D.WRITTEN}
        return None

    def purse_written_again(self, order: str, card: str, device: str) -> str | None:
        """The card's answer to a re-delivery: the good's state (None: no such purse good of
        this card and device)."""
        g = D.purse_goods
        with step(self.engine) as conn:
            row = conn.execute(select(g.c.state).where(
                g.c.order_ref == order, g.c.card == card, g.c.device == device)).first()
        return str(row.state) if row is not None else None

    def purse_expire(self, at_ms: int | None = None) -> int:
        """``capp`` goods past their deadline -> ``expired`` (nothing to refund); how many."""
        g = D.purse_goods
        now = self.now_ms() if at_ms is None else at_ms
        with step(self.engine) as conn:
            done = conn.execute(update(g).where(g.c.state == D.CAPP, g.c.deadline < now)
                                .values(state=D.EXPIRED, updated=now))
        return int(done.rowcount or 0)
