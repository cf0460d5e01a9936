"""The authentication server of seed 000: it knows the devices, formats each routed digital
order into a *first message* for the order's device, and relays what the device sends back.

Devices. ``POST /v1/devices`` (``REGISTRATION``, signed by the device's own key; the signer
is the device id, which must be :func:`..wire.device_id` of the key): a device is its key. Every
later device message is signed by that key.

``POST /v1/orders`` (payment server, ``ROUTED_ORDER``): the merchant's digital order with the
merchant's signature (checked too). If its device is registered the first message (order,
merchant, item, amount, the goods record, the institution's sealing key) is signed
(``FIRST_MESSAGE``) and kept ``offered``; the device's waiting poll wakes.
``POST /v1/poll`` (device, ``POLL``): the device's ``offered`` first messages, waiting up to
``wait`` seconds (at most ``GoodsSystem.poll_wait``) for one to come.
``POST /v1/authorisations`` (device, ``AUTHORISATION``): only the order's own device, naming
the digest of the first message it was shown. ``offered`` -> ``authorised`` in one step, then
relayed (``RELAYED_AUTH``) to the payment server; the answer (paid with the write of the good
for the device's challenge, or declined) is signed for the device. A repeat of the same
authorisation (same order, card and decision; a new challenge, the PIN sealed afresh) relays
again; another is refused (409). A copy of one (the same sealed PIN) while it is in flight or
after a refusal is refused (409): the sealed PINs seen are in the database (``auth_seals``), so
a restart forgets none.
``POST /v1/written`` and ``POST /v1/pickups`` (device): relayed to the fulfilment server
(``RELAYED_WRITTEN``, ``RELAYED_PICKUP``) with the device's id, which only this server vouches
for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import defaultdict
from typing import Any

from sqlalchemy import delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...kit.db import reading, step
from ...kit.http import Refused, read_body, shutting_down
from ...kit.request_log import note
from .. import db as D
from .. import wire as W
from .common import PartyServer, handled, read_one, take_quota
from .payment import DIGITAL_FIELDS

ROUTED_FIELDS: dict[str, W.Checker] = {"digital_order": W.INNER,
                                       "merchant_signature": W.SIGNATURE_HEX,
                                       "terminal": W.TERMINAL_OR_NONE, "created": W.SECONDS}
REGISTRATION_FIELDS: dict[str, W.Checker] = {"public_key": W.KEY, "label": W.text(64),
                                             "created": W.SECONDS}
POLL_FIELDS: dict[str, W.Checker] = {"device": W.DEVICE, "wait": W.integer(0, 60),
                                     "created": W.SECONDS}
AUTH_FIELDS: dict[str, W.Checker] = {
    "order": W.ORDER, "device": W.DEVICE, "approve": W.BOOL, "card": W.SERIAL,
    "issuer": W.ISSUER, "first": W.KEY, "pin": W.SEALED, "challenge": W.CHALLENGE,
    "created": W.SECONDS}
WRITTEN_FIELDS: dict[str, W.Checker] = {"order": W.ORDER, "device": W.DEVICE,
                                        "card": W.SERIAL, "sw": W.SW, "created": W.SECONDS}
PICKUP_FIELDS: dict[str, W.Checker] = {"device": W.DEVICE, "card": W.SERIAL,
                                       "issuer": W.ISSUER, "challenge": W.CHALLENGE,
                                       "held": W.GOOD_KEYS, "created": W.SECONDS}
PURSE_DEBIT_FIELDS: dict[str, W.Checker] = {
    "order": W.ORDER, "device": W.DEVICE, "card": W.SERIAL, "issuer": W.ISSUER,
    "first": W.KEY, "init": W.INIT_ANSWER, "uid": W.UID, "created": W.SECONDS}
PURSE_PROOF_FIELDS: dict[str, W.Checker] = {
    "device": W.DEVICE, "card": W.SERIAL, "counter": W.COUNTER, "mac2": W.MAC, "tac": W.MAC,
    "created": W.SECONDS}
MAX_OFFERED = 16   # first messages one poll answers
MAX_POLLS = 4      # polls of one device waiting at once
SEAL_MS = (W.MAX_SKEW + 60) * 1000   # a sealed PIN is remembered this long (copies older
                                      # than MAX_SKEW s are refused by their ``created``)
PRUNE_MS = 60_000                     # expired seals are deleted at most this often


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# an order put back to ``offered`` by a wrong PIN: the bank was asked, so never the purse's
BANK_ASKED = digest("bank asked")


class AuthServer(PartyServer):
    role = "auth"
    health_table = D.devices

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self.pruned = 0   # ms of the last deletion of expired seals

    # --- devices ------------------------------------------------------------------------------
    async def device_message(self, request: Request, fields: dict[str, W.Checker], what: str,
                             domain: bytes, limit: int = W.MAX_MESSAGE) -> dict[str, Any]:
        """A message signed by a registered device, which must name itself in ``device``."""
        if self.draining:
            raise shutting_down()
        body = await read_body(request, limit)
        data = W.parse(body, fields, what, limit)
        device = request.headers.get(W.SIGNER, "")
        note(party=device[:32])
        if device != data["device"]:
            raise Refused(401, 401, f"{what}: signed by another device than it names")
        row = await self.sql(read_one, self.engine, D.devices, device=device)
        if row is None:
            raise Refused(403, 403, f"{what}: no such device")
        if not W.verify(bytes.fromhex(row["public_key"]), domain, body,
                        request.headers.get(W.SIGNATURE)):
            raise Refused(401, 401, f"{what}: the signature does not verify")
        self.check_fresh(data, what)
        return data

    async def register(self, request: Request) -> Response:
        async def work() -> Response:
            body = await read_body(request, W.MAX_MESSAGE)
            data = W.parse(body, REGISTRATION_FIELDS, "registration")
            public = bytes.fromhex(data["public_key"])
            device = W.device_id(public)
            if request.headers.get(W.SIGNER) != device or not W.verify(
                    public, W.REGISTRATION, body, request.headers.get(W.SIGNATURE)):
                raise Refused(401, 401, "registration: not signed by the key it registers")
            self.check_fresh(data, "registration")
            address = request.client.host if request.client else "?"
            await self.sql(self._register, device, data["public_key"], data["label"], address)
            return self.reply(W.REGISTRATION, {"device": device, "registered": True})
        return await handled(work)

    def _register(self, device: str, public: str, label: str, address: str = "?") -> None:
        """One step: a new device counted against its address's quota, then kept."""
        now = self.now_ms()
        try:
            with step(self.engine) as conn:
                known = conn.execute(select(D.devices.c.device).where(
                    D.devices.c.device == device)).first()
                if known is not None:   # registered already: the same key (its id says so)
                    return
                if not take_quota(conn, D.auth_quotas, address,
                                  self.system.registrations_per_address, now):
                    raise Refused(429, 429, "at most "
                                  f"{self.system.registrations_per_address} new devices from "
                                  "one address a minute; retry later", {"Retry-After": "60"})
                conn.execute(insert(D.devices).values(device=device, public_key=public,
                                                      label=label, created=now, updated=now))
        except IntegrityError:   # a racing registration of the same key
            pass

    # --- the first message --------------------------------------------------------------------
    async def orders(self, request: Request) -> Response:
        async def work() -> Response:
            _, data, _ = await self.authenticated(request, ROUTED_FIELDS, "routed order",
                                                  W.ROUTED_ORDER, ("payment",))
            inner = data["digital_order"].encode()
            merchant = self.system.peer("merchant")
            if not W.verify(merchant.public_key, W.DIGITAL_ORDER, inner,
                            data["merchant_signature"]):
                raise Refused(401, 401, "routed order: the merchant's signature does not verify")
            order = W.parse(inner, DIGITAL_FIELDS, "digital order")
            known = await self.sql(read_one, self.engine, D.devices, device=order["device"])
            if known is None:
                return self.reply(W.ROUTED_ORDER, {"order": order["order"], "offered": False,
                                                   "reason": "no such device"})
            first = {"order": order["order"], "merchant": order["merchant"],
                     "name": order["name"], "kind": order["kind"], "amount": order["amount"],
                     "currency": order["currency"], "device": order["device"],
                     "record": order["record"], "seal_key": self.system.seal_key.hex(),
                     "terminal": data["terminal"], "auth": self.me,
                     "created": self.now_ms() // 1000}
            text = W.canonical(first).decode()
            signature = W.sign(self.config.private_key, W.FIRST_MESSAGE, text.encode())
            fresh = await self.sql(self._offer, order["order"], order["device"], text,
                                   signature)
            if fresh:
                for event in self.waiters.get(order["device"], ()):
                    event.set()
            return self.reply(W.ROUTED_ORDER, {"order": order["order"], "offered": fresh,
                                               "reason": "" if fresh else "offered already"})
        return await handled(work)

    def _offer(self, order: str, device: str, text: str, signature: str) -> bool:
        now = self.now_ms()
        try:
            with step(self.engine) as conn:
                conn.execute(insert(D.auth_orders).values(
                    order_ref=order, state=D.OFFERED, device=device, first_message=text,
                    first_signature=signature, created=now, updated=now))
        except IntegrityError:
            return False
        return True

    def _offered(self, device: str) -> list[dict[str, str]]:
        """The device's offered first messages younger than ``offer_seconds`` (older ones
        expire at the payment server), newest first: unanswered old ones never hide a new."""
        t = D.auth_orders
        since = self.now_ms() - self.system.offer_seconds * 1000
        with reading(self.engine) as conn:
            rows = conn.execute(select(t.c.first_message, t.c.first_signature).where(
                t.c.device == device, t.c.state == D.OFFERED, t.c.created > since)
                .order_by(t.c.id.desc()).limit(MAX_OFFERED)).all()
        return [{"message": r.first_message, "signature": r.first_signature} for r in rows]

    async def poll(self, request: Request) -> Response:
        async def work() -> Response:
            data = await self.device_message(request, POLL_FIELDS, "poll", W.POLL)
            device = data["device"]
            if len(self.waiters.get(device, ())) >= MAX_POLLS:
                raise Refused(429, 429, f"poll: at most {MAX_POLLS} polls of one device wait "
                                        "at once")
            event = asyncio.Event()
            self.waiters[device].add(event)
            try:
                offered = await self.sql(self._offered, device)
                if not offered and data["wait"]:
                    wait = min(float(data["wait"]), self.system.poll_wait)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(event.wait(), wait)
                    offered = await self.sql(self._offered, device)
            finally:
                self.waiters[device].discard(event)
                if not self.waiters[device]:
                    del self.waiters[device]
            return JSONResponse({"device": device, "messages": offered})
        return await handled(work)

    # --- the authorisation --------------------------------------------------------------------
    async def authorisations(self, request: Request) -> Response:
        async def work() -> Response:
            data = await self.device_message(request, AUTH_FIELDS, "authorisation",
                                             W.AUTHORISATION)
            order = await self.sql(read_one, self.engine, D.auth_orders, order_ref=data["order"])
            if order is None or order["device"] != data["device"]:
                raise Refused(404, 404, "authorisation: no such order for this device")
            if data["first"] != digest(order["first_message"]):
                raise Refused(409, 409, "authorisation: not the first message this server "
                                        "sent")
            # the card and the decision: a retry (a new challenge, the PIN sealed afresh) is
            # the same authorisation; another card or decision for the order is not
            mine = digest(f"{data['card']}|{data['approve']}")
            seal = digest(data["pin"])
            if not await self.sql(self._take_seal, data["order"], seal):
                raise Refused(409, 409, "authorisation: a copy of one in flight or refused")
            if order["state"] == D.OFFERED:
                if not await self.sql(self._set, data["order"], D.OFFERED, D.AUTHORISED,
                                      authorisation=mine):
                    order = await self.sql(read_one, self.engine, D.auth_orders,
                                           order_ref=data["order"])
                    assert order is not None
                else:
                    order = {**order, "state": D.AUTHORISED, "authorisation": mine}
            if order["authorisation"] != mine:
                raise Refused(409, 409, "authorisation: this order was authorised otherwise")
            if order["state"] == D.DECLINED:
                return self.reply(W.AUTHORISATION, {"order": data["order"], "paid": False,
                                                    "reason": "declined"})
            decision = await self.send("payment", "/v1/authorisations", W.RELAYED_AUTH, {
                k: data[k] for k in ("order", "device", "approve", "card", "issuer", "pin",
                                     "challenge")} | {"created": self.now_ms() // 1000})
            if decision.get("order") != data["order"]:
                raise Refused(502, 502, "authorisation: the payment server answered about "
                                        "another order")
            if decision.get("paid") is True:   # from offered too: a racing wrong PIN's
                await self.sql(self._seal_paid, data["order"], seal)   # copies: answered
                for before in (D.AUTHORISED, D.OFFERED):   # answer may have reset it
                    if await self.sql(self._set, data["order"], before, D.PAID):
                        break
            elif decision.get("retry") is True:   # a wrong PIN: the device may try again,
                await self.sql(self._set, data["order"], D.AUTHORISED, D.OFFERED,   # by the
                               authorisation=BANK_ASKED)   # bank only: another PIN's payment
                # of it may be under way at the institution, its answer not yet back
            else:
                await self.sql(self._set, data["order"], D.AUTHORISED, D.DECLINED)
            return self.reply(W.AUTHORISATION, {
                "order": data["order"], "paid": decision.get("paid") is True,
                "apdu": decision.get("apdu"), "reason": str(decision.get("reason", ""))})
        return await handled(work)

    def _take_seal(self, order: str, seal: str) -> bool:
        """Check and record the sealed PIN ``seal`` (its digest) for ``order`` in one step:
        False if a copy of an authorisation still in flight or refused (remembered for
        SEAL_MS); True if new, expired or paid (a copy of a paid one is answered again)."""
        s, now = D.auth_seals, self.now_ms()
        if now - self.pruned > PRUNE_MS:
            self.pruned = now
            with step(self.engine) as conn:
                conn.execute(delete(s).where(s.c.expires < now))
        with step(self.engine) as conn:
            again = conn.execute(update(s).where(
                s.c.order_ref == order, s.c.seal == seal,
                or_(s.c.paid.is_(True), s.c.expires <= now)).values(expires=now + SEAL_MS))
            if int(again.rowcount or 0) == 1:
                return True
            try:
                with conn.begin_nested():
                    conn.execute(insert(s).values(order_ref=order, seal=seal, paid=False,
                                                  expires=now + SEAL_MS))
            except IntegrityError:   # seen, not paid, not expired (or a racing copy's)
                return False
            return True

    def _seal_paid(self, order: str, seal: str) -> None:
        s = D.auth_seals
        with step(self.engine) as conn:
            conn.execute(update(s).where(s.c.order_ref == order, s.c.seal == seal)
                         .values(paid=True, expires=self.now_ms() + SEAL_MS))

    def _set_new(self, order: str, state: str, authorisation: str) -> bool:
        """``offered`` -> ``state`` for an order no authorisation was ever sent for."""
        t = D.auth_orders
        with step(self.engine) as conn:
            done = conn.execute(update(t).where(
                t.c.order_ref == order, t.c.state == D.OFFERED, t.c.authorisation.is_(None))
                .values(state=state, authorisation=authorisation, updated=self.now_ms()))
        return int(done.rowcount or 0) == 1

    def _set(self, order: str, expect: str, state: str, **values: Any) -> bool:
        t = D.auth_orders
        with step(self.engine) as conn:
            done = conn.execute(update(t).where(t.c.order_ref == order, t.c.state == expect)
                                .values(state=state, updated=self.now_ms(), **values))
        return int(done.rowcount or 0) == 1

    # --- writes and pick-ups ------------------------------------------------------------------
    async def written(self, request: Request) -> Response:
        async def work() -> Response:
            data = await self.device_message(request, WRITTEN_FIELDS, "written", W.WRITTEN)
            decision = await self.send("fulfil", "/v1/written", W.RELAYED_WRITTEN,
                                       {**data, "created": self.now_ms() // 1000})
            return self.reply(W.WRITTEN, decision)
        return await handled(work)

    async def pickups(self, request: Request) -> Response:
        async def work() -> Response:
            data = await self.device_message(request, PICKUP_FIELDS, "pick-up", W.PICKUP,
                                             W.PICKUP_MESSAGE)
            decision = await self.send("fulfil", "/v1/pickups", W.RELAYED_PICKUP,
                                       {**data, "created": self.now_ms() // 1000})
            return self.reply(W.PICKUP, decision)
        return await handled(work)

    # --- the purse pays ---------------------------------------------------------------------
    async def purse_debits(self, request: Request) -> Response:
        """The card's INITIALIZE FOR CAPP answer for an order, from the order's own device
        naming the first message it was shown: relayed; the order is the purse's from now
        (``authorised`` with the purse's mark, so the bank's way is closed, and back)."""
        async def work() -> Response:
            data = await self.device_message(request, PURSE_DEBIT_FIELDS, "purse debit",
                                             W.PURSE_DEBIT)
            order = await self.sql(read_one, self.engine, D.auth_orders, order_ref=data["order"])
            if order is None or order["device"] != data["device"]:
                raise Refused(404, 404, "purse debit: no such order for this device")
            if data["first"] != digest(order["first_message"]):
                raise Refused(409, 409, "purse debit: not the first message this server sent")
            mine = digest(f"purse|{data['card']}")
            if order["state"] == D.OFFERED:   # never one the bank was asked for
                await self.sql(self._set_new, data["order"], D.AUTHORISED, mine)
                order = await self.sql(read_one, self.engine, D.auth_orders,
                                       order_ref=data["order"])
                assert order is not None
            if order["state"] in (D.PAID, D.DECLINED):
                raise Refused(409, 409, f"purse debit: the order is {order['state']}")
            if order["authorisation"] != mine or order["state"] != D.AUTHORISED:
                raise Refused(409, 409, "purse debit: this order was authorised otherwise")
            decision = await self.send("payment", "/v1/purse/debits", W.RELAYED_PURSE_DEBIT, {
                k: data[k] for k in ("order", "device", "card", "issuer", "init", "uid")}
                | {"created": self.now_ms() // 1000})
            if decision.get("order") != data["order"]:
                raise Refused(502, 502, "purse debit: the payment server answered about "
                                        "another order")
            return self.reply(W.PURSE_DEBIT, decision)
        return await handled(work)

    async def purse_proofs(self, request: Request) -> Response:
        async def work() -> Response:
            data = await self.device_message(request, PURSE_PROOF_FIELDS, "purse proof",
                                             W.PURSE_PROOF)
            decision = await self.send("payment", "/v1/purse/proofs", W.RELAYED_PURSE_PROOF,
                                       {**data, "created": self.now_ms() // 1000})
            order = decision.get("order")
            if decision.get("paid") is True and isinstance(order, str):
                await self.sql(self._set, order, D.AUTHORISED, D.PAID)
            return self.reply(W.PURSE_PROOF, decision)
        return await handled(work)

    def routes(self) -> list[Route]:
        return [Route("/v1/devices", self.register, methods=["POST"]),
                Route("/v1/purse/debits", self.purse_debits, methods=["POST"]),
                Route("/v1/purse/proofs", self.purse_proofs, methods=["POST"]),
                Route("/v1/orders", self.orders, methods=["POST"]),
                Route("/v1/poll", self.poll, methods=["POST"]),
                Route("/v1/authorisations", self.authorisations, methods=["POST"]),
                Route("/v1/written", self.written, methods=["POST"]),
                Route("/v1/pickups", self.pickups, methods=["POST"])]
