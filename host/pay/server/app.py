"""The payment server (seed FIG. 4-9): draw requests in, debit commands out, PSAMs in a pool.

``POST /v1/draw`` takes a sealed draw request, has a PSAM compute MAC1 (INIT SAM FOR PURCHASE)
and answers the sealed debit command. ``POST /v1/debit-response`` (FIG. 5 and 6) takes the card's
answer: the server compares the card's MAC2 with the MAC2 the PSAM expects and, in FIG. 5, the
PSAM checks it again and completes its record with the card's TAC (CREDIT SAM FOR PURCHASE); it
answers "debit result C" (for the client) and "debit result M" (for the merchant). In FIG. 7
and 8 the one round trip is the draw: the debit command carries the expected MAC2 (FIG. 7, for
the client) or that MAC2 sealed for the merchant (FIG. 8), and M; the card's MAC2 and TAC come
later to ``POST /v1/proof``.

The rules this server keeps (docs/security.md):

* **Only authenticated data moves a payment.** The card is not authenticated before its MAC2:
  the draw's card serial, counter, expiry and balance are recorded, never trusted, so a draw
  never voids, fails or blocks another payment (a unique (card, counter) key exists only among
  confirmed payments). A debit response with a card status other than 9000 is an unauthenticated
  report: it is recorded (``client_report``), may free a FIG. 5 PSAM early, and changes no
  state; a MAC2 that is not the expected one is refused (400, code 401) and changes nothing. The
  MAC2 is compared (in constant time) *before* anything goes to the PSAM, so a forged MAC2
  never uses up the FIG. 5 PSAM session, and a genuine answer that comes later still confirms.
* **Every check-then-act is one atomic step.** A state change is one conditional UPDATE
  (:meth:`~svcard.host.paydb.PaymentDb.advance`); the loser of a race re-reads the row (same
  response: the stored result, idempotently; else 409). The FIG. 5 held PSAM is taken from
  ``_held`` with a synchronous pop before any ``await``, so one request only runs CREDIT SAM.
* **No goods without evidence made after the fact.** "Paid" is answered only on the card's
  MAC2. The PSAM records every purchase at INIT SAM; if CREDIT SAM never runs (hold timed out,
  restart), the record stays without TAC and the batch hand-off adds the card's TAC from this
  database, in the batch ("proofs") or, if the batch had already left, in a late-proofs file.
* **Bounded.** FIG. 5 holds are bounded per merchant and per client address (429 beyond), and
  a hold lasts ``hold_timeout`` at most. The server refuses a card whose reported expiry date has
  passed (403). EF 0x15 dates are not MACed: a lying client can claim a later expiry (the card's
  keys still work, its MAC2 still verifies); what stops an invalidated card is the issuer's
  blocked list in the PSAM (INIT SAM answers 6985: 403).

Every refusal is a 4xx with a binary :data:`~svcard.protocols.messages.ErrorMessage` and the
reason also in the ``X-Svcard-Reason`` header; no PSAM free in time is 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ....card.storage import write_atomically
from ....protocols import messages as M
from ....protocols import purse as P
from ....protocols import secure
from ....protocols import sw as SW
from ....reader import Reader
from ...kit.db import DuplicateError
from ...kit.http import (
    OCTETS,
    STORAGE_ERROR_HANDLERS,
    Refused,
    SqlRunner,
    answer,
    open_client_envelope,
)
from ...terminal import apdus
from ...terminal.purse import Declined, call
from .db import PaymentDb, make_engine
from .psam_pool import PooledPsam, PoolExhausted, PsamPool

log = logging.getLogger(__name__)


@dataclass
class MerchantAccount:
    merchant_id: bytes
    shared_key: bytes
    variants: frozenset[int] = frozenset(M.VARIANTS.values())

    def __repr__(self) -> str:  # never the key
        return f"MerchantAccount({self.merchant_id.hex()})"


@dataclass
class PaymentConfig:
    merchants: dict[bytes, MerchantAccount]
    db_url: str = "sqlite:///payments.db"
    acquire_timeout: float = 2.0
    hold_timeout: float = 10.0       # FIG. 5: how long a PSAM waits for the card's answer
    admin_token: str = field(default="", repr=False)  # for POST /v1/batches/close
    concentration_dir: str = ""      # where closed batches are handed to the concentration point
    clock: Any = field(default=dt.datetime.now)
    # FIG. 5 holds at once, per merchant and per client address (None: half the pool, >= 1)
    max_holds_per_merchant: int | None = None
    max_holds_per_client: int | None = None


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Opened:
    """A client envelope, checked and opened."""

    env: Any
    merchant: MerchantAccount
    dk: bytes
    ticket: Any
    plaintext: bytes


@dataclass
class Hold:
    """FIG. 5: a PSAM kept for one payment until the card's MAC2 comes (or the timer ends)."""

    psam: PooledPsam
    merchant: bytes
    client: str
    deadline: float
    timer: asyncio.TimerHandle | None = None


class PaymentServer:
    def __init__(self, config: PaymentConfig, psam_readers: list[Reader]) -> None:
        self.config = config
        self.pool = PsamPool(psam_readers)
        self.db = PaymentDb(make_engine(config.db_url))
        self._held: dict[int, Hold] = {}
        # FIG. 5 holds (and reservations for draws on their way to one) per merchant / client
        self._hold_count: Counter[tuple[str, str]] = Counter()
        self._close_lock = asyncio.Lock()
        self.sql = SqlRunner(config.db_url)
        half = max(1, len(psam_readers) // 2)
        self.max_holds_per_merchant = config.max_holds_per_merchant or half
        self.max_holds_per_client = config.max_holds_per_client or half

    # --- opening requests -------------------------------------------------------------------
    def open_envelope(self, data: bytes, msg_type: int) -> Opened:
        env, dk, ticket, plaintext = open_client_envelope(
            data, msg_type, {m: a.shared_key for m, a in self.config.merchants.items()},
            "merchant", M.OrderTicket, M.ticket_aad)
        merchant = self.config.merchants[env.merchant_id]
        if ticket.expires < time.time():
            raise Refused(400, 410, "the merchant's order has expired")
        if ticket.variant not in merchant.variants:
            raise Refused(403, 403, f"variant {M.VARIANT_NAMES.get(ticket.variant, '?')} is "
                                    "not enabled for this merchant")
        return Opened(env, merchant, dk, ticket, plaintext)

    def sealed(self, o: Opened, msg_type: int, body: bytes) -> Response:
        return Response(M.seal_envelope(msg_type, o.env.merchant_id, o.env.txn_id, o.env.etsk,
                                        o.ticket.tsk, body), media_type=OCTETS)

    def debit_result(self, o: Opened, row: dict[str, Any], status: int, reason: str,
                     tac: bytes = bytes(4)) -> dict[str, Any]:
        return {"version": M.VERSION, "status": status, "variant": o.ticket.variant,
                "merchant_id": o.env.merchant_id, "txn_id": o.env.txn_id,
                "amount": o.ticket.amount, "currency_code": o.ticket.currency_code,
                "psam_id": bytes.fromhex(row["psam_id"]) if row.get("psam_id") else bytes(10),
                "terminal_txn_number": row.get("ttn") or 0,
                "card_serial": bytes.fromhex(row["card_serial"]),
                "card_counter": row["card_counter"], "tac": tac, "reason": reason}

    def result_m(self, o: Opened, result: dict[str, Any]) -> bytes:
        return secure.seal(o.dk, M.build(M.DebitResult, result),
                           M.result_m_aad(o.env.merchant_id, o.env.txn_id))

    def open_message(self, data: bytes, msg_type: int, layout: Any,
                     what: str) -> tuple[Opened, Any]:
        """Open a client envelope and parse its body as ``layout``."""
        o = self.open_envelope(data, msg_type)
        try:
            return o, M.parse(layout, o.plaintext, what)
        except M.MessageError as exc:
            raise Refused(400, 400, str(exc)) from None

    # --- FIG. 5 holds -----------------------------------------------------------------------
    def _reserve_hold(self, merchant: bytes, client: str) -> None:
        """Count a FIG. 5 hold against its merchant and client before any PSAM is taken, in
        one synchronous step (no ``await`` between the check and the count); 429 beyond."""
        keys = (("merchant", merchant.hex()), ("client", client))
        for (kind, who), limit in zip(keys, (self.max_holds_per_merchant,
                                             self.max_holds_per_client), strict=True):
            if self._hold_count[(kind, who)] >= limit:
                loop = asyncio.get_running_loop()
                ends = [h.deadline for h in self._held.values()
                        if (h.merchant.hex() if kind == "merchant" else h.client) == who]
                wait = min(ends, default=loop.time() + self.config.hold_timeout) - loop.time()
                raise Refused(429, 429, f"too many FIG. 5 payments waiting for a card at once "
                                        f"for this {kind} (at most {limit}); retry later",
                              {"Retry-After": str(max(1, math.ceil(wait)))})
        for key in keys:
            self._hold_count[key] += 1

    def _unreserve_hold(self, merchant: bytes, client: str) -> None:
        for key in (("merchant", merchant.hex()), ("client", client)):
            self._hold_count[key] -= 1
            if self._hold_count[key] <= 0:
                del self._hold_count[key]

    def _hold(self, row_id: int, psam: PooledPsam, merchant: bytes, client: str) -> None:
        """FIG. 5: the PSAM waits for the card's MAC2, but not for ever."""
        loop = asyncio.get_running_loop()
        hold = Hold(psam, merchant, client, loop.time() + self.config.hold_timeout)
        hold.timer = loop.call_later(self.config.hold_timeout, self._release_hold, row_id)
        self._held[row_id] = hold

    def _take_hold(self, row_id: int) -> Hold | None:
        """Take a held PSAM for this request alone (synchronous: no other request can take it
        too); the caller gives it back with :meth:`_end_hold`."""
        hold = self._held.pop(row_id, None)
        if hold is not None and hold.timer is not None:
            hold.timer.cancel()
        return hold

    def _end_hold(self, hold: Hold) -> None:
        self.pool.release(hold.psam)
        self._unreserve_hold(hold.merchant, hold.client)

    def _release_hold(self, row_id: int) -> None:
        hold = self._take_hold(row_id)
        if hold is not None:
            self._end_hold(hold)

    # --- POST /v1/draw ----------------------------------------------------------------------
    async def draw(self, request: Request) -> Response:
        client = request.client.host if request.client else "?"
        return await answer(lambda data: self._draw(data, client), request)

    async def _draw(self, data: bytes, client: str = "?") -> Response:
        o, d = self.open_message(data, M.DRAW_REQUEST, M.DrawRequest, "draw request")
        t = o.ticket
        if d.amount != t.amount:
            raise Refused(400, 402, f"the amount {d.amount} differs from the merchant's order "
                                    f"({t.amount}): changed in transit")
        if d.currency_code != t.currency_code:
            raise Refused(400, 400, "the card's currency is not the order's")
        if t.terminal_id != self.pool.terminal_id:
            raise Refused(400, 400, "the order names another payment terminal id")
        if d.txn_type not in (P.TYPE_EP_PURCHASE, P.TYPE_ED_PURCHASE):
            raise Refused(400, 400, f"transaction type {d.txn_type:02X} is not a purchase")
        try:
            expiry = P.parse_bcd_date(d.expiry_date)
        except ValueError:
            raise Refused(400, 400, "the card's expiry date is not a date") from None
        if self.config.clock().date() > expiry:
            raise Refused(403, 403, f"the card expired on {expiry.isoformat()}")
        merchant_hex, txn_hex = o.env.merchant_id.hex(), o.env.txn_id.hex()
        draw_digest = digest(o.plaintext)
        values = {"variant": t.variant, "amount": t.amount, "currency_code": t.currency_code,
                  "card_serial": d.card_serial.hex(), "card_counter": d.offline_counter,
                  "draw_digest": draw_digest}
        existing = await self.sql(self.db.get, merchant_hex, txn_hex)
        if existing is not None:
            again = self._same_draw(o, existing, draw_digest)
            if again is not None:
                return again
        fig5 = t.variant == M.FIG5_PSAM_COMPARES
        if fig5:
            self._reserve_hold(o.env.merchant_id, client)
        held = False
        try:
            if existing is not None:  # busy before: this same draw may take it again, once
                row_id = existing["id"]
                if not await self.sql(self.db.advance, row_id, "busy", state="received",
                                      reason="", **values):
                    raise self._draw_conflict(await self.sql(self.db.get, merchant_hex,
                                                             txn_hex))
            else:
                try:
                    row_id = await self.sql(self.db.insert_received, {
                        "merchant_id": merchant_hex, "txn_id": txn_hex, **values})
                except DuplicateError:  # the same transaction, raced: one of us recorded it
                    row = await self.sql(self.db.get, merchant_hex, txn_hex)
                    again = self._same_draw(o, row, draw_digest) if row else None
                    if again is not None:
                        return again
                    raise self._draw_conflict(row) from None
            response, held = await self._issue(o, d, row_id, client)
            return response
        finally:
            if fig5 and not held:
                self._unreserve_hold(o.env.merchant_id, client)

    def _same_draw(self, o: Opened, row: dict[str, Any], draw_digest: str) -> Response | None:
        """A draw for a transaction that already has one: the same debit command again if it
        is the same draw and the debit is still open (its answer was lost); None if the row is
        ``busy`` (this draw may retry); else 409."""
        if not hmac.compare_digest(row["draw_digest"], draw_digest):
            raise Refused(409, 409, "replayed draw request: this transaction already has "
                                    "another draw")
        if row["debit_command"] is not None and row["state"] in ("issued", "released"):
            return self.sealed(o, M.DEBIT_COMMAND, row["debit_command"])
        if row["state"] == "busy":
            return None
        raise self._draw_conflict(row)

    @staticmethod
    def _draw_conflict(row: dict[str, Any] | None) -> Refused:
        if row is None:
            return Refused(409, 409, "the transaction changed meanwhile; retry")
        if row["state"] in ("received", "busy"):
            return Refused(409, 409, "this draw is being processed by another request; retry",
                           {"Retry-After": "1"})
        return Refused(409, 409, f"replayed draw request: the transaction is {row['state']}"
                                 + (f" ({row['reason']})" if row["reason"] else ""))

    async def _issue(self, o: Opened, d: Any, row_id: int,
                     client: str) -> tuple[Response, bool]:
        """INIT SAM FOR PURCHASE on a free PSAM for a recorded draw (state ``received``): the
        debit command, and whether the PSAM is now held for the card's answer (FIG. 5)."""
        t = o.ticket
        try:
            psam = await self.pool.acquire(self.config.acquire_timeout)
        except PoolExhausted as exc:
            await self.sql(self.db.advance, row_id, "received", state="busy", reason=str(exc))
            raise Refused(503, 503, f"all PSAMs are busy ({exc}); retry",
                          {"Retry-After": "1"}) from None
        held = False
        try:
            now = self.config.clock()
            date, clock_time = P.bcd_date(now.date()), P.bcd_time(now)
            early = t.variant != M.FIG5_PSAM_COMPARES
            fields = {"random": d.random, "offline_counter": d.offline_counter,
                      "amount": d.amount, "txn_type": d.txn_type, "date": date,
                      "time": clock_time, "key_version": d.key_version,
                      "algorithm_id": d.algorithm_id, "card_serial": d.card_serial[-8:]}

            def issue(reader: Reader) -> tuple[int, bytes, bytes]:
                answer = call(reader, apdus.init_sam_for_purchase(fields, early=early),
                              "INIT SAM FOR PURCHASE")
                if early:
                    a = P.InitSamAnswerEarly.parse(answer)
                    return a.terminal_txn_number, a.mac1, a.expected_mac2
                a = P.InitSamAnswer.parse(answer)
                prev = P.PreviousSignature.parse(call(reader, bytes.fromhex("8078000000"),
                                                      "PSAM PREVIOUS SIGNATURE"))
                return a.terminal_txn_number, a.mac1, prev.expected_mac2

            try:
                ttn, mac1, expected = await self.pool.run(psam, issue)
            except Declined as exc:
                blocked = exc.sw == SW.CONDITIONS_NOT_SATISFIED
                reason = ("the card is blocked at this payment server" if blocked
                          else f"the PSAM refused: {exc}")
                await self.sql(self.db.advance, row_id, "received", state="failed",
                               reason=reason)
                raise Refused(403 if blocked else 400, 403, reason) from None
            row = {"psam_id": psam.psam_id.hex(), "ttn": ttn, "card_serial": d.card_serial.hex(),
                   "card_counter": d.offline_counter}
            sealed_expected = b""
            result_m = b""
            if t.variant == M.FIG8_MERCHANT_COMPARES:
                sealed_expected = secure.seal(o.dk, expected, M.expected_mac2_aad(
                    o.env.merchant_id, o.env.txn_id))
            if t.variant in (M.FIG7_CLIENT_COMPARES, M.FIG8_MERCHANT_COMPARES):
                status = M.STATUS_AUTHENTICATED if t.purpose == M.PURPOSE_AUTHENTICATION \
                    else M.STATUS_OK
                result_m = self.result_m(o, self.debit_result(o, row, status, "issued"))
            command = M.build(M.DebitCommand, {
                "psam_id": psam.psam_id, "terminal_id": psam.terminal_id,
                "terminal_txn_number": ttn, "date": date, "time": clock_time, "mac1": mac1,
                "amount": d.amount,
                "expected_mac2": expected if t.variant == M.FIG7_CLIENT_COMPARES else bytes(4),
                "sealed_expected_mac2": sealed_expected, "result_m": result_m})
            state = "issued" if t.variant in (M.FIG5_PSAM_COMPARES, M.FIG6_SERVER_COMPARES) \
                else "released"
            if t.variant == M.FIG5_PSAM_COMPARES:
                # held before the row says "issued": a debit response that reads "issued"
                # always finds its PSAM
                self._hold(row_id, psam, o.env.merchant_id, client)
                held = True
            if not await self.sql(self.db.advance, row_id, "received", state=state,
                                  psam_id=psam.psam_id.hex(), ttn=ttn, txn_date=date.hex(),
                                  txn_time=clock_time.hex(), mac1=mac1.hex(),
                                  expected_mac2=expected.hex(), debit_command=command):
                raise Refused(409, 409, "the transaction changed meanwhile; retry")
            return self.sealed(o, M.DEBIT_COMMAND, command), held
        except BaseException:
            if held:
                self._take_hold(row_id)
                held = False
            raise
        finally:
            if not held:
                self.pool.release(psam)

    # --- POST /v1/debit-response ------------------------------------------------------------
    async def debit_response(self, request: Request) -> Response:
        return await answer(self._debit_response, request)

    def _payment_result(self, o: Opened, row: dict[str, Any], status: int, reason: str,
                        tac: bytes) -> bytes:
        result = self.debit_result(o, row, status, reason, tac)
        return M.build(M.PaymentResult, {
            "result_c": secure.seal(o.ticket.tsk, M.build(M.DebitResult, result),
                                    M.result_c_aad(o.env.merchant_id, o.env.txn_id)),
            "result_m": self.result_m(o, result)})

    async def _debit_response(self, data: bytes) -> Response:
        o, r = self.open_message(data, M.DEBIT_RESPONSE, M.DebitResponse, "debit response")
        row = await self.sql(self.db.get, o.env.merchant_id.hex(), o.env.txn_id.hex())
        if row is None:
            raise Refused(404, 404, "no such transaction")
        response_digest = digest(o.plaintext)
        if row["state"] != "issued":
            return self._finished(o, row, response_digest)
        row_id = row["id"]
        if r.card_sw != SW.OK:
            # what the client says the card answered: not authenticated. It frees a FIG. 5
            # PSAM early and is recorded; it moves no state (a genuine MAC2 later still counts)
            self._release_hold(row_id)
            report = f"card refused: {r.card_sw:04X} ({SW.meaning(r.card_sw)})"
            await self.sql(self.db.note, row_id, "issued", report)
            return self.sealed(o, M.PAYMENT_RESULT, self._payment_result(
                o, row, M.STATUS_CARD_REFUSED, f"the card refused the debit: {r.card_sw:04X} "
                f"({SW.meaning(r.card_sw)})", bytes(4)))
        if not hmac.compare_digest(r.mac2, bytes.fromhex(row["expected_mac2"])):
            await self.sql(self.db.note, row_id, "issued", "a MAC2 that is not the expected one")
            raise Refused(400, 401, "the card's MAC2 is not the one the PSAM expected: not "
                                    "confirmed, nothing changed")
        # the card's MAC2 is authentic. FIG. 5: the PSAM completes its record with the TAC
        hold = self._take_hold(row_id)
        if hold is not None:
            try:
                answer = await self.pool.run(hold.psam, lambda reader: reader.exchange(
                    apdus.credit_sam_for_purchase(r.mac2, r.tac)))
                if not answer.ok:  # cannot be after our comparison: recorded for the operator
                    log.warning("PSAM %s answered %04X to CREDIT SAM for a MAC2 the server "
                                "verified (row %d)", hold.psam.psam_id.hex(), answer.sw, row_id)
            finally:
                self._end_hold(hold)
        auth = o.ticket.purpose == M.PURPOSE_AUTHENTICATION
        status = M.STATUS_AUTHENTICATED if auth else M.STATUS_OK
        reason = "authentication OK" if auth else "paid"
        body = self._payment_result(o, row, status, reason, r.tac)
        try:
            won = await self.sql(self.db.advance, row_id, "issued", state="confirmed",
                                 reason=reason, card_mac2=r.mac2.hex(), tac=r.tac.hex(),
                                 response_digest=response_digest, result=body)
        except DuplicateError:
            raise Refused(409, 409, "another confirmed payment already holds this card "
                                    "counter") from None
        if not won:  # another request confirmed it first: its answer, if it is this one
            row = await self.sql(self.db.get, o.env.merchant_id.hex(), o.env.txn_id.hex())
            assert row is not None
            return self._finished(o, row, response_digest)
        return self.sealed(o, M.PAYMENT_RESULT, body)

    def _finished(self, o: Opened, row: dict[str, Any], response_digest: str) -> Response:
        """A debit response for a transaction no longer waiting for one."""
        if row["state"] == "confirmed" and row["result"] is not None:
            if hmac.compare_digest(row["response_digest"] or "", response_digest):
                return self.sealed(o, M.PAYMENT_RESULT, row["result"])  # an idempotent retry
            raise Refused(409, 409, "replayed debit response: the transaction is already "
                                    "confirmed")
        raise Refused(409, 409, f"the transaction is {row['state']}"
                                + (f" ({row['reason']})" if row["reason"] else ""))

    # --- POST /v1/proof (FIG. 7 and 8, after the goods) -----------------------------------
    async def proof(self, request: Request) -> Response:
        return await answer(self._proof, request)

    async def _proof(self, data: bytes) -> Response:
        """The card's MAC2 and TAC of an early-released purchase, so clearing can check the
        card's TAC. Off the purchase's critical path: the goods are already released."""
        o, r = self.open_message(data, M.DEBIT_PROOF, M.DebitResponse, "debit proof")
        merchant_hex, txn_hex = o.env.merchant_id.hex(), o.env.txn_id.hex()
        row = await self.sql(self.db.get, merchant_hex, txn_hex)
        if row is None:
            raise Refused(404, 404, "no such transaction")
        if row["state"] == "released":
            if r.card_sw != SW.OK or not hmac.compare_digest(
                    r.mac2, bytes.fromhex(row["expected_mac2"])):
                raise Refused(400, 401, "the card's MAC2 is not the one the PSAM expected")
            try:
                if await self.sql(self.db.advance, row["id"], "released", state="confirmed",
                                  card_mac2=r.mac2.hex(), tac=r.tac.hex(), reason="paid"):
                    return Response(b"", status_code=204)
            except DuplicateError:
                raise Refused(409, 409, "another confirmed payment already holds this card "
                                        "counter") from None
            row = await self.sql(self.db.get, merchant_hex, txn_hex)  # raced: who won?
            assert row is not None
        if row["state"] == "confirmed" and row["tac"] == r.tac.hex() \
                and row["card_mac2"] == r.mac2.hex():
            return Response(b"", status_code=204)  # an idempotent retry
        raise Refused(409, 409, f"the transaction is {row['state']}")

    # --- POST /v1/batches/close (concentration point hand-off) ------------------------------
    async def close_batches(self, request: Request) -> Response:
        token = self.config.admin_token
        given = request.headers.get("authorization", "")
        if not token or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return JSONResponse({"reason": "admin token required"}, status_code=403)
        if not self.config.concentration_dir:
            return JSONResponse({"reason": "no concentration_dir configured"},
                                status_code=409)
        async with self._close_lock:
            written: list[str] = []
            taken: list[PooledPsam] = []
            try:  # each PSAM as its transaction ends; held until all are closed
                for _ in self.pool.psams:
                    psam = await self.pool.acquire(self.config.acquire_timeout * 10)
                    taken.append(psam)
                    batch = await self.pool.run(psam, collect_batch)
                    if batch is not None:
                        written.append(await self.sql(self._write_batch, psam, batch))
            except PoolExhausted as exc:
                return JSONResponse({"reason": f"PSAMs stayed busy ({exc}); closed "
                                               f"{len(written)} batches", "batches": written},
                                    status_code=503)
            finally:
                for psam in taken:
                    self.pool.release(psam)
            late = await self.sql(self._write_late_proofs)
        return JSONResponse({"batches": written, "late_proofs": late})

    def _write_batch(self, psam: PooledPsam, batch: dict[str, Any]) -> str:
        """The batch as the PSAM closed it, with the card proofs the database holds for its
        records without TAC (early-released, or FIG. 5 whose CREDIT SAM never ran); each record's
        row is marked with the batch it went out in and whether its TAC went too."""
        proofs: dict[str, str] = {}
        handed: list[tuple[int, bool]] = []
        psam_hex = psam.psam_id.hex()
        for i, raw in enumerate(batch["records"]):
            rec = P.PsamRecord.parse(bytes.fromhex(raw))
            has_tac = rec.tac != bytes(4)
            if not has_tac:
                row = self.db.by_psam_ttn(psam_hex, rec.terminal_txn_number)
                if row is not None and row["tac"] and row["state"] == "confirmed":
                    proofs[str(i)] = row["tac"]
                    has_tac = True
            handed.append((rec.terminal_txn_number, has_tac))
        batch = {**batch, "psam_id": psam_hex.upper(), "proofs": proofs}
        folder = Path(self.config.concentration_dir)
        folder.mkdir(parents=True, exist_ok=True)
        name = (f"batch-{batch['terminal_id']}-{batch['psam_id']}-"
                f"{batch['batch_number']:06d}.json")
        write_atomically(folder / name, json.dumps(batch, indent=1).encode())
        self.db.mark_handed(psam_hex, name, int(batch["batch_number"]), handed)
        return str(folder / name)

    def _write_late_proofs(self) -> list[str]:
        """CL4: the TACs of payments confirmed after their PSAM record went to clearing without
        one, one file per PSAM (``proofs-{terminal}-{psam}-{UTC stamp}.json``)."""
        rows = self.db.late_proofs()
        if not rows:
            return []
        by_psam: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_psam.setdefault(row["psam_id"], []).append(row)
        folder = Path(self.config.concentration_dir)
        folder.mkdir(parents=True, exist_ok=True)
        terminal = self.pool.terminal_id.hex().upper()
        out = []
        for psam_hex, items in sorted(by_psam.items()):
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S%f")
            path = folder / f"proofs-{terminal}-{psam_hex.upper()}-{stamp}.json"
            doc = {"format": "svcard late proofs v1", "terminal_id": terminal,
                   "psam_id": psam_hex.upper(),
                   "proofs": [{"batch_number": int(r["batch_number"]),
                               "terminal_txn_number": int(r["ttn"]),
                               "tac": str(r["tac"]).upper()} for r in items]}
            write_atomically(path, json.dumps(doc, indent=1).encode())
            self.db.mark_proofs_handed([int(r["id"]) for r in items])
            out.append(str(path))
        return out

    async def health(self, request: Request) -> Response:
        return JSONResponse({"psams": len(self.pool.psams), "idle": self.pool.idle,
                             "terminal_id": self.pool.terminal_id.hex().upper()})

    # --- application ------------------------------------------------------------------------
    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            await asyncio.to_thread(self.db.recover)
            await self.pool.start()
            try:
                yield
            finally:
                for row_id in list(self._held):
                    self._release_hold(row_id)
                await asyncio.to_thread(self.pool.close)

        return Starlette(routes=[
            Route("/v1/draw", self.draw, methods=["POST"]),
            Route("/v1/debit-response", self.debit_response, methods=["POST"]),
            Route("/v1/proof", self.proof, methods=["POST"]),
            Route("/v1/batches/close", self.close_batches, methods=["POST"]),
            Route("/v1/health", self.health, methods=["GET"]),
        ], lifespan=lifespan, exception_handlers=dict(STORAGE_ERROR_HANDLERS))


def collect_batch(reader: Reader) -> dict[str, Any] | None:
    """Close the PSAM's open batch and read its records back (None if it was empty: an empty
    batch is closed anyway, so batch numbers stay in step)."""
    answer = P.BatchCloseAnswer.parse(call(reader, bytes.fromhex("807E000000"),
                                           "PSAM CLOSE BATCH"))
    records = []
    for index in range(answer.record_count):
        records.append(call(reader, apdus.read_batch_record(1, index),
                            "PSAM READ BATCH RECORD").hex().upper())
    if not records:
        return None
    return {"terminal_id": answer.terminal_id.hex().upper(),
            "batch_number": answer.batch_number, "record_count": answer.record_count,
            "total_amount": answer.total_amount, "mac": answer.mac.hex().upper(),
            "records": records}
