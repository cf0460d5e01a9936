"""The payment server (seed FIG. 4-9): draw requests in, debit commands out, PSAMs in a pool.

``POST /v1/draw`` takes a sealed draw request, has a PSAM compute MAC1 (INIT SAM FOR PURCHASE)
and answers the sealed debit command. ``POST /v1/debit-response`` (FIG. 5 and 6) takes the card's
answer: the PSAM checks the card's MAC2 (FIG. 5) or the server compares it with the expected
MAC2 the PSAM gave (FIG. 6), and answers "debit result C" (for the client) and "debit result M"
(for the merchant). In FIG. 7 and 8 the one round trip is the draw: the debit command carries
the expected MAC2 (FIG. 7, for the client) or that MAC2 sealed for the merchant (FIG. 8), and M.

Every refusal is a 4xx with a binary :data:`~svcard.protocols.messages.ErrorMessage` and the
reason also in the ``X-Svcard-Reason`` header; no PSAM free in time is 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from svcard.host import apdus
from svcard.host.db import DuplicateError
from svcard.host.paydb import PaymentDb, make_engine
from svcard.host.psam_pool import PooledPsam, PoolExhausted, PsamPool
from svcard.host.serverkit import (
    OCTETS,
    Refused,
    SqlRunner,
    answer,
    open_client_envelope,
)
from svcard.host.terminal import Declined, call
from svcard.protocols import messages as M
from svcard.protocols import purse as P
from svcard.protocols import secure
from svcard.protocols import sw as SW
from svcard.reader import Reader


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
    hold_timeout: float = 30.0       # FIG. 5: how long a PSAM waits for the card's answer
    admin_token: str = field(default="", repr=False)  # for POST /v1/batches/close
    concentration_dir: str = ""      # where closed batches are handed to the concentration point
    clock: Any = field(default=dt.datetime.now)


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


class PaymentServer:
    def __init__(self, config: PaymentConfig, psam_readers: list[Reader]) -> None:
        self.config = config
        self.pool = PsamPool(psam_readers)
        self.db = PaymentDb(make_engine(config.db_url))
        self._held: dict[int, tuple[PooledPsam, asyncio.TimerHandle]] = {}
        self.sql = SqlRunner(config.db_url)

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

    # --- POST /v1/draw ----------------------------------------------------------------------
    async def draw(self, request: Request) -> Response:
        return await answer(self._draw, request)

    async def _draw(self, data: bytes) -> Response:
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
        merchant_hex, txn_hex = o.env.merchant_id.hex(), o.env.txn_id.hex()
        draw_digest = digest(o.plaintext)
        existing = await self.sql(self.db.get, merchant_hex, txn_hex)
        values = {"variant": t.variant, "amount": t.amount, "currency_code": t.currency_code,
                  "card_serial": d.card_serial.hex(), "card_counter": d.offline_counter,
                  "draw_digest": draw_digest}
        if existing is not None:
            if existing["draw_digest"] != draw_digest:
                raise Refused(409, 409, "replayed draw request: this transaction already has "
                                        "another draw")
            if existing["state"] == "busy":
                row_id = existing["id"]
                await self.sql(self.db.retry_busy, row_id, values)
            elif existing["debit_command"] is not None and existing["state"] in (
                    "issued", "released"):
                # the client did not get our answer: the same debit command again
                return self.sealed(o, M.DEBIT_COMMAND, existing["debit_command"])
            else:
                raise Refused(409, 409, f"replayed draw request: the transaction is "
                                        f"{existing['state']}"
                                        + (f" ({existing['reason']})" if existing["reason"]
                                           else ""))
        else:
            try:
                row_id = await self.sql(self.db.insert_received,
                                       {"merchant_id": merchant_hex, "txn_id": txn_hex, **values})
            except DuplicateError:
                raise Refused(409, 409, "replayed draw request (a card counter or transaction "
                                        "already in use)") from None
        try:
            psam = await self.pool.acquire(self.config.acquire_timeout)
        except PoolExhausted as exc:
            await self.sql(self.db.set, row_id, state="busy", reason=str(exc))
            raise Refused(503, 503, f"all PSAMs are busy ({exc}); retry",
                          {"Retry-After": "1"}) from None
        hold = False
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
                reason = ("the card is blocked at this payment server" if exc.sw ==
                          SW.CONDITIONS_NOT_SATISFIED else f"the PSAM refused: {exc}")
                await self.sql(self.db.set, row_id, state="failed", reason=reason)
                raise Refused(403 if exc.sw == SW.CONDITIONS_NOT_SATISFIED else 400, 403,
                              reason) from None
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
            await self.sql(self.db.set, row_id, state=state, psam_id=psam.psam_id.hex(), ttn=ttn,
                          txn_date=date.hex(), txn_time=clock_time.hex(), mac1=mac1.hex(),
                          expected_mac2=expected.hex(), debit_command=command)
            hold = t.variant == M.FIG5_PSAM_COMPARES
            if hold:
                self._hold(row_id, psam)
            return self.sealed(o, M.DEBIT_COMMAND, command)
        finally:
            if not hold:
                self.pool.release(psam)

    def _hold(self, row_id: int, psam: PooledPsam) -> None:
        """FIG. 5: the PSAM waits for the card's MAC2, but not for ever."""
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.config.hold_timeout, self._release_hold, row_id)
        self._held[row_id] = (psam, timer)

    def _release_hold(self, row_id: int) -> PooledPsam | None:
        held = self._held.pop(row_id, None)
        if held is None:
            return None
        psam, timer = held
        timer.cancel()
        self.pool.release(psam)
        return psam

    # --- POST /v1/debit-response ------------------------------------------------------------
    async def debit_response(self, request: Request) -> Response:
        return await answer(self._debit_response, request)

    async def _debit_response(self, data: bytes) -> Response:
        o, r = self.open_message(data, M.DEBIT_RESPONSE, M.DebitResponse, "debit response")
        row = await self.sql(self.db.get, o.env.merchant_id.hex(), o.env.txn_id.hex())
        if row is None:
            raise Refused(404, 404, "no such transaction")
        response_digest = digest(o.plaintext)
        if row["state"] in ("confirmed", "failed") and row["result"] is not None:
            if row["response_digest"] == response_digest:
                return self.sealed(o, M.PAYMENT_RESULT, row["result"])  # an idempotent retry
            raise Refused(409, 409, f"replayed debit response: the transaction is already "
                                    f"{row['state']}")
        if row["state"] != "issued":
            raise Refused(409, 409, f"the transaction is {row['state']}"
                                    + (f" ({row['reason']})" if row["reason"] else ""))
        row_id = row["id"]
        held = self._held.get(row_id)
        if r.card_sw != SW.OK:
            if held:
                self._release_hold(row_id)
            status, reason, state = M.STATUS_CARD_REFUSED, \
                f"the card refused the debit: {r.card_sw:04X} ({SW.meaning(r.card_sw)})", "failed"
        else:
            answer = None
            if held is not None:  # FIG. 5: the PSAM compares (CREDIT SAM FOR PURCHASE)
                psam = held[0]
                answer = await self.pool.run(psam, lambda reader: reader.exchange(
                    apdus.credit_sam_for_purchase(r.mac2, r.tac)))
                self._release_hold(row_id)
            if answer is not None and answer.sw in (SW.OK, SW.MAC_INVALID):
                good = answer.ok
            else:  # FIG. 6, or a FIG. 5 PSAM whose session is gone: the server compares
                good = r.mac2 == bytes.fromhex(row["expected_mac2"])
            if good:
                auth = o.ticket.purpose == M.PURPOSE_AUTHENTICATION
                status = M.STATUS_AUTHENTICATED if auth else M.STATUS_OK
                reason = "authentication OK" if auth else "paid"
                state = "confirmed"
            else:
                status, reason, state = M.STATUS_MAC_MISMATCH, \
                    "the card's MAC2 does not match: not confirmed", "failed"
        result = self.debit_result(o, row, status, reason,
                                   r.tac if status in (M.STATUS_OK, M.STATUS_AUTHENTICATED)
                                   else bytes(4))
        body = M.build(M.PaymentResult, {
            "result_c": secure.seal(o.ticket.tsk, M.build(M.DebitResult, result),
                                    M.result_c_aad(o.env.merchant_id, o.env.txn_id)),
            "result_m": self.result_m(o, result)})
        await self.sql(self.db.set, row_id, state=state, reason=reason, card_mac2=r.mac2.hex(),
                      tac=r.tac.hex(), response_digest=response_digest, result=body)
        return self.sealed(o, M.PAYMENT_RESULT, body)

    # --- POST /v1/proof (FIG. 7 and 8, after the goods) -----------------------------------
    async def proof(self, request: Request) -> Response:
        return await answer(self._proof, request)

    async def _proof(self, data: bytes) -> Response:
        """The card's MAC2 and TAC of an early-released purchase, so clearing can check the
        card's TAC. Off the purchase's critical path: the goods are already released."""
        o, r = self.open_message(data, M.DEBIT_PROOF, M.DebitResponse, "debit proof")
        row = await self.sql(self.db.get, o.env.merchant_id.hex(), o.env.txn_id.hex())
        if row is None:
            raise Refused(404, 404, "no such transaction")
        if row["state"] == "confirmed" and row["tac"] == r.tac.hex():
            return Response(b"", status_code=204)  # an idempotent retry
        if row["state"] != "released":
            raise Refused(409, 409, f"the transaction is {row['state']}")
        if r.card_sw != SW.OK or r.mac2 != bytes.fromhex(row["expected_mac2"]):
            raise Refused(400, 401, "the card's MAC2 is not the one the PSAM expected")
        await self.sql(self.db.set, row["id"], state="confirmed", card_mac2=r.mac2.hex(),
                       tac=r.tac.hex(), reason="paid")
        return Response(b"", status_code=204)

    # --- POST /v1/batches/close (concentration point hand-off) ------------------------------
    async def close_batches(self, request: Request) -> Response:
        token = self.config.admin_token
        if not token or request.headers.get("authorization") != f"Bearer {token}":
            return JSONResponse({"reason": "admin token required"}, status_code=403)
        if not self.config.concentration_dir:
            return JSONResponse({"reason": "no concentration_dir configured"},
                                status_code=409)
        written, taken = [], []
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
        return JSONResponse({"batches": written})

    def _write_batch(self, psam: PooledPsam, batch: dict[str, Any]) -> str:
        """The batch as the PSAM closed it, with the card proofs the database holds for its
        early-released records (their PSAM record has no TAC)."""
        proofs = {}
        for i, raw in enumerate(batch["records"]):
            rec = P.PsamRecord.parse(bytes.fromhex(raw))
            if rec.tac == bytes(4):
                row = self.db.by_psam_ttn(psam.psam_id.hex(), rec.terminal_txn_number)
                if row is not None and row["tac"] and row["state"] == "confirmed":
                    proofs[str(i)] = row["tac"]
        batch = {**batch, "psam_id": psam.psam_id.hex().upper(), "proofs": proofs}
        folder = Path(self.config.concentration_dir)
        folder.mkdir(parents=True, exist_ok=True)
        name = (f"batch-{batch['terminal_id']}-{batch['psam_id']}-"
                f"{batch['batch_number']:06d}.json")
        tmp = folder / (name + ".tmp")
        tmp.write_text(json.dumps(batch, indent=1))
        os.replace(tmp, folder / name)
        return str(folder / name)

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
        ], lifespan=lifespan)


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
