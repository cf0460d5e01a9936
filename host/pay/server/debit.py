"""``POST /v1/debit-response`` (seed FIG. 5 and 6): the card's answer to the debit command in,
the payment result (debit results C and M) out.

Only the card's MAC2 moves the payment: the server compares it (in constant time) with the MAC2
the PSAM expects *before* anything goes to the PSAM; in FIG. 5 the held PSAM then checks it again
and completes its record with the card's TAC (CREDIT SAM FOR PURCHASE). A card status other than
9000 is the client's unauthenticated report: recorded, it may free a FIG. 5 PSAM early and moves
no state. The same debit response again gets the same result; another one for a finished payment
is refused (409).
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from ....protocols import messages as M
from ....protocols import secure
from ....protocols import sw as SW
from ...kit.db import DuplicateError
from ...kit.http import Refused, request_digest
from ...kit.request_log import note
from ...terminal import apdus
from .envelope import Opened, debit_result, open_message, result_m, sealed

if TYPE_CHECKING:
    from .app import PaymentServer

log = logging.getLogger(__name__)


async def answer_debit_response(server: PaymentServer, data: bytes) -> Response:
    """The payment result for a debit response (FIG. 5 and 6)."""
    o, r = open_message(server.config.merchants, data, M.DEBIT_RESPONSE, M.DebitResponse,
                        "debit response")
    response_digest = request_digest(o.plaintext)
    if o.ticket.variant == M.FIG6_SERVER_COMPARES:  # no PSAM held: one step confirms
        row, body = await _confirm_fig6(server, o, r, response_digest)
        if body is not None:
            note(outcome="confirmed")
            return sealed(o, M.PAYMENT_RESULT, body)
    else:
        row = await server.sql(server.db.get, o.env.merchant_id.hex(), o.env.txn_id.hex())
    if row is None:
        raise Refused(404, 404, "no such transaction")
    if row["state"] != "issued":
        return _finished(o, row, response_digest)
    row_id = row["id"]
    if r.card_sw != SW.OK:
        # what the client says the card answered: not authenticated. It frees a FIG. 5
        # PSAM early and is recorded; it moves no state (a genuine MAC2 later still counts)
        server.holds.release(row_id)
        report = f"card refused: {r.card_sw:04X} ({SW.meaning(r.card_sw)})"
        await server.sql(server.db.note, row_id, "issued", report)
        note(outcome="card refused")
        return sealed(o, M.PAYMENT_RESULT, _payment_result(
            o, row, M.STATUS_CARD_REFUSED, f"the card refused the debit: {r.card_sw:04X} "
            f"({SW.meaning(r.card_sw)})", bytes(4)))
    if not hmac.compare_digest(r.mac2, bytes.fromhex(row["expected_mac2"])):
        await server.sql(server.db.note, row_id, "issued", "a MAC2 that is not the expected one")
        raise Refused(400, 401, "the card's MAC2 is not the one the PSAM expected: not "
                                "confirmed, nothing changed")
    # the card's MAC2 is authentic. FIG. 5: the PSAM completes its record with the TAC
    hold = server.holds.take(row_id)
    if hold is not None:
        try:
            answer = await server.pool.run(hold.psam, lambda reader: reader.exchange(
                apdus.credit_sam_for_purchase(r.mac2, r.tac)))
            if not answer.ok:  # cannot be after our comparison: recorded for the operator
                log.warning("PSAM %s answered %04X to CREDIT SAM for a MAC2 the server "
                            "verified (row %d)", hold.psam.psam_id.hex(), answer.sw, row_id)
        finally:
            server.holds.end(hold)
    auth = o.ticket.purpose == M.PURPOSE_AUTHENTICATION
    status = M.STATUS_AUTHENTICATED if auth else M.STATUS_OK
    reason = "authentication OK" if auth else "paid"
    body = _payment_result(o, row, status, reason, r.tac)
    try:
        won = await server.sql(server.db.advance, row_id, "issued", state="confirmed",
                               reason=reason, card_mac2=r.mac2.hex(), tac=r.tac.hex(),
                               response_digest=response_digest, result=body)
    except DuplicateError:
        raise Refused(409, 409, "another confirmed payment already holds this card "
                                "counter") from None
    if not won:  # another request confirmed it first: its answer, if it is this one
        row = await server.sql(server.db.get, o.env.merchant_id.hex(), o.env.txn_id.hex())
        assert row is not None
        return _finished(o, row, response_digest)
    note(outcome="confirmed")
    return sealed(o, M.PAYMENT_RESULT, body)


async def _confirm_fig6(server: PaymentServer, o: Opened, r: Any, response_digest: str,
                        ) -> tuple[dict[str, Any] | None, bytes | None]:
    """FIG. 6 in one step: the row read and, if it is a FIG. 6 payment waiting for this
    card's MAC2 and the MAC2 is the expected one, confirmed: (row, its result). Otherwise
    (the row as it is now, None), for the steps of every variant."""
    auth = o.ticket.purpose == M.PURPOSE_AUTHENTICATION
    reason = "authentication OK" if auth else "paid"
    made: list[bytes] = []

    def confirm(row: dict[str, Any]) -> dict[str, Any] | None:
        if row["variant"] != M.FIG6_SERVER_COMPARES or r.card_sw != SW.OK \
                or not hmac.compare_digest(r.mac2, bytes.fromhex(row["expected_mac2"])):
            return None
        made.append(_payment_result(o, row, M.STATUS_AUTHENTICATED if auth else M.STATUS_OK,
                                    reason, r.tac))
        return {"state": "confirmed", "reason": reason, "card_mac2": r.mac2.hex(),
                "tac": r.tac.hex(), "response_digest": response_digest, "result": made[-1]}

    try:
        row, won = await server.sql(server.db.take, o.env.merchant_id.hex(),
                                    o.env.txn_id.hex(), "issued", confirm)
    except DuplicateError:
        raise Refused(409, 409, "another confirmed payment already holds this card "
                                "counter") from None
    return row, made[-1] if won else None


def _payment_result(o: Opened, row: dict[str, Any], status: int, reason: str,
                    tac: bytes) -> bytes:
    """A PaymentResult: debit result C under the TSK (for the client) and M under DK."""
    result = debit_result(o, row, status, reason, tac)
    return M.build(M.PaymentResult, {
        "result_c": secure.seal(o.ticket.tsk, M.build(M.DebitResult, result),
                                M.result_c_aad(o.env.merchant_id, o.env.txn_id)),
        "result_m": result_m(o, result)})


def _finished(o: Opened, row: dict[str, Any], response_digest: str) -> Response:
    """A debit response for a transaction no longer waiting for one."""
    if row["state"] == "confirmed" and row["result"] is not None:
        if hmac.compare_digest(row["response_digest"] or "", response_digest):
            note(outcome="the same result again")
            return sealed(o, M.PAYMENT_RESULT, row["result"])  # an idempotent retry
        raise Refused(409, 409, "replayed debit response: the transaction is already "
                                "confirmed")
    raise Refused(409, 409, f"the transaction is {row['state']}"
                            + (f" ({row['reason']})" if row["reason"] else ""))
