"""The fulfilment server of seed 000: it holds each paid good until it is on the card, and its
key service (``host/terminal/goods_key.py``) makes the secure-messaging write of the good for
the card's challenge. The device only relays that write: it cannot forge, alter, replay or move
it to another card (docs/protocol.md, "IEP: goods by secure messaging").

``POST /v1/goods`` (payment server, ``PAID``): the merchant's signed digital order and the
institution's signed payment confirmation, both checked here (the payment server's own word is
not enough): same order, amount and card, the record a valid goods record of this merchant.
The good is kept ``pending`` (its pick-up deadline set) and, for the device's challenge, the
write is handed out (``issued``): UPDATE RECORD ``04 DC`` in tag mode, so a good written again
rewrites its own record and is never stored twice.
``POST /v1/written`` (authentication server, ``RELAYED_WRITTEN``): the card's status word; 9000
-> ``written``; another one frees the write to be handed out again at once.
``POST /v1/pickups`` (``RELAYED_PICKUP``): the card's next contact, through the device that
bought the goods (a card's serial is public and anyone may register a device: another device
gets nothing). Goods of this card bought through this device that the card already holds
(``held``: issuer id and good id read from the card) are ``written``; then one good still to
write gets its write for this challenge: a ``pending`` one, or an ``issued`` one whose write
was not confirmed within ``issue_lease`` seconds. One claim is one compare-and-set: racing
pick-ups hand out one write.
Refunds: a good still ``pending`` (no write ever handed out) after its deadline is refunded to
the account (``refunding`` -> ``refunded``, through the payment server and the institution),
by the refund clock and at start. A good whose write was handed out is never refunded: it may
be on the card; its pick-up completes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ....card.keys import KeyEntry
from ....card.personalise import MasterKey, load_issuer
from ....card.toml_schema import Hex8, Section, check, read_document
from ....protocols import goods as G
from ...kit.config import ConfigError
from ...kit.db import reading, step
from ...kit.http import Refused
from ...terminal.goods_key import GoodsKeyService
from .. import db as D
from .. import wire as W
from .common import REPLY, Unreachable, handled, read_one
from .payment import DIGITAL_FIELDS
from .purse_fulfil import SFI_OF_KIND, PurseFulfil

__all__ = ["SFI_OF_KIND", "FulfilServer", "key_service", "write_goods_key"]
GOODS_FIELDS: dict[str, W.Checker] = {
    "order": W.ORDER, "card": W.SERIAL, "device": W.DEVICE, "challenge": W.CHALLENGE_OR_NONE,
    "digital_order": W.INNER, "merchant_signature": W.SIGNATURE_HEX,
    "confirmation": W.INNER, "confirmation_signature": W.SIGNATURE_HEX, "created": W.SECONDS}
WRITTEN_FIELDS: dict[str, W.Checker] = {"order": W.ORDER, "device": W.DEVICE,
                                        "card": W.SERIAL, "sw": W.SW, "created": W.SECONDS}
PICKUP_FIELDS: dict[str, W.Checker] = {"device": W.DEVICE, "card": W.SERIAL,
                                       "issuer": W.ISSUER, "challenge": W.CHALLENGE,
                                       "held": W.GOOD_KEYS, "created": W.SECONDS}


class GoodsKeyFile(Section):
    """``goods-key.toml`` (``svcard goods init`` writes it): the goods key and what its
    diversification needs, nothing else. An issuer file is taken too: only these fields of it
    are read; its purse and TAC master keys are dropped unchecked, never kept."""

    issuer_id: Hex8
    diversify_by_issuer: bool = False
    goods_key: MasterKey


def key_service(path: Path | None) -> GoodsKeyService:
    """The fulfilment server's goods key service from the file at ``path`` (a goods key file
    or an issuer file with ``[goods_key]``); ValueError naming the file and field."""
    if path is None:
        raise ValueError("the fulfilment server needs the goods key file (goods_key = ...)")
    try:
        document = read_document(path, ConfigError)
        if document.get("goods_key") is None:
            raise ConfigError(f"{path}: goods_key: missing (the fulfilment server's key)")
        fields = ("issuer_id", "diversify_by_issuer", "goods_key")
        kept: dict[str, Any] = {k: document[k] for k in fields if k in document}
        del document   # the issuer file's other keys: never kept
        f = check(GoodsKeyFile, kept, path, ConfigError)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    k = f.goods_key
    entry = KeyEntry(k.index, k.version, k.algorithm, k.master_key)
    return GoodsKeyService(entry, f.issuer_id if f.diversify_by_issuer else None)


def write_goods_key(path: Path, issuer_path: Path) -> Path:
    """The goods key file at ``path`` (mode 0600) from the issuer file at ``issuer_path``:
    its id, diversification and ``[goods_key]`` only."""
    issuer = load_issuer(issuer_path)
    if issuer.goods is None:
        raise ValueError(f"{issuer_path}: goods_key: missing")
    g = issuer.goods
    text = ("# the goods key only, for the fulfilment server (a TEST KEY when written by "
            f'svcard goods init)\nissuer_id = "{issuer.issuer_id.hex().upper()}"\n'
            f"diversify_by_issuer = {'true' if issuer.two_level else 'false'}\n\n"
            f"[goods_key]\nindex = {g.index}\nversion = {g.version}\n"
            f'algorithm = {g.algorithm}\nmaster_key = "{g.key.hex().upper()}"\n')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, 0o600)   # a file there before keeps its mode through O_CREAT
    return path


class FulfilServer(PurseFulfil):
    role = "fulfil"
    health_table = D.goods

    def __init__(self, *args: Any, keys: GoodsKeyService | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keys = keys or key_service(self.config.goods_issuer)

    # --- a paid good --------------------------------------------------------------------------
    async def goods(self, request: Request) -> Response:
        async def work() -> Response:
            _, data, _ = await self.authenticated(request, GOODS_FIELDS, "paid good", W.PAID,
                                                  ("payment",))
            order = self._checked_order(data)
            await self.sql(self._keep, data, order)
            if not data["challenge"]:   # told again after a stop: kept, nothing to write now
                found = await self.sql(read_one, self.engine, D.goods, order_ref=data["order"])
                return self.reply(W.PAID, {"order": data["order"], "card": data["card"],
                                           "apdu": None, "state": found and found["state"]})
            return self.reply(W.PAID, await self.sql(self._claim, data["order"], data["card"],
                                                     data["challenge"], data["device"]))
        return await handled(work)

    def _checked_order(self, data: dict[str, Any]) -> dict[str, Any]:
        inner = data["digital_order"].encode()
        if not W.verify(self.system.peer("merchant").public_key, W.DIGITAL_ORDER, inner,
                        data["merchant_signature"]):
            raise Refused(401, 401, "paid good: the merchant's signature does not verify")
        order = W.parse(inner, DIGITAL_FIELDS, "digital order")
        confirmation = data["confirmation"].encode()
        if not W.verify(self.system.peer("bank").public_key, REPLY + W.PAYMENT, confirmation,
                        data["confirmation_signature"]):
            raise Refused(401, 401, "paid good: the institution's confirmation does not "
                                    "verify")
        paid = W.canonical_load(confirmation)
        if (paid.get("paid") is not True or paid.get("order") != data["order"]
                or order["order"] != data["order"] or paid.get("amount") != order["amount"]
                or paid.get("card") != data["card"] or order["device"] != data["device"]):
            raise Refused(409, 409, "paid good: the confirmation is not of this order, card "
                                    "and amount")
        record = bytes.fromhex(order["record"])
        try:
            G.check(record)
        except G.GoodsRecordError as exc:
            raise Refused(400, 400, f"paid good: {exc}") from None
        if record[2:10] != self.system.merchant_issuer or G.KIND_OF_TAG[record[0]] != \
                order["kind"]:
            raise Refused(409, 409, "paid good: not a good of this merchant")
        return order

    def _keep(self, data: dict[str, Any], order: dict[str, Any]) -> None:
        now = self.now_ms()
        try:
            with step(self.engine) as conn:
                conn.execute(insert(D.goods).values(
                    order_ref=data["order"], state=D.PENDING, card=data["card"],
                    device=data["device"], merchant=order["merchant"], record=order["record"],
                    sfi=SFI_OF_KIND[order["kind"]],
                    deadline=now + self.system.pickup_seconds * 1000, issued_at=None,
                    writes=0, amount=order["amount"], currency_code=order["currency"],
                    created=now, updated=now))
        except IntegrityError:   # kept already (a retried authorisation)
            pass

    def _claim(self, order: str | None, card: str, challenge: str,
               device: str) -> dict[str, Any]:
        """One step: hand out the write of ``order`` (None: the first good of ``card`` still to
        write) for ``challenge`` to ``device``, if no other write of it is outstanding."""
        g = D.goods
        now = self.now_ms()
        stale = now - self.system.issue_lease * 1000
        claimable = ((g.c.state == D.PENDING) |
                     ((g.c.state == D.ISSUED) &
                      (g.c.issued_at.is_(None) | (g.c.issued_at < stale))))
        where = [g.c.card == card, claimable]
        if order is not None:
            where.append(g.c.order_ref == order)
        else:   # a pick-up: only goods bought through this device (a card's serial is public
            where.append(g.c.device == device)   # and anyone may register a device)
        with step(self.engine) as conn:
            row = conn.execute(select(g).where(*where).order_by(g.c.id).limit(1)).first()
            if row is not None:
                done = conn.execute(update(g).where(g.c.id == row.id, claimable).values(
                    state=D.ISSUED, issued_at=now, issued_to=device, writes=g.c.writes + 1,
                    updated=now))
                if int(done.rowcount or 0) != 1:
                    row = None
        if row is None:
            state = None
            if order is not None:
                found = read_one(self.engine, D.goods, order_ref=order)
                state = found["state"] if found else None
            return {"order": order, "card": card, "apdu": None, "state": state}
        apdu = self.keys.update_record(bytes.fromhex(card), bytes.fromhex(challenge), row.sfi,
                                       bytes.fromhex(row.record))
        return {"order": row.order_ref, "card": card, "apdu": apdu.hex().upper(),
                "state": D.ISSUED}

    # --- written, pick-ups ----------------------------------------------------------------------
    async def written(self, request: Request) -> Response:
        async def work() -> Response:
            _, data, _ = await self.authenticated(request, WRITTEN_FIELDS, "written",
                                                  W.RELAYED_WRITTEN, ("auth",))
            state = await self.sql(self._written, data["order"], data["card"], data["sw"],
                                   data["device"])
            if state is None:
                raise Refused(404, 404, "written: no write of this good for this card and "
                                        "device")
            return self.reply(W.RELAYED_WRITTEN, {"order": data["order"], "state": state})
        return await handled(work)

    def _written(self, order: str, card: str, sw: int, device: str) -> str | None:
        """The card's answer to the write handed out to ``device`` (another device's word on
        it is not taken: None)."""
        g = D.goods
        with step(self.engine) as conn:
            row = conn.execute(select(g).where(g.c.order_ref == order, g.c.card == card)
                               ).first()
            if row is None:   # a purse good written again at a pick-up, or nothing
                return self.purse_written_again(order, card, device)
            if row.state == D.ISSUED and row.issued_to != device:
                return None
            if row.state == D.ISSUED:
                values = {"state": D.WRITTEN} if sw == 0x9000 else {"issued_at": None}
                conn.execute(update(g).where(g.c.id == row.id, g.c.state == D.ISSUED)
                             .values(updated=self.now_ms(), **values))
                return str(values.get("state", D.ISSUED))
            return str(row.state)

    async def pickups(self, request: Request) -> Response:
        async def work() -> Response:
            _, data, _ = await self.authenticated(request, PICKUP_FIELDS, "pick-up",
                                                  W.RELAYED_PICKUP, ("auth",),
                                                  W.PICKUP_MESSAGE)
            keys = W.held_keys(data["held"])
            held = await self.sql(self._held, data["card"], data["device"], keys)
            claim = await self.sql(self._claim, None, data["card"], data["challenge"],
                                   data["device"])
            if claim["apdu"] is None:   # a purse good paid but not on the card
                again: dict[str, Any] | None = await self.sql(
                    self.purse_redelivery, data["card"], data["device"], data["challenge"],
                    keys)
                claim = again or claim
            return self.reply(W.RELAYED_PICKUP, {**claim, "held": held})
        return await handled(work)

    def _held(self, card: str, device: str, held: set[str]) -> int:
        """Goods of ``card`` bought through ``device`` that the card holds: ``written``."""
        g = D.goods
        done = 0
        with step(self.engine) as conn:
            rows = conn.execute(select(g).where(g.c.card == card, g.c.device == device,
                                                g.c.state.in_((D.PENDING, D.ISSUED)))).all()
            for row in rows:
                if row.record[4:36] in held:
                    done += int(conn.execute(update(g).where(
                        g.c.id == row.id, g.c.state == row.state).values(
                        state=D.WRITTEN, updated=self.now_ms())).rowcount or 0)
        return done

    # --- refunds --------------------------------------------------------------------------------
    async def refund_due(self, at_ms: int | None = None,
                         http: httpx.AsyncClient | None = None) -> int:
        """Refund every good still ``pending`` past its deadline at ``at_ms`` (default: now),
        and finish ``refunding`` ones; how many were refunded now. ``http``: a client of the
        calling event loop (default: one of its own)."""
        if http is None:
            async with httpx.AsyncClient(timeout=30, transport=self.transport) as own:
                return await self.refund_due(at_ms, own)
        g = D.goods
        now = self.now_ms() if at_ms is None else at_ms
        with reading(self.engine) as conn:
            rows = conn.execute(select(g.c.order_ref, g.c.amount, g.c.state).where(
                ((g.c.state == D.PENDING) & (g.c.deadline < now)) |
                (g.c.state == D.REFUNDING)).limit(1000)).all()
        refunded = 0
        for order, amount, state in rows:
            if state == D.PENDING and not await self.sql(self._set, order, D.PENDING,
                                                         D.REFUNDING):
                continue   # a pick-up claimed it first
            try:
                answer = await self.send("payment", "/v1/refunds", W.REFUND, {
                    "order": order, "amount": amount, "created": self.now_ms() // 1000}, http)
            except Unreachable:
                continue   # the next tick asks again
            if answer.get("order") == order and answer.get("refunded") is True:
                refunded += int(await self.sql(self._set, order, D.REFUNDING, D.REFUNDED))
        return refunded

    def _set(self, order: str, expect: str, state: str) -> bool:
        g = D.goods
        with step(self.engine) as conn:
            done = conn.execute(update(g).where(g.c.order_ref == order, g.c.state == expect)
                                .values(state=state, updated=self.now_ms()))
        return int(done.rowcount or 0) == 1

    async def tick(self, http: httpx.AsyncClient) -> None:
        await self.sql(self.purse_expire)
        await self.refund_due(http=http)

    def routes(self) -> list[Route]:
        return [Route("/v1/goods", self.goods, methods=["POST"]),
                Route("/v1/written", self.written, methods=["POST"]),
                Route("/v1/pickups", self.pickups, methods=["POST"]),
                Route("/v1/purse/goods", self.purse_goods, methods=["POST"]),
                Route("/v1/purse/paid", self.purse_paid, methods=["POST"])]
