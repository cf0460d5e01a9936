"""The helper's loads: the page's bank (a wallet's payment gateway, in seed 002's bank role)
loads value onto the helper's card through the load flow (:func:`..load.client.load`, with the
journal). Each load first finishes what an earlier one left open (:func:`..load.client.
resume_loads`: the card itself is asked what happened), so a load interrupted at one contact is
completed at the next, never loaded twice."""

from __future__ import annotations

from typing import Any

import httpx

from ..load import client as LC
from ..terminal.journal import Journal
from ..terminal.online import retrying_transport
from ..terminal.reader_specs import open_reader


def run_load(card: Any, book: Journal, bank_url: str, account: str, secret: str,
             amount: int, say: Any) -> dict[str, Any]:
    """Load ``amount`` from the bank at ``bank_url`` onto ``card`` (a :class:`HelperCard`);
    ``say(state, message)`` tells the page how far it is. The outcome, for the page."""
    transport = retrying_transport(card.retry_for)
    with httpx.Client(timeout=card.timeout, transport=transport) as http, \
            open_reader(card.spec) as reader:
        say("started", "Finishing any earlier load of this card")
        resumed = LC.resume_loads(reader, journal=book, http=http, aid=card.aid)
        say("loading", "The card is being loaded")
        with reader.transaction():
            outcome = LC.load(bank_url, reader, account=account, secret=secret, amount=amount,
                              journal=book, http=http, aid=card.aid)
    return {"txn_id": outcome.txn_id, "outcome": outcome.outcome, "amount": outcome.amount,
            "balance_before": outcome.balance_before, "balance_after": outcome.balance_after,
            "reason": outcome.reason,
            "resumed": [{"txn_id": r["txn_id"], "outcome": r["outcome"]} for r in resumed]}
