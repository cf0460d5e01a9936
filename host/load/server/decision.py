"""How a load is decided and answered: the LoadAnswer, and the confirmation the client carries
to the bank (seed step 891).

A decision is one compare-and-set in the load log, from the state the deciding step read; the
LoadAnswer carries a LoadConfirmation sealed under the transaction's DK for the bank. A decided
load answers the same message again with the same bytes and any other message with 409; a step
that lost a race to another answers what the winner recorded, or 409.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from ....protocols import loadmsg as L
from ....protocols import messages as M
from ....protocols import secure
from ...kit.db import DuplicateError
from ...kit.http import Refused
from .envelope import OpenedLoad, sealed

if TYPE_CHECKING:
    from .app import LoadServer


def load_answer(o: OpenedLoad, row: dict[str, Any], outcome: int, reason: str,
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


def probe_command(probe: dict[str, Any]) -> bytes:
    """The LOAD_PROBE body for a recorded probe: a zero-value load command."""
    return M.build(L.LoadCommand, {"amount": 0, "date": bytes.fromhex(probe["probe_date"]),
                                   "time": bytes.fromhex(probe["probe_time"]),
                                   "s2": bytes.fromhex(probe["probe_s2"])})


async def settle(server: LoadServer, o: OpenedLoad, row: dict[str, Any], expect: str,
                 outcome: int, reason: str, s3: bytes, evidence: str) -> Response:
    """Decide the load: one compare-and-set from ``expect``; a lost race answers what the
    winner recorded (the same message) or 409."""
    answer_bytes = load_answer(o, row, outcome, reason, s3)
    loaded = outcome == L.OUTCOME_LOADED
    try:
        won = await server.sql(server.db.advance, row["id"], expect,
                               state="loaded" if loaded else "not_loaded",
                               reason=reason[:200], evidence=evidence,
                               s3=s3.hex() if loaded else None, result_digest=o.digest,
                               answer=answer_bytes)
    except DuplicateError:
        raise Refused(409, 409, "this card counter was already loaded once") from None
    if not won:
        return await lost_race(server, o, row["id"])
    return sealed(o, L.LOAD_ANSWER, answer_bytes)


def repeat(o: OpenedLoad, row: dict[str, Any]) -> Response:
    """A decided load: the same message again gets the same answer; any other is 409."""
    if row["result_digest"] == o.digest:
        return sealed(o, L.LOAD_ANSWER, row["answer"])
    raise Refused(409, 409, f"replayed load result: the load is already {row['state']}")


async def lost_race(server: LoadServer, o: OpenedLoad, row_id: int,
                    probe: bool = False) -> Response:
    """Another request changed the row first: answer what it recorded, or 409."""
    row = await server.sql(server.db.get, o.env.merchant_id.hex(), o.env.txn_id.hex())
    assert row is not None and row["id"] == row_id
    if row["answer"] is not None:
        return repeat(o, row)
    if probe and row["probe_digest"] == o.digest:
        return sealed(o, L.LOAD_PROBE, probe_command(row))
    raise Refused(409, 409, f"the load changed meanwhile (now {row['state']}); send the "
                            "card's latest answer again")
