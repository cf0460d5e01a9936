"""The zero-value probe load (messages LOAD_PROBE and LOAD_PROBE_RESULT, after the seed's
steps 883-890): how "not loaded" is decided for a load that was issued S2.

The card completes at most one load per online-counter value, so "not loaded" rests only on
evidence the card made after this load's S2 was issued: a real load of amount 0.
:func:`issue_probe` answers a "not loaded" result: the HSM verifies its zero-value S1 and makes
S2 for amount 0 with a fresh date and time, the probe is recorded and sent (LOAD_PROBE); the
card credits 0 and moves its counter. ``POST /v1/load/probe`` (:func:`load_probe`) takes the
card's TAC for it, which the HSM verifies. A probe at the load's own counter proves the load
never happened; a probe past it proves it only when another load of the card is proven
``loaded`` at that counter; otherwise the load stays open (409, undecided) and nothing is
refunded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from ....protocols import loadmsg as L
from ....protocols import purse as P
from ....protocols import sw as SW
from ...kit.http import Refused
from ...terminal.purse import Declined
from .decision import load_answer, lost_race, probe_command, repeat
from .envelope import OpenedLoad, open_message, sealed
from .hsm_pool import LoggedRequest, authorize_load, verify_tac

if TYPE_CHECKING:
    from .app import LoadServer


async def issue_probe(server: LoadServer, o: OpenedLoad, row: dict[str, Any],
                      res: Any) -> Response:
    """A "not loaded" for a load that was issued S2: the HSM verifies the new zero-value S1
    and makes S2 for a zero-value load with a fresh date and time, the probe. Nothing is
    decided until the card's TAC for it comes back (``/v1/load/probe``)."""
    if row["probe_digest"] == o.digest:  # the same result again: the same probe
        return sealed(o, L.LOAD_PROBE, probe_command(row))
    if res.online_counter < row["online_counter"]:
        raise Refused(400, 400, f"the card's counter {res.online_counter} is below this "
                                f"load's ({row['online_counter']}): not the card's now")
    now = server.config.clock()
    date, clock = P.bcd_date(now.date()), P.bcd_time(now)
    try:
        s2, fence = await authorize_load(server, LoggedRequest(row), res.online_counter,
                                  res.balance, 0, res.random, res.s1, date, clock,
                                  "HSM AUTHORIZE LOAD (probe)")
    except Declined as exc:
        if exc.sw == SW.MAC_INVALID:
            raise Refused(400, 401, "the zero-value S1 does not verify: not the card's, "
                                    "or changed; nothing was recorded") from None
        raise Refused(400, 400, f"the HSM refused the zero-value S1: {exc}") from None
    probe = {"probe_counter": res.online_counter, "probe_balance": res.balance,
             "probe_random": res.random.hex(), "probe_s1": res.s1.hex(),
             "probe_date": date.hex(), "probe_time": clock.hex(), "probe_s2": s2.hex()}
    if not await server.sql(server.db.record_probe, row["id"], o.digest, fence, **probe):
        if fence is not None and not await server.fence_current(fence):
            raise Refused(503, 503, "this node lost its HSM lease while the HSM made the "
                                    "probe: nothing was recorded; retry",
                          {"Retry-After": "1"})
        return await lost_race(server, o, row["id"], probe=True)
    return sealed(o, L.LOAD_PROBE, probe_command(probe))


async def load_probe(server: LoadServer, data: bytes) -> Response:
    """``POST /v1/load/probe``: the card's TAC for the probe, and the decision."""
    o = open_message(server.config.banks, data, L.LOAD_PROBE_RESULT, L.LoadProbeResult,
                     "probe result")
    res = o.body
    row = await server.sql(server.db.get, o.env.merchant_id.hex(), o.env.txn_id.hex())
    if row is None:
        raise Refused(404, 404, "no such load")
    if row["answer"] is not None:
        return repeat(o, row)
    if row["state"] != "authorized":
        raise Refused(409, 409, f"the load is {row['state']}: no probe to check")
    if row["probe_s2"] is None:
        raise Refused(409, 409, "no probe was issued for this load: report 'not loaded' "
                                "with a new zero-value S1 first")
    if res.card_sw != SW.OK:
        raise Refused(400, 400, f"the card refused the probe ({res.card_sw:04X}): report "
                                "'not loaded' with a new zero-value S1 for a new probe")
    n, c = int(row["online_counter"]), int(row["probe_counter"])
    await verify_tac(server, row, row["probe_balance"], c, 0, row["probe_date"],
                     row["probe_time"], res.s3, "the probe's S3 does not verify: not "
                     "the card's answer to this probe")
    used_by: dict[str, Any] | None = None
    if c == n:
        evidence = "probe"
        reason = f"not loaded: the card spent its counter {n} on the zero-value probe"
    else:
        used_by = await server.sql(server.db.loaded_at, row["card_serial"], n, row["id"])
        if used_by is None:
            raise Refused(409, 409, f"undecided: the card's counter has moved past this "
                                    f"load's ({c} > {n}); send the card's proof of this "
                                    f"load (GET TRANSACTION PROVE) or nothing is refunded")
        evidence = f"counter-used:{used_by['txn_id']}"
        reason = (f"not loaded: the card's counter {n} was used by load "
                  f"{used_by['txn_id']}, proven loaded")
    answer_bytes = load_answer(o, row, L.OUTCOME_NOT_LOADED, reason, bytes(4))
    if not await server.sql(server.db.close_by_probe, row["id"], row["probe_s2"],
                            None if used_by is None else int(used_by["id"]),
                            reason=reason[:200], evidence=evidence, result_digest=o.digest,
                            answer=answer_bytes):
        return await lost_race(server, o, row["id"])
    return sealed(o, L.LOAD_ANSWER, answer_bytes)
