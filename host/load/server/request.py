"""``POST /v1/load/request``: the load request (seed steps 878-880 and 895-899).

The client's packed LOAD_REQUEST (S1, card, expiry, amount, algorithm, counter, balance, bank
time stamp) is checked against the bank's sealed ticket (895: among others the card serial and
the issuer the bank priced the load for), logged ``received``, the HSM verifies S1 under the
keys of the issuer the request names (so of the bank's) and makes S2 (897-899), S2 is logged
(``authorized``) and the LOAD_COMMAND goes back. The same request again (a lost answer) gets the
same command; another request for the transaction, or an S1 already presented, is 409.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from starlette.responses import Response

from ....protocols import loadmsg as L
from ....protocols import messages as M
from ....protocols import purse as P
from ....protocols import sw as SW
from ...kit.db import DuplicateError
from ...kit.http import Refused
from ...terminal.purse import Declined
from .envelope import open_message, sealed
from .hsm_pool import authorize_load

if TYPE_CHECKING:
    from .app import LoadServer


async def load_request(server: LoadServer, data: bytes) -> Response:
    """A LOAD_REQUEST (S1) in; the LOAD_COMMAND (S2) out, or a refusal. Each step is logged
    before the next: the request, then the HSM's S2."""
    config = server.config
    o = open_message(config.banks, data, L.LOAD_REQUEST, L.LoadRequest, "load request")
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
    if t.version != L.LOAD_TICKET_VERSION:
        raise Refused(400, 400, f"the bank's load ticket is version {t.version}; this load "
                                f"server reads version {L.LOAD_TICKET_VERSION}")
    if t.issuer_id and r.issuer_id != t.issuer_id:   # the HSM checks S1 under r.issuer_id's keys
        raise Refused(400, 400, "the bank priced this load for another issuer's card")
    if r.currency_code != t.currency_code:
        raise Refused(400, 400, "the card's currency is not the bank's")
    if r.bank_time != t.bank_time:
        raise Refused(400, 400, "the bank time stamp differs from the bank's order")
    if t.terminal_id != config.terminal_id:
        raise Refused(400, 400, "the bank's order names another load terminal id")
    if r.txn_type not in (P.TYPE_EP_LOAD, P.TYPE_ED_LOAD):
        raise Refused(400, 400, f"transaction type {r.txn_type:02X} is not a load")
    now = config.clock()
    if P.parse_bcd_date(r.expiry_date) < now.date():
        raise Refused(403, 403, "the card has expired")
    bank_hex, txn_hex = o.env.merchant_id.hex(), o.env.txn_id.hex()
    # a node leasing no HSM logs nothing: 503 before the row, so nginx asks the next node (a
    # logged request is closed 'refused' when no HSM takes it, and is not asked again)
    no_hsm = server.leases is not None and not server.leases.pool.serving
    try:  # one step: the transaction's row, or else the request logged
        existing, row_id = await server.sql(server.db.get_or_insert, {
            "bank_id": bank_hex, "txn_id": txn_hex, "state": "received", "reason": "",
            "amount": r.amount, "currency_code": r.currency_code,
            "issuer_id": r.issuer_id.hex(), "card_serial": r.card_serial.hex(),
            "online_counter": r.online_counter, "balance": r.balance,
            "txn_type": r.txn_type, "key_version": r.key_version,
            "algorithm_id": r.algorithm_id, "random": r.random.hex(), "s1": r.s1.hex(),
            "request_digest": o.digest, "node": server.node}, not no_hsm)
    except DuplicateError:
        raise Refused(409, 409, "replayed S1: this card signature was already "
                                "presented") from None
    if existing is not None:
        if existing["request_digest"] != o.digest:
            raise Refused(409, 409, "replayed load request: this transaction already has "
                                    "another request")
        if existing["state"] == "authorized" and existing["command"] is not None:
            return sealed(o, L.LOAD_COMMAND, existing["command"])  # a lost answer
        raise Refused(409, 409, f"the load is already {existing['state']}"
                                + (f" ({existing['reason']})" if existing["reason"] else ""))
    if row_id is None:
        raise Refused(503, 503, "this node leases no HSM now; retry", {"Retry-After": "1"})
    # 897-899: the HSM verifies S1 and makes S2
    date, clock = P.bcd_date(now.date()), P.bcd_time(now)
    try:
        s2, fence = await authorize_load(server, r, r.online_counter, r.balance, r.amount, r.random,
                                  r.s1, date, clock, "HSM AUTHORIZE LOAD")
    except Declined as exc:
        reason = ("S1 does not verify: not a genuine card, or the request was changed"
                  if exc.sw == SW.MAC_INVALID else f"the HSM refused: {exc}")
        await server.sql(server.db.advance, row_id, "received", state="refused", reason=reason)
        raise Refused(400, 401, reason) from None
    except Refused as exc:
        await server.sql(server.db.advance, row_id, "received", state="refused",
                         reason=exc.reason)
        raise
    command = M.build(L.LoadCommand, {"amount": r.amount, "date": date, "time": clock,
                                      "s2": s2})
    # this row only: a request never changes another load's state; on a node, only while it
    # still leases the HSM that made S2 (leases.py): a node that lost it issues no S2
    if not await server.sql(server.db.advance, row_id, "received", fence, state="authorized",
                            txn_date=date.hex(), txn_time=clock.hex(), s2=s2.hex(),
                            command=command):
        if fence is not None and await server.sql(
                server.db.advance, row_id, "received", state="refused",
                reason="the node lost its HSM lease before S2 was logged: no S2 was issued"):
            raise Refused(409, 409, "this node lost its HSM lease while the HSM worked: no "
                                    "S2 is issued; report 'not loaded'")
        raise Refused(409, 409, "the load was closed before its S2 was logged: no S2 "
                                "is issued")
    return sealed(o, L.LOAD_COMMAND, command)
