"""``POST /v1/proof`` (seed FIG. 7 and 8, after the goods): the card's MAC2 and TAC of an
early-released purchase (envelope type 5, a DebitResponse body), answered 204.

Off the purchase's critical path (the goods are already released): the proof confirms the
payment so clearing can check the card's TAC. A MAC2 that is not the expected one is refused
(400, code 401); the same proof again is answered 204 again.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from ....protocols import messages as M
from ....protocols import sw as SW
from ...kit.db import DuplicateError
from ...kit.http import Refused
from ...kit.request_log import note
from .envelope import open_message

if TYPE_CHECKING:
    from .app import PaymentServer


async def take_proof(server: PaymentServer, data: bytes) -> Response:
    """The card's MAC2 and TAC of an early-released purchase, so clearing can check the
    card's TAC. Off the purchase's critical path: the goods are already released."""
    o, r = open_message(server.config.merchants, data, M.DEBIT_PROOF, M.DebitResponse,
                        "debit proof")
    def genuine(row: dict[str, Any]) -> dict[str, Any] | None:
        """The confirmation, for a MAC2 that is the one the PSAM expected (else nothing)."""
        if r.card_sw != SW.OK or not hmac.compare_digest(
                r.mac2, bytes.fromhex(row["expected_mac2"])):
            return None
        return {"state": "confirmed", "card_mac2": r.mac2.hex(), "tac": r.tac.hex(),
                "reason": "paid"}

    try:  # one step: read the row and, if released and the MAC2 is genuine, confirm it
        row, won = await server.sql(server.db.take, o.env.merchant_id.hex(),
                                    o.env.txn_id.hex(), "released", genuine)
    except DuplicateError:
        raise Refused(409, 409, "another confirmed payment already holds this card "
                                "counter") from None
    if won:
        note(outcome="confirmed")
        return Response(b"", status_code=204)
    if row is None:
        raise Refused(404, 404, "no such transaction")
    if row["state"] == "released":  # still released: the MAC2 is not the expected one
        raise Refused(400, 401, "the card's MAC2 is not the one the PSAM expected")
    if row["state"] == "confirmed" and row["tac"] == r.tac.hex() \
            and row["card_mac2"] == r.mac2.hex():
        note(outcome="the same proof again")
        return Response(b"", status_code=204)  # an idempotent retry
    raise Refused(409, 409, f"the transaction is {row['state']}")
