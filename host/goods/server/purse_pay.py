"""The payment server's half of a good the purse pays (docs/goods.md, "The purse pays"): one
composite purchase (PBOC type 09) on the card, the good's record and the debit committed by
the card together or not at all; the device only relays.

``POST /v1/purse/debits`` (authentication server, ``RELAYED_PURSE_DEBIT``): the card's answer
to INITIALIZE FOR CAPP PURCHASE for the order's amount at this server's terminal id. In one
database step the card session (card, counter, random) is recorded for the order (unique: a
session serves one order once, also under another serial with the same rightmost 8 bytes,
which the card's keys cannot tell apart) and the order goes ``routed`` -> ``debiting``; every
session of an order has the order's first counter (a card whose counter moved since may have
committed an earlier session: that one is settled by its proof, never paid twice). A PSAM
then makes MAC1 and the MAC2 the card must answer (kept here, never sent); the fulfilment
server MACs the record for that very session (``PURSE_GOOD``). The answer: UPDATE CAPP DATA
CACHE ``84 DE`` and DEBIT FOR CAPP PURCHASE ``80 54 01 00``.
``POST /v1/purse/proofs`` (``RELAYED_PURSE_PROOF``): the card's MAC2 and TAC for (card,
counter), from the DEBIT's answer or from GET TRANSACTION PROVE at the card's next contact.
Only a MAC2 equal to the one a PSAM expected for a session of that card and counter pays its
order (one step: session ``committed``, order ``purse_paid``, from ``debiting`` or
``expired``); the fulfilment server is told (``PURSE_PAID``), then the merchant.
An order still ``debiting`` past its pick-up deadline is ``expired``: nothing was taken from
the purse (the card commits the debit only with the good), so nothing is refunded.
"""

from __future__ import annotations

import datetime as dt
import hmac
from typing import Any

import httpx
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import Response

from ....protocols import purse as P
from ...kit.db import reading, step
from ...kit.http import Refused
from ...kit.reader_pool import PoolExhausted
from ...terminal import apdus
from ...terminal.purse import Declined
from .. import db as D
from .. import wire as W
from .common import PartyServer, Unreachable, handled, read_one
from .psams import GoodsPsamPool, init_sam

DEBIT_FIELDS: dict[str, W.Checker] = {
    "order": W.ORDER, "device": W.DEVICE, "card": W.SERIAL, "issuer": W.ISSUER,
    "init": W.INIT_ANSWER, "uid": W.UID, "created": W.SECONDS}
PROOF_FIELDS: dict[str, W.Checker] = {
    "device": W.DEVICE, "card": W.SERIAL, "counter": W.COUNTER, "mac2": W.MAC, "tac": W.MAC,
    "created": W.SECONDS}
PSAM_WAIT = 5.0   # s a purchase waits for a free PSAM (then 503)
MAX_SESSIONS = 8  # composite purchases opened for one order (each is a PSAM record)
MAX_WRONG_PROOFS = 8   # wrong MAC2s an open session takes from its buyer's device (and others')


class PursePayment(PartyServer):
    """Mixed into the payment server: its purse routes, recovery and expiry."""

    pool: GoodsPsamPool | None

    async def _tell_merchant(self, order: str, state: str, reason: str,
                             http: httpx.AsyncClient | None = None) -> None:
        raise NotImplementedError

    def _set(self, order: str, expect: str, state: str, **values: Any) -> bool:
        raise NotImplementedError

    @property
    def terminal(self) -> str:
        """The terminal id the card's INITIALIZE must name ("" without PSAMs)."""
        return self.pool.terminal_id.hex().upper() if self.pool is not None else ""

    # --- a composite purchase opened on the card ----------------------------------------------
    async def purse_debits(self, request: Request) -> Response:
        async def work() -> Response:
            _, data, _ = await self.authenticated(request, DEBIT_FIELDS, "purse debit",
                                                  W.RELAYED_PURSE_DEBIT, ("auth",))
            return self.reply(W.RELAYED_PURSE_DEBIT, await self._purse_debit(data))
        return await handled(work)

    async def _purse_debit(self, data: dict[str, Any]) -> dict[str, Any]:
        if self.pool is None:
            raise Refused(409, 409, "purse debit: this payment server takes no purse payments")
        order = data["order"]
        init = P.InitForPurchaseAnswer.parse(bytes.fromhex(data["init"]))
        row = await self.sql(read_one, self.engine, D.payment_orders, order_ref=order)
        if row is None:
            raise Refused(404, 404, "purse debit: no such order")
        if row["device"] != data["device"]:
            raise Refused(403, 403, "purse debit: not the order's device")
        if init.balance < row["amount"]:
            raise Refused(409, 409, "purse debit: the purse's balance is below the amount")
        session = await self.sql(self._open_session, order, data["card"],
                                 init.offline_counter, init.random.hex().upper(), row["device"])
        try:
            sam = await self._sam(data, init, row["amount"])
        except BaseException:
            await self.sql(self._end_session, session, D.FAILED)
            raise
        psam, answer = sam
        await self.sql(self._issued, session, psam, answer.ttn, answer.expected_mac2.hex())
        try:
            good = await self.send("fulfil", "/v1/purse/goods", W.PURSE_GOOD, {
                "order": order, "card": data["card"], "device": data["device"],
                "counter": init.offline_counter, "random": init.random.hex().upper(),
                "digital_order": row["digital_order"],
                "merchant_signature": row["merchant_signature"],
                "created": self.now_ms() // 1000})
        except Unreachable:   # no record for this session: its DEBIT is never sent
            await self.sql(self._end_session, session, D.FAILED)
            raise
        cache = good.get("apdu")
        if good.get("order") != order or not (isinstance(cache, str) and W.APDU(cache)):
            await self.sql(self._end_session, session, D.FAILED)
            raise Unreachable("fulfil: no record for this order's session")
        debit = apdus.debit_for_purchase(answer.ttn, answer.date, answer.time, answer.mac1)
        return {"order": order, "card": data["card"], "counter": init.offline_counter,
                "cache": cache, "debit": debit.hex().upper()}

    def _open_session(self, order: str, card: str, counter: int, random: str,
                      device: str) -> int:
        """One step: the session recorded for ``order`` (which goes ``debiting``), or a
        refusal that changed nothing. A device has at most ONE open session (a PSAM record
        opened on an INITIALIZE answer nobody checked yet): another is 429 until that one is
        proved, or abandoned ``purse_session_seconds`` after it opened; a new session at the
        same card and counter supersedes the device's open one (the card holds one session:
        a new INITIALIZE ended the old)."""
        t, s = D.payment_orders, D.purse_sessions
        now = self.now_ms()
        try:
            with step(self.engine) as conn:
                conn.execute(select(t.c.id).where(t.c.device == device)   # the device's
                             .order_by(t.c.id).with_for_update()).all()   # opens in turn
                row = conn.execute(select(t).where(t.c.order_ref == order)  # the order's
                                   .with_for_update()).first()   # sessions one at a time
                if row is None or row.state not in (D.ROUTED, D.DEBITING):
                    raise Refused(409, 409, "purse debit: the order is "
                                            f"{row.state if row else 'gone'}")
                if row.state == D.DEBITING and row.card != card:
                    raise Refused(409, 409, "purse debit: the order is being paid with "
                                            "another card")
                counters = [c for (c,) in conn.execute(
                    select(s.c.counter).where(s.c.order_ref == order)).all()]
                if len(counters) >= MAX_SESSIONS:
                    raise Refused(429, 429, f"purse debit: {MAX_SESSIONS} purchases were "
                                            "opened for this order already")
                if set(counters) - {counter}:
                    raise Refused(409, 409, "purse debit: the card's counter moved since this "
                                            "order's purchase began; the card's next contact "
                                            "settles that purchase first")
                if row.state == D.ROUTED:
                    done = conn.execute(update(t).where(t.c.id == row.id,
                                                        t.c.state == D.ROUTED).values(
                        state=D.DEBITING, card=card, updated=now))
                    if int(done.rowcount or 0) != 1:
                        raise Refused(409, 409, "purse debit: the order changed; retry")
                made = conn.execute(insert(s).values(
                    order_ref=order, card=card, counter=counter, random=random, state=D.OPEN,
                    told=False, created=now, updated=now))
                conn.execute(insert(D.purse_session_keys).values(   # the keys' view of it
                    factor=card[-16:], counter=counter, random=random, order_ref=order,
                    created=now))
                key = made.inserted_primary_key
                assert key is not None
                self._one_open_session(conn, device, int(key[0]), card, counter, now)
                return int(key[0])
        except IntegrityError:
            raise Refused(409, 409, "purse debit: this card session was used already") \
                from None

    def _one_open_session(self, conn: Any, device: str, session: int, card: str,
                          counter: int, now: int) -> None:
        """Inside the opening step, after ``session`` is inserted (so a reused session is
        the 409 above): the device's other open sessions at this card and counter superseded
        (``failed``; a late proof of one still pays, :meth:`_commit`); another open one
        younger than ``purse_session_seconds`` refuses this one (429, the step rolled back)."""
        t, s = D.payment_orders, D.purse_sessions
        mine = select(t.c.order_ref).where(t.c.device == device, t.c.state == D.DEBITING)
        conn.execute(update(s).where(
            s.c.state == D.OPEN, s.c.id != session, s.c.card == card, s.c.counter == counter,
            s.c.order_ref.in_(mine)).values(state=D.FAILED, updated=now))
        since = now - self.system.purse_session_seconds * 1000
        busy = conn.execute(select(s.c.id).where(
            s.c.state == D.OPEN, s.c.id != session, s.c.created > since,
            s.c.order_ref.in_(mine)).limit(1)).first()
        if busy is not None:
            wait = str(self.system.purse_session_seconds)
            raise Refused(429, 429, "purse debit: this device has a purchase open on a card; "
                                    "prove it first or retry later", {"Retry-After": wait})

    async def _sam(self, data: dict[str, Any], init: Any, amount: int) -> Any:
        assert self.pool is not None
        try:
            member = await self.pool.acquire(PSAM_WAIT)
        except PoolExhausted as exc:
            raise Refused(503, 503, f"purse debit: every PSAM is busy ({exc}); retry",
                          {"Retry-After": "1"}) from None
        try:
            answer = await self.pool.run(member, lambda reader: init_sam(
                reader, random=init.random, counter=init.offline_counter, amount=amount,
                key_version=init.key_version, algorithm=init.algorithm_id,
                serial=bytes.fromhex(data["card"]), uid=bytes.fromhex(data["uid"]),
                when=dt.datetime.fromtimestamp(self.clock())))
        except Declined as exc:
            raise Refused(409, 409, f"purse debit: the PSAM refused ({exc.sw:04X})") from None
        finally:
            self.pool.release(member)
        return member.serial, answer

    def _issued(self, session: int, psam: str, ttn: int, expected: str) -> None:
        s = D.purse_sessions
        with step(self.engine) as conn:
            conn.execute(update(s).where(s.c.id == session, s.c.state == D.OPEN).values(
                psam=psam, ttn=ttn, expected_mac2=expected.upper(), updated=self.now_ms()))

    def _end_session(self, session: int, state: str) -> None:
        s = D.purse_sessions
        with step(self.engine) as conn:
            conn.execute(update(s).where(s.c.id == session, s.c.state == D.OPEN).values(
                state=state, updated=self.now_ms()))

    # --- the card's proof -----------------------------------------------------------------------
    async def purse_proofs(self, request: Request) -> Response:
        async def work() -> Response:
            _, data, _ = await self.authenticated(request, PROOF_FIELDS, "purse proof",
                                                  W.RELAYED_PURSE_PROOF, ("auth",))
            found = await self.sql(self._commit, data["card"], data["counter"],
                                   data["mac2"], data["tac"], data["device"])
            if found is None:
                raise Refused(409, 409, "purse proof: no purchase of this card at this counter "
                                        "answered with that MAC2")
            order, fresh = found
            await self._tell_fulfil(order)
            if fresh:
                await self._tell_merchant(order, D.PURSE_PAID, "paid by the purse")
            return self.reply(W.RELAYED_PURSE_PROOF, {"order": order, "paid": True,
                                                      "tac": data["tac"]})
        return await handled(work)

    def _commit(self, card: str, counter: int, mac2: str, tac: str,
                device: str) -> tuple[str, bool] | None:
        """One step: the session of ``card`` at ``counter`` whose expected MAC2 is ``mac2``
        committed and its order paid; (order, whether this call paid it), or None. A MAC2 is
        4 bytes: each open session there takes :data:`MAX_WRONG_PROOFS` wrong ones from its
        order's device and as many from all others (``device`` is the prover), then no
        proof from them, so guesses cannot pay an order, nor a stranger lock its buyer out."""
        s, t, w = D.purse_sessions, D.payment_orders, D.purse_session_tries
        now = self.now_ms()
        with step(self.engine) as conn:
            rows = conn.execute(
                select(s, t.c.device, w.c.own, w.c.others)
                .join(t, t.c.order_ref == s.c.order_ref)
                .outerjoin(w, w.c.session == s.c.id)
                .where(s.c.card == card, s.c.counter == counter, s.c.expected_mac2.is_not(None))
                .with_for_update(of=s)).all()

            def open_to_guess(r: Any) -> bool:
                n = r.own if r.device == device else r.others
                return r.state == D.COMMITTED or (n or 0) < MAX_WRONG_PROOFS

            rows = [r for r in rows if open_to_guess(r)]
            match = next((r for r in rows if hmac.compare_digest(
                r.expected_mac2.encode(), mac2.upper().encode())), None)
            if match is None:
                for r in rows:
                    if r.state != D.COMMITTED:
                        self._wrong_try(conn, r.id, r.device == device)
                return None
            if match.state == D.COMMITTED:
                return (match.order_ref, False) if match.tac == tac.upper() else None
            conn.execute(update(s).where(s.c.id == match.id).values(
                state=D.COMMITTED, mac2=mac2.upper(), tac=tac.upper(), updated=now))
            done = conn.execute(update(t).where(
                t.c.order_ref == match.order_ref, t.c.state.in_((D.DEBITING, D.EXPIRED)))
                .values(state=D.PURSE_PAID, card=card, updated=now))
            return match.order_ref, int(done.rowcount or 0) == 1

    @staticmethod
    def _wrong_try(conn: Any, session: int, own: bool) -> None:
        """Inside the proof's step: one wrong MAC2 counted against ``session``."""
        w = D.purse_session_tries
        try:
            with conn.begin_nested():
                conn.execute(insert(w).values(session=session, own=0, others=0))
        except IntegrityError:   # there already
            pass
        column = w.c.own if own else w.c.others
        conn.execute(update(w).where(w.c.session == session).values({column: column + 1}))

    async def _tell_fulfil(self, order: str, http: httpx.AsyncClient | None = None) -> None:
        """The fulfilment server told the good is on the card (retried by :meth:`purse_tick`)."""
        session = await self.sql(read_one, self.engine, D.purse_sessions, order_ref=order,
                                 state=D.COMMITTED)
        if session is None:
            return
        try:
            answer = await self.send("fulfil", "/v1/purse/paid", W.PURSE_PAID, {
                "order": order, "card": session["card"], "counter": session["counter"],
                "random": session["random"], "tac": session["tac"],
                "created": self.now_ms() // 1000}, http)
        except Unreachable:
            return
        if answer.get("order") == order and answer.get("state") == D.WRITTEN:
            await self.sql(self._fulfil_told, session["id"])

    def _fulfil_told(self, session: int) -> None:
        s = D.purse_sessions
        with step(self.engine) as conn:
            conn.execute(update(s).where(s.c.id == session).values(told=True))

    async def purse_tick(self, http: httpx.AsyncClient) -> None:
        """Committed sessions the fulfilment server missed: told; orders ``debiting`` past
        their pick-up deadline: ``expired`` (nothing was taken; a late proof still pays)."""
        s, t = D.purse_sessions, D.payment_orders
        with reading(self.engine) as conn:
            untold = conn.execute(select(s.c.order_ref).where(
                s.c.state == D.COMMITTED, s.c.told.is_(False)).limit(1000)).all()
            late = conn.execute(select(t.c.order_ref).where(
                t.c.state == D.DEBITING,
                t.c.created < self.now_ms() - self.system.pickup_seconds * 1000)
                .limit(1000)).all()
        for (order,) in untold:
            await self._tell_fulfil(order, http)
        for (order,) in late:
            if await self.sql(self._set, order, D.DEBITING, D.EXPIRED):
                await self._tell_merchant(order, D.EXPIRED, "never paid by the purse", http)
