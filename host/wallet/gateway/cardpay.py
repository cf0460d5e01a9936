"""Embodiments 2 and 3 at the payment gateway (seed 003 FIG. 5 and 6), and the financial
system's transaction reports (FIG. 6 step d12).

``POST /v1/wallet/fill`` (the web server's link; FIG. 5 steps c2-c4): the member's wallet asks
for the details of a card in the wallet to fill into a mall's payment form. The purchase is
checked as in embodiment 1 and stored ``filled``; the answer is the card's number and a
one-time *profile* token (the purchase id and a MAC binding it to the card, mall, order,
amount, currency and expiry; see ``links.fill_mac``). The secret is not stored anywhere the
gateway can read it back: the member types it, and the wallet page fills it in. A *real*
card's fill also answers a purse checkout token (purse.py: one order per purchase); the page
has the card helper pay it before it fills the form.

``POST /v1/card-payments`` (a mall's link; FIG. 5 step c6): the mall's own record of the
purchase with the card number, secret and profile token from its form. The gateway checks the
token (made for this card and this purchase: another member's card, or a token from another
order, fails), that the order was filled and not yet paid (the mall's own exact payment
asked again after it was approved or declined, secret included, gets 409 with ``state`` and
``approval``, as in embodiment 1; anything else 409 alone), then has the financial system check
the secret (five wrong ones lock the card; a real card: 409 first, unless its purse paid
THIS purchase, ``purse.purse_paid``), then matches every field in one conditional UPDATE
(``filled`` -> ``approving``) and asks for the debit under the ref ``pay:PURCHASE``.

``POST /v1/reports`` (the financial system's link, party ``fin``): movements on cards
(cash, charges, debits of every embodiment, the VAN's included), each recorded once by its
ref in ``wg_journal`` with the member whose wallet holds the card.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, select
from starlette.requests import Request
from starlette.responses import Response

from ...kit.db import reading
from ...kit.http import Refused
from ...kit.request_log import note
from ..base import ok
from ..links import ID, NUMBER, PROFILE, SECRET, check_profile, profile_token, purchase, text, whole
from . import db as D
from . import loading as LD
from . import matching as X
from . import purse as PU
from .journal import record

if TYPE_CHECKING:
    from .app import GatewayServer

MAX_REPORTS = 100
_REF = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_PARTY = re.compile(r"^[A-Za-z0-9_.:-]{1,48}$")
KINDS = ("cash", "account", "credit", "debit")
LAST_MS = 253_402_300_799_999   # the end of year 9999: a report's day must be a date


async def fill(server: GatewayServer, request: Request) -> Response:
    member, data = await server._member(request)
    card, p, back = await server.checked_choice(member, data)
    real = await server.card_kind(member, card) == "real"
    if real:
        # its value is in its purse: the purse pays first (purse.py), the form is filled after
        PU.payable(server, p)
    pid = await server.sql(X.store_choice, server.engine, member, card, p, D.FILLED)
    if pid is None:
        raise Refused(409, 409, "this order has a card chosen already")
    note(txn=pid, step="fill")
    answer = {"card": card, "profile": profile_token(server.config.fin_key, pid, card, p),
              "return_url": back}
    if real:   # one purse order per purchase: the helper pays it before the form is sent
        answer["checkout"] = PU.checkout_token(server.config.secret_key, pid)
    return ok(answer)


async def card_payment(server: GatewayServer, request: Request) -> Response:
    mall, data = await server.linked(request, server.config.mall_keys)
    p = purchase(data.get("purchase"))
    if p["mall"] != mall:
        raise Refused(403, 403, "a mall asks approval of its own purchases only")
    card, secret = text(data, "card", NUMBER), text(data, "secret", SECRET)
    pid = check_profile(server.config.fin_key, text(data, "profile", PROFILE), card, p)
    found = await server.sql(X.by_order, server.engine, p["mall"], p["order"])
    if found is None:
        raise Refused(404, 404, "no card was filled in a wallet for this order")
    if found["state"] in (D.APPROVED, D.DECLINED):
        if pid == found["id"] and found["card"] == card and all(
                found[column] == p[name] for name, column in X.FIELDS.items()):
            # the mall's own exact payment again (its answer was lost): the secret is checked
            # as the first time (a wrong one counts to the lockout), then the mall learns the
            # state and the approval; still no second approval, no second debit
            await server.verify_secret(card, secret)
            return await server.answer_match(p, found["state"], found)
        raise Refused(409, 409, f"{found['state']} already: not approved twice")
    if pid is None or found["id"] != pid or found["card"] != card or \
            found["state"] not in (D.FILLED, D.APPROVING):
        # checked before the secret: a mall cannot try secrets of cards not filled for it
        raise Refused(409, 409, "the card details do not match what the wallet filled in")
    real = await server.card_kind(found["member"], card) == "real"
    if real and found["state"] == D.FILLED:
        # a real card: approved only once its purse paid THIS purchase (purse.py)
        paid = await server.sql(PU.purse_paid, server.engine, pid)
        if paid is None or (paid["card"], paid["amount"], paid["currency"]) != (
                card, found["amount"], found["currency"]):
            raise Refused(409, 409, "the real card's purse has not paid this purchase")
    await server.verify_secret(card, secret)
    how, matched = await server.sql(X.match, server.engine, p, server.now_ms(), D.FILLED,
                                    {"id": pid, "card": card})
    if how == "expired" and real:
        # the purse paid before the purchase expired: its value is the mall's already
        how, matched = await server.sql(PU.match_paid, server.engine, p, server.now_ms(),
                                        D.FILLED, {"id": pid, "card": card})
    # a real card's debit was made when its purse paid (purse.mirror, the same ref): that
    # "repeated" debit is this approval's own, not the VAN's
    return await server.answer_match(p, how, matched,
                                     fresh=found["state"] == D.FILLED and not real)


def _report(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise Refused(400, 400, "reports: a list of objects")
    order = item.get("order", "")
    if not isinstance(order, str) or (order and not ID.fullmatch(order)):
        raise Refused(400, 400, "order: not a valid value")
    return {"ref": text(item, "ref", _REF), "kind": text(item, "kind", re.compile(
                "^(" + "|".join(KINDS) + ")$")),
            "card": text(item, "card", NUMBER), "amount": whole(item, "amount", 1),
            "currency": whole(item, "currency", 1, 999), "balance": whole(item, "balance"),
            "counterparty": text(item, "counterparty", _PARTY), "order": order,
            "at": whole(item, "at", 0, LAST_MS)}


async def reports(server: GatewayServer, request: Request) -> Response:
    _, data = await server.linked(request, {"fin": server.config.fin_key})
    items = data.get("reports")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_REPORTS:
        raise Refused(400, 400, f"reports: a list of 1 to {MAX_REPORTS}")
    checked = [_report(item) for item in items]
    new, known = await server.sql(record, server.engine, checked)
    for r in checked:
        # value put on a real card (an agent's cash, or a charge whose answer to the gateway
        # was lost: its order by the same ref the charge makes, so one): the load flow
        if r["kind"] in ("cash", "account", "credit"):
            held = await server.sql(held_by, server.engine, r["card"])
            if held is not None and held["card_kind"] == "real":
                await server.sql(LD.ensure, server.engine, r["ref"], held["member"], r["card"],
                                 r["amount"], r["currency"])
    return ok({"recorded": new, "known": known})


def held_by(engine: Engine, card: str) -> dict[str, Any] | None:
    with reading(engine) as conn:
        row = conn.execute(select(D.wallet).where(D.wallet.c.kind == "card",
                                                  D.wallet.c.number == card)).first()
    return dict(row._mapping) if row is not None else None
