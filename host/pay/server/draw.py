"""``POST /v1/draw`` (seed FIG. 4-8): a sealed draw request in, a sealed debit command out.

The draw is checked against the merchant's order, recorded (state ``received``), and a free PSAM
runs INIT SAM FOR PURCHASE for it: MAC1, and the MAC2 the PSAM expects from the card. FIG. 5 and
6 answer the debit command alone (state ``issued``; in FIG. 5 the PSAM is held for the card's
answer); FIG. 7 and 8 are released early (state ``released``): the command carries the expected
MAC2 (FIG. 7, for the client) or that MAC2 sealed for the merchant (FIG. 8), and debit result M.

The card's UID, when the draw carries one (an issuer whose MAC scheme puts it into MAC1, e.g.
``changsha-metro``), follows INIT SAM's data as at a local terminal. Nothing of the draw is
trusted (the card is not authenticated yet): its serial, counter, expiry and balance are
recorded, and a draw never voids, fails or blocks another payment. The same draw again gets the
same debit command while the debit is open; another draw for the transaction is refused (409).
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from ....protocols import messages as M
from ....protocols import purse as P
from ....protocols import secure
from ....protocols import sw as SW
from ....reader import Reader
from ...kit.db import DuplicateError
from ...kit.http import Refused, request_digest
from ...kit.reader_pool import handed_back
from ...kit.request_log import note
from ...terminal import apdus
from ...terminal.purse import Declined, call
from .envelope import Opened, debit_result, open_message, result_m, sealed
from .leases import Fence
from .psam_pool import PooledPsam, PoolExhausted

if TYPE_CHECKING:
    from .app import PaymentServer


async def answer_draw(server: PaymentServer, data: bytes, client: str = "?") -> Response:
    """The debit command for a draw request from ``client`` (its address, for the FIG. 5
    bounds)."""
    o, d = open_message(server.config.merchants, data, M.DRAW_REQUEST, M.DrawRequest,
                        "draw request")
    if server.leases is not None and not server.pool.psams:   # nginx tries the next node
        raise Refused(503, 503, "this node holds no PSAM now; retry", {"Retry-After": "1"})
    t = o.ticket
    if d.amount != t.amount:
        raise Refused(400, 402, f"the amount {d.amount} differs from the merchant's order "
                                f"({t.amount}): changed in transit")
    if d.currency_code != t.currency_code:
        raise Refused(400, 400, "the card's currency is not the order's")
    if t.terminal_id != (o.merchant.terminal_id or server.pool.terminal_id):
        raise Refused(400, 400, "the order names another payment terminal id")
    if d.txn_type not in (P.TYPE_EP_PURCHASE, P.TYPE_ED_PURCHASE):
        raise Refused(400, 400, f"transaction type {d.txn_type:02X} is not a purchase")
    if len(d.uid) not in (0, 9):
        raise Refused(400, 400, f"the card UID has 9 bytes (or none), not {len(d.uid)}")
    try:
        expiry = P.parse_bcd_date(d.expiry_date)
    except ValueError:
        raise Refused(400, 400, "the card's expiry date is not a date") from None
    if server.config.clock().date() > expiry:
        raise Refused(403, 403, f"the card expired on {expiry.isoformat()}")
    merchant_hex, txn_hex = o.env.merchant_id.hex(), o.env.txn_id.hex()
    draw_digest = request_digest(o.plaintext)
    values = {"variant": t.variant, "amount": t.amount, "currency_code": t.currency_code,
              "card_serial": d.card_serial.hex(), "card_counter": d.offline_counter,
              "draw_digest": draw_digest, "node": server.leases.node if server.leases else None}
    record = {"merchant_id": merchant_hex, "txn_id": txn_hex, **values}
    fig5 = t.variant == M.FIG5_PSAM_COMPARES
    try:  # one step: the transaction's row, or else the draw recorded (FIG. 5: its hold first)
        existing, row_id = await server.sql(server.db.get_or_insert, record, insert=not fig5)
    except DuplicateError:  # the same transaction, raced: one of us recorded it
        return await _raced(server, o, draw_digest)
    if existing is not None:
        again = _same_draw(o, existing, draw_digest)
        if again is not None:
            return again
    if fig5:
        server.holds.reserve(o.env.merchant_id, client)
    held = False
    try:
        if existing is not None:  # busy before: this same draw may take it again, once
            row_id = existing["id"]
            if not await server.sql(server.db.advance, row_id, "busy", state="received",
                                    reason="", **values):
                raise _draw_conflict(await server.sql(server.db.get, merchant_hex, txn_hex))
        elif row_id is None:  # FIG. 5: recorded once its hold is reserved
            try:
                row_id = await server.sql(server.db.insert_received, record)
            except DuplicateError:
                return await _raced(server, o, draw_digest)
        response, held = await _issue(server, o, d, row_id, client)
        return response
    finally:
        if fig5 and not held:
            server.holds.unreserve(o.env.merchant_id, client)


async def _raced(server: PaymentServer, o: Opened, draw_digest: str) -> Response:
    """Another request recorded a draw for the same transaction first: the same debit command
    if it is this draw and its debit is open, else 409."""
    row = await server.sql(server.db.get, o.env.merchant_id.hex(), o.env.txn_id.hex())
    again = _same_draw(o, row, draw_digest) if row else None
    if again is not None:
        return again
    raise _draw_conflict(row)


def _same_draw(o: Opened, row: dict[str, Any], draw_digest: str) -> Response | None:
    """A draw for a transaction that already has one: the same debit command again if it
    is the same draw and the debit is still open (its answer was lost); None if the row is
    ``busy`` (this draw may retry); else 409."""
    if not hmac.compare_digest(row["draw_digest"], draw_digest):
        raise Refused(409, 409, "replayed draw request: this transaction already has "
                                "another draw")
    if row["debit_command"] is not None and row["state"] in ("issued", "released"):
        note(outcome="the same debit command again")
        return sealed(o, M.DEBIT_COMMAND, row["debit_command"])
    if row["state"] == "busy":
        return None
    raise _draw_conflict(row)


def _draw_conflict(row: dict[str, Any] | None) -> Refused:
    if row is None:
        return Refused(409, 409, "the transaction changed meanwhile; retry")
    if row["state"] in ("received", "busy"):
        return Refused(409, 409, "this draw is being processed by another request; retry",
                       {"Retry-After": "1"})
    return Refused(409, 409, f"replayed draw request: the transaction is {row['state']}"
                             + (f" ({row['reason']})" if row["reason"] else ""))


async def _issue(server: PaymentServer, o: Opened, d: Any, row_id: int,
                 client: str) -> tuple[Response, bool]:
    """INIT SAM FOR PURCHASE on a free PSAM for a recorded draw (state ``received``): the
    debit command, and whether the PSAM is now held for the card's answer (FIG. 5)."""
    t = o.ticket
    try:
        psam = await server.pool.acquire_for(t.terminal_id, server.config.acquire_timeout)
    except PoolExhausted as exc:
        await server.sql(server.db.advance, row_id, "received", state="busy", reason=str(exc))
        raise Refused(503, 503, f"all PSAMs are busy ({exc}); retry",
                      {"Retry-After": "1"}) from None
    held = False
    try:
        now = server.config.clock()
        date, clock_time = P.bcd_date(now.date()), P.bcd_time(now)
        early = t.variant != M.FIG5_PSAM_COMPARES
        fields = {"random": d.random, "offline_counter": d.offline_counter,
                  "amount": d.amount, "txn_type": d.txn_type, "date": date,
                  "time": clock_time, "key_version": d.key_version,
                  "algorithm_id": d.algorithm_id, "card_serial": d.card_serial[-8:]}

        def issue(reader: Reader) -> tuple[int, bytes, bytes]:
            answer = call(reader, apdus.init_sam_for_purchase(fields, early=early, uid=d.uid),
                          "INIT SAM FOR PURCHASE")
            if early:
                a = P.InitSamAnswerEarly.parse(answer)
                return a.terminal_txn_number, a.mac1, a.expected_mac2
            a = P.InitSamAnswer.parse(answer)
            prev = P.PreviousSignature.parse(call(reader, apdus.sam_previous_signature(),
                                                  "PSAM PREVIOUS SIGNATURE"))
            return a.terminal_txn_number, a.mac1, prev.expected_mac2

        fence = server.fence(psam)

        def command_for(ttn: int, mac1: bytes, expected: bytes) -> tuple[bytes, dict[str, Any]]:
            """The debit command, and the row's values once it is issued (or released)."""
            row = {"psam_id": psam.psam_id.hex(), "ttn": ttn,
                   "card_serial": d.card_serial.hex(), "card_counter": d.offline_counter}
            sealed_expected = result = b""
            if t.variant == M.FIG8_MERCHANT_COMPARES:
                sealed_expected = secure.seal(o.dk, expected, M.expected_mac2_aad(
                    o.env.merchant_id, o.env.txn_id))
            if t.variant in (M.FIG7_CLIENT_COMPARES, M.FIG8_MERCHANT_COMPARES):
                status = M.STATUS_AUTHENTICATED if t.purpose == M.PURPOSE_AUTHENTICATION \
                    else M.STATUS_OK
                result = result_m(o, debit_result(o, row, status, "issued"))
            command = M.build(M.DebitCommand, {
                "psam_id": psam.psam_id, "terminal_id": psam.terminal_id,
                "terminal_txn_number": ttn, "date": date, "time": clock_time, "mac1": mac1,
                "amount": d.amount,
                "expected_mac2": expected if t.variant == M.FIG7_CLIENT_COMPARES else bytes(4),
                "sealed_expected_mac2": sealed_expected, "result_m": result})
            state = "issued" if t.variant == M.FIG6_SERVER_COMPARES else "released"
            return command, {"state": state, "psam_id": psam.psam_id.hex(), "ttn": ttn,
                             "txn_date": date.hex(), "txn_time": clock_time.hex(),
                             "mac1": mac1.hex(), "expected_mac2": expected.hex(),
                             "debit_command": command}

        try:
            if t.variant != M.FIG5_PSAM_COMPARES:   # no hold: INIT SAM and its step at once
                command, advanced = await _issue_and_record(server, psam, issue, command_for,
                                                            row_id, fence)
                response = await _recorded(server, row_id, fence, command, advanced, o)
                note(outcome="issued" if t.variant == M.FIG6_SERVER_COMPARES else "released")
                return response, False
            ttn, mac1, expected = await server.pool.run(psam, issue)
        except Declined as exc:
            blocked = exc.sw == SW.CONDITIONS_NOT_SATISFIED
            reason = ("the card is blocked at this payment server" if blocked
                      else f"the PSAM refused: {exc}")
            await server.sql(server.db.advance, row_id, "received", server.fence(psam),
                             state="failed", reason=reason)
            raise Refused(403 if blocked else 400, 403, reason) from None
        command, values = command_for(ttn, mac1, expected)
        values["state"] = "issued"
        # held before the row says "issued": a debit response that reads "issued" always
        # finds its PSAM
        server.holds.hold(row_id, psam, o.env.merchant_id, client)
        held = True
        if not await server.sql(server.db.advance, row_id, "received", fence, **values):
            return await _recorded(server, row_id, fence, command, False, o), held
        note(outcome="held")
        return sealed(o, M.DEBIT_COMMAND, command), held
    except BaseException:
        if held:
            server.holds.take(row_id)
            held = False
        raise
    finally:
        if not held:
            server.pool.release(psam)


async def _recorded(server: PaymentServer, row_id: int, fence: Fence | None, command: bytes,
                    advanced: bool, o: Opened) -> Response:
    """The debit command once its row says so; if another request changed the row first, or
    the lease was lost (the row is voided then: the command is never sent), 409."""
    if not advanced:
        if fence is not None:
            await server.sql(server.db.advance, row_id, "received", state="voided",
                             reason="this node lost the PSAM's lease")
        raise Refused(409, 409, "the transaction changed meanwhile; retry")
    return sealed(o, M.DEBIT_COMMAND, command)


async def _issue_and_record(server: PaymentServer, psam: PooledPsam,
                            issue: Callable[[Reader], tuple[int, bytes, bytes]],
                            command_for: Callable[[int, bytes, bytes],
                                                  tuple[bytes, dict[str, Any]]],
                            row_id: int, fence: Fence | None) -> tuple[bytes, bool]:
    """INIT SAM on the PSAM's thread, which then gives the row's step to the writer itself:
    the loop waits once, for the step's commit (one hand-off less than PSAM, loop, writer);
    the answer still leaves only after that commit. (the command, whether the row advanced);
    a PSAM refusal is :class:`Declined`, as from :meth:`PsamPool.run`."""
    final: Future[tuple[bytes, bool]] = Future()

    def settle(step: Future[bool], command: bytes) -> None:
        with contextlib.suppress(InvalidStateError):   # the caller went away (cancelled)
            if (exc := step.exception()) is not None:
                final.set_exception(exc)
            else:
                final.set_result((command, step.result()))

    def work(reader: Reader) -> None:
        try:
            command, values = command_for(*issue(reader))
            step = _submit(server, server.db.advance, row_id, "received", fence, **values)
        except BaseException as exc:
            with contextlib.suppress(InvalidStateError):
                final.set_exception(exc)
            return
        step.add_done_callback(lambda f: settle(f, command))

    psam.executor.submit(work, psam.reader)
    return await handed_back(final)


def _submit(server: PaymentServer, fn: Callable[..., bool], *args: Any,
            **kwargs: Any) -> Future[bool]:
    """A step given from a PSAM's thread: to the SQLite writer (group commit), or run here on
    a database that takes steps from any thread (PostgreSQL)."""
    if server.sql.executor is not None:
        return server.sql.executor.submit(fn, *args, **kwargs)
    done: Future[bool] = Future()
    try:
        done.set_result(fn(*args, **kwargs))
    except Exception as exc:
        done.set_exception(exc)
    return done
