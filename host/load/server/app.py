"""The load server (seed FIG. 17-18, steps 877-892 and 895-899).

``POST /v1/load/request`` takes the client's packed load request (S1, card, expiry, amount,
algorithm, counter, balance, bank time stamp), checks it against the bank's sealed ticket, logs
it, has the HSM verify S1 and make S2, logs S2 and answers the load command.
``POST /v1/load/result`` takes the card's answer: S3, which the HSM verifies for this load's
own fields (the only way to "loaded"), or "not loaded" with a new zero-value S1.

"Not loaded" is decided only on evidence the card made after this load's S2 was issued. The
card completes at most one load per online-counter value, so a zero-value *probe load* is done
for real: the HSM verifies the zero-value S1 and makes S2 for amount 0 with a fresh date and
time (``LOAD_PROBE``); the card credits 0 and moves its counter; ``POST /v1/load/probe`` takes
its TAC, which the HSM verifies. A probe at the load's own counter proves the load never
happened; a probe past it proves it only when another load of the card is proven ``loaded`` at
that counter; otherwise the load stays open (409, undecided) and nothing is refunded. A load
for which no S2 ever left the server is closed "not loaded" at once. Every decision is one
compare-and-set in the database; the answer carries a confirmation sealed for the bank.

Every refusal is a 4xx with a binary error message and the reason in ``X-Svcard-Reason``; no
HSM free in time is 503 with Retry-After. A refusal changes nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ....protocols import loadmsg as L
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
from ...kit.reader_pool import Pooled, PoolExhausted, ReaderPool, executor
from ...terminal import apdus
from ...terminal.purse import Declined, call
from .db import LoadDb, make_engine

T = TypeVar("T")


@dataclass
class BankAccount:
    """A bank the load server serves, with the key they share (never printed)."""

    bank_id: bytes
    shared_key: bytes

    def __repr__(self) -> str:
        return f"BankAccount({self.bank_id.hex()})"


@dataclass
class LoadConfig:
    banks: dict[bytes, BankAccount]
    terminal_id: bytes
    db_url: str = "sqlite:///loads.db"
    acquire_timeout: float = 2.0
    clock: Any = field(default=dt.datetime.now)


class HsmPool(ReaderPool[Pooled]):
    """Load HSMs (any reader spec), each selected once when the server starts."""

    def __init__(self, readers: list[Reader], aid: bytes = P.DEFAULT_HSM_AID) -> None:
        super().__init__([Pooled(i, r, executor(f"hsm{i}")) for i, r in enumerate(readers)])
        self.aid = aid

    def open_member(self, member: Pooled) -> None:
        member.reader.connect()
        call(member.reader, apdus.select(self.aid), "SELECT HSM")


@dataclass
class OpenedLoad:
    env: Any
    bank: BankAccount
    dk: bytes
    ticket: Any
    body: Any
    digest: str


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LoadServer:
    def __init__(self, config: LoadConfig, hsm_readers: list[Reader]) -> None:
        self.config = config
        self.hsms = HsmPool(hsm_readers)
        self.db = LoadDb(make_engine(config.db_url))
        self.sql = SqlRunner(config.db_url)

    async def hsm(self, fn: Callable[[Reader], T], timeout: float) -> T:
        """Run ``fn`` on a free HSM; none free in time is 503 with Retry-After."""
        try:
            return await self.hsms.run_any(fn, timeout)
        except PoolExhausted as exc:
            raise Refused(503, 503, f"no HSM free ({exc}); retry",
                          {"Retry-After": "1"}) from None

    # --- opening and answering --------------------------------------------------------------
    def open(self, data: bytes, msg_type: int, layout: Any, what: str) -> OpenedLoad:
        env, dk, ticket, plain = open_client_envelope(
            data, msg_type, {b: a.shared_key for b, a in self.config.banks.items()}, "bank",
            L.LoadTicket, L.ticket_aad)
        if len(plain) != layout.sizeof():  # every client message has a fixed size
            raise Refused(400, 400, f"{what} is malformed: {len(plain)} bytes, not "
                                    f"{layout.sizeof()}")
        try:
            body = M.parse(layout, plain, what)
        except M.MessageError as exc:
            raise Refused(400, 400, str(exc)) from None
        return OpenedLoad(env, self.config.banks[env.merchant_id], dk, ticket, body,
                          _digest(plain))

    def sealed(self, o: OpenedLoad, msg_type: int, body: bytes) -> Response:
        return Response(M.seal_envelope(msg_type, o.env.merchant_id, o.env.txn_id, o.env.etsk,
                                        o.ticket.tsk, body), media_type=OCTETS)

    # --- POST /v1/load/request (steps 878-880, 895-899) ------------------------------------
    async def load_request(self, request: Request) -> Response:
        return await answer(self._load_request, request)

    async def _load_request(self, data: bytes) -> Response:
        o = self.open(data, L.LOAD_REQUEST, L.LoadRequest, "load request")
        t, r = o.ticket, o.body
        # 895: edit the request for correctness against what the bank debited
        if t.expires < time.time():
            raise Refused(400, 410, "the bank's load order has expired")
        if r.amount == 0:
            raise Refused(400, 400, "a load request is for a positive amount")
        if r.amount != t.amount:
            raise Refused(400, 402, f"the amount {r.amount} differs from the bank's "
                                    f"({t.amount}): changed in transit")
        if r.card_serial != t.card_serial:
            raise Refused(400, 400, "the bank priced this load for another card")
        if r.currency_code != t.currency_code:
            raise Refused(400, 400, "the card's currency is not the bank's")
        if r.bank_time != t.bank_time:
            raise Refused(400, 400, "the bank time stamp differs from the bank's order")
        if t.terminal_id != self.config.terminal_id:
            raise Refused(400, 400, "the bank's order names another load terminal id")
        if r.txn_type not in (P.TYPE_EP_LOAD, P.TYPE_ED_LOAD):
            raise Refused(400, 400, f"transaction type {r.txn_type:02X} is not a load")
        now = self.config.clock()
        if P.parse_bcd_date(r.expiry_date) < now.date():
            raise Refused(403, 403, "the card has expired")
        bank_hex, txn_hex = o.env.merchant_id.hex(), o.env.txn_id.hex()
        existing = await self.sql(self.db.get, bank_hex, txn_hex)
        if existing is not None:
            if existing["request_digest"] != o.digest:
                raise Refused(409, 409, "replayed load request: this transaction already has "
                                        "another request")
            if existing["state"] == "authorized" and existing["command"] is not None:
                return self.sealed(o, L.LOAD_COMMAND, existing["command"])  # a lost answer
            raise Refused(409, 409, f"the load is already {existing['state']}"
                                    + (f" ({existing['reason']})" if existing["reason"] else ""))
        try:
            row_id = await self.sql(self.db.insert, {
                "bank_id": bank_hex, "txn_id": txn_hex, "state": "received", "reason": "",
                "amount": r.amount, "currency_code": r.currency_code,
                "issuer_id": r.issuer_id.hex(), "card_serial": r.card_serial.hex(),
                "online_counter": r.online_counter, "balance": r.balance,
                "txn_type": r.txn_type, "key_version": r.key_version,
                "algorithm_id": r.algorithm_id, "random": r.random.hex(), "s1": r.s1.hex(),
                "request_digest": o.digest})
        except DuplicateError:
            raise Refused(409, 409, "replayed S1: this card signature was already "
                                    "presented") from None
        # 897-899: the HSM verifies S1 and makes S2
        date, clock = P.bcd_date(now.date()), P.bcd_time(now)
        fields = self._hsm_fields(r, r.online_counter, r.balance, r.amount, r.random, r.s1,
                                  date, clock)
        try:
            s2 = await self.hsm(lambda hsm: call(hsm, apdus.hsm_authorize_load(fields),
                                                      "HSM AUTHORIZE LOAD"),
                                     self.config.acquire_timeout)
        except Declined as exc:
            reason = ("S1 does not verify: not a genuine card, or the request was changed"
                      if exc.sw == SW.MAC_INVALID else f"the HSM refused: {exc}")
            await self.sql(self.db.advance, row_id, "received", state="refused", reason=reason)
            raise Refused(400, 401, reason) from None
        except Refused as exc:
            await self.sql(self.db.advance, row_id, "received", state="refused",
                           reason=exc.reason)
            raise
        command = M.build(L.LoadCommand, {"amount": r.amount, "date": date, "time": clock,
                                          "s2": s2})
        # this row only: a request never changes another load's state
        if not await self.sql(self.db.advance, row_id, "received", state="authorized",
                              txn_date=date.hex(), txn_time=clock.hex(), s2=s2.hex(),
                              command=command):
            raise Refused(409, 409, "the load was closed before its S2 was logged: no S2 "
                                    "is issued")
        return self.sealed(o, L.LOAD_COMMAND, command)

    def _hsm_fields(self, r: Any, counter: int, balance: int, amount: int, random: bytes,
                    s1: bytes, date: bytes, clock: bytes) -> dict[str, Any]:
        return {"issuer_id": r.issuer_id, "card_serial": r.card_serial[-8:],
                "key_version": r.key_version, "algorithm_id": r.algorithm_id,
                "balance": balance, "amount": amount, "txn_type": r.txn_type,
                "terminal_id": self.config.terminal_id, "online_counter": counter,
                "random": random, "s1": s1, "date": date, "time": clock}

    # --- POST /v1/load/result (steps 883-890 and the negative result) ----------------------
    async def load_result(self, request: Request) -> Response:
        return await answer(self._load_result, request)

    async def _load_result(self, data: bytes) -> Response:
        o = self.open(data, L.LOAD_RESULT, L.LoadResult, "load result")
        res = o.body
        if res.result not in (L.RESULT_LOADED, L.RESULT_NOT_LOADED):
            raise Refused(400, 400, f"unknown result code {res.result}")
        bank_hex, txn_hex = o.env.merchant_id.hex(), o.env.txn_id.hex()
        row = await self.sql(self.db.get, bank_hex, txn_hex)
        if row is None:
            # the request never reached us: no S2 was issued, so no card was loaded by it
            if res.result != L.RESULT_NOT_LOADED:
                raise Refused(404, 404, "no such load: a 'loaded' result needs a request first")
            row_id = await self._insert_unrequested(o)
            row = await self.sql(self.db.get, bank_hex, txn_hex)
            assert row is not None and row["id"] == row_id
        if row["answer"] is not None:
            return self._repeat(o, row)
        if row["state"] == "received":
            raise Refused(409, 409, "the load request is still with the HSM; retry",
                          {"Retry-After": "1"})
        if row["state"] == "refused":
            # no S2 ever left the server: no card can have loaded this order
            return await self._settle(o, row, "refused", L.OUTCOME_NOT_LOADED,
                                      f"not loaded: {row['reason'] or 'no S2 was issued'}",
                                      bytes(4), "no-s2")
        if row["state"] != "authorized":
            raise Refused(409, 409, f"the load is already {row['state']}")
        if res.result == L.RESULT_LOADED:
            await self._verify_tac(row, row["balance"] + row["amount"], row["online_counter"],
                                   row["amount"], row["txn_date"], row["txn_time"], res.s3,
                                   "S3 does not verify: not the card's answer to this load")
            return await self._settle(o, row, "authorized", L.OUTCOME_LOADED, "loaded",
                                      res.s3, "")
        return await self._probe(o, row, res)

    async def _probe(self, o: OpenedLoad, row: dict[str, Any], res: Any) -> Response:
        """A "not loaded" for a load that was issued S2: the HSM verifies the new zero-value S1
        and makes S2 for a zero-value load with a fresh date and time, the probe. Nothing is
        decided until the card's TAC for it comes back (``/v1/load/probe``)."""
        if row["probe_digest"] == o.digest:  # the same result again: the same probe
            return self.sealed(o, L.LOAD_PROBE, _probe_command(row))
        if res.online_counter < row["online_counter"]:
            raise Refused(400, 400, f"the card's counter {res.online_counter} is below this "
                                    f"load's ({row['online_counter']}): not the card's now")
        now = self.config.clock()
        date, clock = P.bcd_date(now.date()), P.bcd_time(now)
        fields = self._hsm_fields(_RowRequest(row), res.online_counter, res.balance, 0,
                                  res.random, res.s1, date, clock)
        try:
            s2 = await self.hsm(lambda hsm: call(hsm, apdus.hsm_authorize_load(fields),
                                                 "HSM AUTHORIZE LOAD (probe)"),
                                self.config.acquire_timeout)
        except Declined as exc:
            if exc.sw == SW.MAC_INVALID:
                raise Refused(400, 401, "the zero-value S1 does not verify: not the card's, "
                                        "or changed; nothing was recorded") from None
            raise Refused(400, 400, f"the HSM refused the zero-value S1: {exc}") from None
        probe = {"probe_counter": res.online_counter, "probe_balance": res.balance,
                 "probe_random": res.random.hex(), "probe_s1": res.s1.hex(),
                 "probe_date": date.hex(), "probe_time": clock.hex(), "probe_s2": s2.hex()}
        if not await self.sql(self.db.record_probe, row["id"], o.digest, **probe):
            return await self._lost_race(o, row["id"], probe=True)
        return self.sealed(o, L.LOAD_PROBE, _probe_command(probe))

    # --- POST /v1/load/probe: the card's TAC for the probe, and the decision -----------------
    async def load_probe(self, request: Request) -> Response:
        return await answer(self._load_probe, request)

    async def _load_probe(self, data: bytes) -> Response:
        o = self.open(data, L.LOAD_PROBE_RESULT, L.LoadProbeResult, "probe result")
        res = o.body
        row = await self.sql(self.db.get, o.env.merchant_id.hex(), o.env.txn_id.hex())
        if row is None:
            raise Refused(404, 404, "no such load")
        if row["answer"] is not None:
            return self._repeat(o, row)
        if row["state"] != "authorized":
            raise Refused(409, 409, f"the load is {row['state']}: no probe to check")
        if row["probe_s2"] is None:
            raise Refused(409, 409, "no probe was issued for this load: report 'not loaded' "
                                    "with a new zero-value S1 first")
        if res.card_sw != SW.OK:
            raise Refused(400, 400, f"the card refused the probe ({res.card_sw:04X}): report "
                                    "'not loaded' with a new zero-value S1 for a new probe")
        n, c = int(row["online_counter"]), int(row["probe_counter"])
        await self._verify_tac(row, row["probe_balance"], c, 0, row["probe_date"],
                               row["probe_time"], res.s3, "the probe's S3 does not verify: not "
                               "the card's answer to this probe")
        used_by: dict[str, Any] | None = None
        if c == n:
            evidence = "probe"
            reason = f"not loaded: the card spent its counter {n} on the zero-value probe"
        else:
            used_by = await self.sql(self.db.loaded_at, row["card_serial"], n, row["id"])
            if used_by is None:
                raise Refused(409, 409, f"undecided: the card's counter has moved past this "
                                        f"load's ({c} > {n}); send the card's proof of this "
                                        f"load (GET TRANSACTION PROVE) or nothing is refunded")
            evidence = f"counter-used:{used_by['txn_id']}"
            reason = (f"not loaded: the card's counter {n} was used by load "
                      f"{used_by['txn_id']}, proven loaded")
        answer_bytes = self._answer(o, row, L.OUTCOME_NOT_LOADED, reason, bytes(4))
        if not await self.sql(self.db.close_by_probe, row["id"], row["probe_s2"],
                              None if used_by is None else int(used_by["id"]),
                              reason=reason[:200], evidence=evidence, result_digest=o.digest,
                              answer=answer_bytes):
            return await self._lost_race(o, row["id"])
        return self.sealed(o, L.LOAD_ANSWER, answer_bytes)

    # --- shared steps -----------------------------------------------------------------------
    async def _verify_tac(self, row: dict[str, Any], balance_after: int, counter: int,
                          amount: int, date_hex: str, time_hex: str, s3: bytes,
                          wrong: str) -> None:
        """The HSM checks a card's load TAC (S3) over these fields; not the card's is 401."""
        fields = {"issuer_id": bytes.fromhex(row["issuer_id"]),
                  "card_serial": bytes.fromhex(row["card_serial"])[-8:],
                  "balance_after": balance_after, "online_counter": counter, "amount": amount,
                  "txn_type": row["txn_type"], "terminal_id": self.config.terminal_id,
                  "date": bytes.fromhex(date_hex), "time": bytes.fromhex(time_hex), "s3": s3}
        checked = await self.hsm(lambda hsm: hsm.exchange(apdus.hsm_verify_load_tac(fields)),
                                 self.config.acquire_timeout)
        if checked.sw == SW.MAC_INVALID:
            raise Refused(400, 401, wrong)
        if not checked.ok:
            raise Refused(400, 400, f"the HSM refused S3: {checked.sw:04X}")

    def _repeat(self, o: OpenedLoad, row: dict[str, Any]) -> Response:
        """A decided load: the same message again gets the same answer; any other is 409."""
        if row["result_digest"] == o.digest:
            return self.sealed(o, L.LOAD_ANSWER, row["answer"])
        raise Refused(409, 409, f"replayed load result: the load is already {row['state']}")

    async def _lost_race(self, o: OpenedLoad, row_id: int, probe: bool = False) -> Response:
        """Another request changed the row first: answer what it recorded, or 409."""
        row = await self.sql(self.db.get, o.env.merchant_id.hex(), o.env.txn_id.hex())
        assert row is not None and row["id"] == row_id
        if row["answer"] is not None:
            return self._repeat(o, row)
        if probe and row["probe_digest"] == o.digest:
            return self.sealed(o, L.LOAD_PROBE, _probe_command(row))
        raise Refused(409, 409, f"the load changed meanwhile (now {row['state']}); send the "
                                "card's latest answer again")

    async def _insert_unrequested(self, o: OpenedLoad) -> int:
        t = o.ticket
        try:
            return await self.sql(self.db.insert, {
                "bank_id": o.env.merchant_id.hex(), "txn_id": o.env.txn_id.hex(),
                "state": "refused", "reason": "never requested: no S2 was issued",
                "amount": t.amount, "currency_code": t.currency_code,
                "card_serial": t.card_serial.hex()})
        except DuplicateError:  # a concurrent retry (or the request itself) inserted it
            row = await self.sql(self.db.get, o.env.merchant_id.hex(), o.env.txn_id.hex())
            assert row is not None
            return int(row["id"])

    def _answer(self, o: OpenedLoad, row: dict[str, Any], outcome: int, reason: str,
                s3: bytes) -> bytes:
        """The LoadAnswer, carrying the confirmation sealed for the bank."""
        confirmation = secure.seal(o.dk, M.build(L.LoadConfirmation, {
            "version": M.VERSION, "outcome": outcome, "bank_id": o.env.merchant_id,
            "txn_id": o.env.txn_id, "amount": row["amount"],
            "card_serial": bytes.fromhex(row["card_serial"]),
            "online_counter": row["online_counter"] or 0, "s3": s3, "reason": reason[:200]}),
            L.confirmation_aad(o.env.merchant_id, o.env.txn_id))
        return M.build(L.LoadAnswer, {"outcome": outcome, "reason": reason[:200],
                                      "confirmation": confirmation})

    async def _settle(self, o: OpenedLoad, row: dict[str, Any], expect: str, outcome: int,
                      reason: str, s3: bytes, evidence: str) -> Response:
        """Decide the load: one compare-and-set from ``expect``; a lost race answers what the
        winner recorded (the same message) or 409."""
        answer_bytes = self._answer(o, row, outcome, reason, s3)
        loaded = outcome == L.OUTCOME_LOADED
        try:
            won = await self.sql(self.db.advance, row["id"], expect,
                                 state="loaded" if loaded else "not_loaded",
                                 reason=reason[:200], evidence=evidence,
                                 s3=s3.hex() if loaded else None, result_digest=o.digest,
                                 answer=answer_bytes)
        except DuplicateError:
            raise Refused(409, 409, "this card counter was already loaded once") from None
        if not won:
            return await self._lost_race(o, row["id"])
        return self.sealed(o, L.LOAD_ANSWER, answer_bytes)

    # --- GET /v1/health ---------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"hsms": len(self.hsms.members),
                             "terminal_id": self.config.terminal_id.hex().upper()})

    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            await asyncio.to_thread(self.db.recover)
            await self.hsms.start()
            try:
                yield
            finally:
                await asyncio.to_thread(self.hsms.close)

        return Starlette(routes=[
            Route("/v1/load/request", self.load_request, methods=["POST"]),
            Route("/v1/load/result", self.load_result, methods=["POST"]),
            Route("/v1/load/probe", self.load_probe, methods=["POST"]),
            Route("/v1/health", self.health, methods=["GET"]),
        ], lifespan=lifespan, exception_handlers=dict(STORAGE_ERROR_HANDLERS))


class _RowRequest:
    """The parts of the original load request the HSM needs, as the log kept them."""

    def __init__(self, row: dict[str, Any]) -> None:
        self.issuer_id = bytes.fromhex(row["issuer_id"])
        self.card_serial = bytes.fromhex(row["card_serial"])
        self.key_version = int(row["key_version"])
        self.algorithm_id = int(row["algorithm_id"])
        self.txn_type = int(row["txn_type"])


def _probe_command(probe: dict[str, Any]) -> bytes:
    """The LOAD_PROBE body for a recorded probe: a zero-value load command."""
    return M.build(L.LoadCommand, {"amount": 0, "date": bytes.fromhex(probe["probe_date"]),
                                   "time": bytes.fromhex(probe["probe_time"]),
                                   "s2": bytes.fromhex(probe["probe_s2"])})
