"""Resuming loads an interruption left open (seed FIG. 17-18, from the client terminal).

Each unfinished load in the journal is finished on the purse it was started with, from the
step the journal last recorded: a confirmation carried to the bank again, the card's S3 sent
again, or the card asked (GET TRANSACTION PROVE for the load or the probe) whether it loaded
itself; what it cannot show loaded ends "not loaded" through a zero-value probe load (see
:mod:`svcard.host.load.client`). A bank start whose answer was lost is asked again with its
request id. A load no party can decide yet stays open ("still open: ...").
"""

from __future__ import annotations

from typing import Any

import httpx

from ...protocols import purse as P
from ...reader import Reader
from ..terminal.journal import Journal, entry_aid, select_entry_purse
from ..terminal.online import PaymentRefused
from ..terminal.purse import Declined, TerminalCheckFailed, prove, select_purse
from .client import (
    KIND,
    _LoadSession,
    _negative,
    _register,
    _send_probe_result,
    _send_result,
    start_load,
)


def _card_proof(card: Reader, counter: Any, s2_hex: str) -> bytes | None:
    """The card's TAC for the load at ``counter`` that it completed with this S2 (GET
    TRANSACTION PROVE), or None if it did not complete it (or a later transaction replaced
    its proof)."""
    proof = prove(card, P.TYPE_EP_LOAD, int(counter))
    if proof is not None and proof[0] == bytes.fromhex(s2_hex):
        return proof[1]
    return None


def resume_loads(card: Reader, *, journal: Journal, http: httpx.Client,
                 aid: bytes = P.DEFAULT_IEP_AID) -> list[dict[str, Any]]:
    """Finish every unfinished load of the card whose purse is at ``aid``, asking the card what
    happened, each on the purse it was started with (its journalled AID)."""
    info = select_purse(card, aid)
    report, selected = [], aid
    for entry in journal.unfinished(info.app_serial):
        if entry.get("kind") != KIND:
            continue
        txn, state = entry["txn_id"], entry["state"]
        try:
            selected = select_entry_purse(card, entry, selected)
        except (Declined, TerminalCheckFailed) as exc:
            report.append({"txn_id": txn, "outcome": f"still open: {exc}"})
            continue
        if state == "load-starting":
            report.append(_resume_start(card, journal, http, entry))
            continue
        s = _LoadSession(entry["params"], selected)
        balance = int(entry.get("balance", 0))
        try:
            if state == "load-confirmed":
                outcome = _register(s, http, journal, int(entry["outcome"]), entry["reason"],
                                    bytes.fromhex(entry["confirmation"]), balance)
            elif state == "card-loaded":
                outcome = _send_result(s, http, journal, bytes.fromhex(entry["s3"]), balance)
            elif state == "load-command":
                # did the card load itself? Its proof of this very load says so.
                tac = _card_proof(card, entry["counter"], entry["s2"])
                if tac is not None:
                    journal.write(txn, "card-loaded", s3=tac.hex(), proven=True)
                    outcome = _send_result(s, http, journal, tac, balance)
                else:
                    outcome = _negative(s, http, journal, card, balance,
                                        "interrupted; the card has no proof of this load")
            elif state in ("probe-loaded", "undecided"):
                outcome = _send_probe_result(s, http, journal,
                                             bytes.fromhex(entry["probe_s3"]), balance)
            elif state == "probe-command":
                # did the card complete the probe? Its proof of the probe says so.
                tac = _card_proof(card, entry["probe_counter"], entry["probe_s2"])
                if tac is not None:
                    journal.write(txn, "probe-loaded", probe_s3=tac.hex(), proven=True)
                    outcome = _send_probe_result(s, http, journal, tac, balance)
                else:
                    outcome = _negative(s, http, journal, card, balance,
                                        "interrupted probe; the card did not complete it")
            else:  # before the card had S2, or a probe not yet answered: a new probe
                outcome = _negative(s, http, journal, card, balance,
                                    f"interrupted at {state}: the card never saw S2")
        except (PaymentRefused, Declined, TerminalCheckFailed) as exc:
            report.append({"txn_id": txn, "outcome": f"still open: {exc}"})
            continue
        report.append({"txn_id": txn, "outcome": outcome.outcome, "reason": outcome.reason})
    return report


def _resume_start(card: Reader, journal: Journal, http: httpx.Client,
                  entry: dict[str, Any]) -> dict[str, Any]:
    """The bank was asked to debit, and its answer never came: ask again with the same
    request id. No debit: nothing to do. A debit: the card never saw this load, so it ends
    "not loaded" and the bank re-credits the account."""
    key, aid = entry["txn_id"], entry_aid(entry)
    try:
        params, balance = start_load(http, entry["bank_url"], card, account=entry["account"],
                                     secret=entry["secret"], amount=int(entry["amount"]),
                                     request_id=entry["request_id"], lookup_only=True, aid=aid)
    except PaymentRefused as exc:
        if exc.status == 503:
            return {"txn_id": key, "outcome": f"still open: {exc}"}
        journal.write(key, "load-done", reason=f"the bank debited nothing: {exc.reason}")
        return {"txn_id": key, "outcome": "no debit"}
    except (httpx.HTTPError, Declined) as exc:
        return {"txn_id": key, "outcome": f"still open: {exc}"}
    txn = params["txn_id"]
    if txn in journal:  # the load itself is in the journal: it is resumed on its own
        journal.write(key, "load-done", txn=txn)
        return {"txn_id": key, "outcome": f"continued as {txn}"}
    s = _LoadSession(params, aid)
    journal.write(txn, "load-started", kind=KIND, params=params,
                  card_serial=entry["card_serial"], aid=aid.hex().upper(), balance=balance)
    journal.write(key, "load-done", txn=txn)
    try:
        outcome = _negative(s, http, journal, card, balance,
                            "the bank's answer was lost: the card never saw this load")
    except (PaymentRefused, Declined, httpx.HTTPError) as exc:
        return {"txn_id": txn, "outcome": f"still open: {exc}"}
    return {"txn_id": txn, "outcome": outcome.outcome, "reason": outcome.reason}
