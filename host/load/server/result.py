"""``POST /v1/load/result``: the card's answer to the load command (seed steps 883-890),
and the negative result.

LOAD_RESULT "loaded" carries S3, which the HSM verifies for this load's own fields: the only
way to ``loaded``. "Not loaded" carries a new zero-value S1: for a load no S2 ever left the
server for (refused, or never requested) it closes the load ``not_loaded`` at once (evidence
``no-s2``); for a load that was issued S2 it starts the zero-value probe (:mod:`.probe`) and
nothing is decided yet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.responses import Response

from ....protocols import loadmsg as L
from ...kit.db import DuplicateError
from ...kit.http import Refused
from .decision import repeat, settle
from .envelope import OpenedLoad, open_message
from .hsm_pool import verify_tac
from .probe import issue_probe

if TYPE_CHECKING:
    from .app import LoadServer


async def load_result(server: LoadServer, data: bytes) -> Response:
    """A LOAD_RESULT in: "loaded" with the card's S3 (verified by the HSM) or "not loaded" with a
    zero-value S1, which starts the probe; the LOAD_ANSWER (or the LOAD_PROBE) out."""
    o = open_message(server.config.banks, data, L.LOAD_RESULT, L.LoadResult, "load result")
    res = o.body
    if res.result not in (L.RESULT_LOADED, L.RESULT_NOT_LOADED):
        raise Refused(400, 400, f"unknown result code {res.result}")
    bank_hex, txn_hex = o.env.merchant_id.hex(), o.env.txn_id.hex()
    row = await server.sql(server.db.get, bank_hex, txn_hex)
    if row is None:
        # the request never reached us: no S2 was issued, so no card was loaded by it
        if res.result != L.RESULT_NOT_LOADED:
            raise Refused(404, 404, "no such load: a 'loaded' result needs a request first")
        row_id = await _insert_unrequested(server, o)
        row = await server.sql(server.db.get, bank_hex, txn_hex)
        assert row is not None and row["id"] == row_id
    if row["answer"] is not None:
        return repeat(o, row)
    if row["state"] == "received":
        raise Refused(409, 409, "the load request is still with the HSM; retry",
                      {"Retry-After": "1"})
    if row["state"] == "refused":
        # no S2 ever left the server: no card can have loaded this order
        return await settle(server, o, row, "refused", L.OUTCOME_NOT_LOADED,
                            f"not loaded: {row['reason'] or 'no S2 was issued'}",
                            bytes(4), "no-s2")
    if row["state"] != "authorized":
        raise Refused(409, 409, f"the load is already {row['state']}")
    if res.result == L.RESULT_LOADED:
        await verify_tac(server, row, row["balance"] + row["amount"], row["online_counter"],
                         row["amount"], row["txn_date"], row["txn_time"], res.s3,
                         "S3 does not verify: not the card's answer to this load")
        return await settle(server, o, row, "authorized", L.OUTCOME_LOADED, "loaded",
                            res.s3, "")
    return await issue_probe(server, o, row, res)


async def _insert_unrequested(server: LoadServer, o: OpenedLoad) -> int:
    """Log a load whose request never arrived as ``refused`` (no S2 was issued); the row id."""
    t = o.ticket
    try:
        return await server.sql(server.db.insert, {
            "bank_id": o.env.merchant_id.hex(), "txn_id": o.env.txn_id.hex(),
            "state": "refused", "reason": "never requested: no S2 was issued",
            "amount": t.amount, "currency_code": t.currency_code,
            "card_serial": t.card_serial.hex()})
    except DuplicateError:  # a concurrent retry (or the request itself) inserted it
        row = await server.sql(server.db.get, o.env.merchant_id.hex(), o.env.txn_id.hex())
        assert row is not None
        return int(row["id"])
