"""The payment gateway (seed 003 FIG. 1 server 30, FIG. 4 server 70).

Over its link with the electronic payment web server (which has authenticated the member):
``POST /v1/wallet/list`` (the member's wallet, with the cards' balances), ``/v1/wallet/issue``
(a card applied for: the financial system approves it and gives its number; it goes into the
wallet), ``/v1/wallet/link`` (an account or credit card the member proves to hold),
``/v1/wallet/charge`` (a card charged from an account or credit card in the same wallet),
``/v1/wallet/choose`` (embodiment 1, step b5: the card chosen, its secret checked, and the
purchase information from the mall's page stored). Over each mall's link:
``POST /v1/approvals`` (step b6: the mall's own view of the purchase, no customer data; matched
field by field, then debited; see ``matching.py``). ``GET /v1/health``, ``GET /openapi.json``.

The financial system never learns the member: it knows each holder as ``applicant``, an HMAC of
the member id under the gateway's own key.

Approval answers: 200 approved; 402 declined by the financial system (e.g. balance too low);
403 a mall asking about another mall's order; 404 no purchase for this order; 409 approved or
declined already (a replay; asked with every field equal, the body gives ``state`` and
``approval``, so a mall whose answer was lost learns its order is paid), being approved (a
concurrent copy), or the request does not match the wallet's purchase in some field (which
one is not said); 410 expired; 502 the financial
system's answer is unknown (the purchase stays ``approving``: the gateway asks again at its
next start, and a mall's retry 10 s later asks again, under the same ref: never a second
debit).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ...kit.http import JSON_STORAGE_ERROR_HANDLERS, Refused, openapi_route
from ...kit.request_log import RequestLog, note
from ...kit.serving import with_writer_drained
from ..base import WalletServer, crash_point, ok
from ..config import GatewayConfig
from ..links import ID, NUMBER, SECRET, LinkClient, choice, origin, purchase, text, whole
from . import cardpay as E
from . import db as D
from . import loading as LD
from . import matching as X
from . import purse as PU
from . import wallets as W
from .journal import day_of, write_statements

_REF = ID
log = logging.getLogger("svcard.wallet.gateway")


class GatewayServer(WalletServer):
    name = "wallet-gateway"

    def __init__(self, config: GatewayConfig, clock: Callable[[], float] = time.time,
                 http: httpx.Client | None = None) -> None:
        self.config = config
        self.http = http or httpx.Client(timeout=30)
        self.fin = LinkClient(self.http, config.fin_url, config.party, config.fin_key)
        super().__init__(D.make_engine(config.db_url), config.db_url, D.wallet, clock)
        PU.open_tables(self.engine)   # the real cards' payment orders and load orders

    def purse(self) -> Any:
        """The real cards' settings (:class:`..config.PurseSettings`), else 404."""
        if self.config.purse is None:
            raise Refused(404, 404, "this gateway takes no real cards")
        return self.config.purse

    async def card_kind(self, member: str, card: str) -> str:
        row = await self.sql(W.holds, self.engine, member, "card", card)
        return str(row["card_kind"]) if row is not None else ""

    def close(self) -> None:
        super().close()
        self.http.close()

    def applicant(self, member: str) -> str:
        return hmac.new(self.config.secret_key, b"applicant\n" + member.encode(),
                        hashlib.sha256).hexdigest()

    async def ask_fin(self, path: str, data: dict[str, Any]) -> tuple[int, Any]:
        try:
            return await asyncio.to_thread(self.fin.post, path, data)
        except httpx.TransportError:
            raise Refused(502, 502, "the financial system could not be reached") from None

    async def ask_fin_quietly(self, path: str, data: dict[str, Any]) -> tuple[int, Any]:
        """:meth:`ask_fin`, an unreachable financial system as status 0."""
        try:
            return await self.ask_fin(path, data)
        except Refused:
            return 0, {}

    async def _member(self, request: Request) -> tuple[str, dict[str, Any]]:
        _, data = await self.linked(request, self.config.web_keys)
        member = text(data, "member")
        note(party=member)
        return member, data

    # --- the web server's link ------------------------------------------------------------
    async def listing(self, request: Request) -> Response:
        member, _ = await self._member(request)
        rows = await self.sql(W.contents, self.engine, member)
        cards = [r["number"] for r in rows if r["kind"] == "card"]
        found: dict[str, Any] = {}
        if cards:
            status, answer = await self.ask_fin("/v1/balances", {"cards": cards})
            if status != 200:
                raise Refused(502, 502, "the financial system did not give the balances")
            found = answer["cards"]
        key = self.config.secret_key
        loads = [{"card": r["card"], "account": r["order_id"], "amount": r["amount"],
                  "currency": r["currency"], "state": r["state"],
                  "secret": LD.load_token(key, r["order_id"])}
                 for r in await self.sql(LD.pending, self.engine, member)]
        return ok({
            "loads": loads,
            "cards": [{"number": n, "kind": r["card_kind"], **found.get(n, {})}
                      for r in rows if r["kind"] == "card" for n in [r["number"]]],
            "accounts": [r["number"] for r in rows if r["kind"] == "account"],
            "credit_cards": [r["number"] for r in rows if r["kind"] == "credit"]})

    async def issue(self, request: Request) -> Response:
        member, data = await self._member(request)
        kind, ref = choice(data, "kind", ("virtual", "real")), text(data, "ref", _REF)
        status, answer = await self.ask_fin("/v1/cards", {
            "ref": "issue:" + ref, "kind": kind, "currency": self.config.currency,
            "applicant": self.applicant(member)})
        if status != 200:
            raise Refused(403 if status == 403 else 502, 403,
                          f"the card was not approved: {answer.get('reason', status)}")
        number = str(answer["number"])
        added = await self.sql(W.add, self.engine, member, "card", number, kind)
        if added not in ("added", "held"):
            raise Refused(409, 409, f"the card could not go into the wallet: {added}")
        note(txn=number, step="issue")
        return ok({k: answer[k] for k in ("number", "kind", "secret", "mailed") if k in answer})

    async def link(self, request: Request) -> Response:
        member, data = await self._member(request)
        kind = choice(data, "kind", ("account", "credit"))
        number, secret = text(data, "number", NUMBER), text(data, "secret", SECRET)
        status, _ = await self.ask_fin("/v1/links", {
            "kind": kind, "number": number, "secret": secret,
            "applicant": self.applicant(member)})
        if status == 423:
            raise Refused(403, 403, f"the {kind} is locked after too many wrong secrets")
        if status != 200:
            raise Refused(403 if status in (403, 404) else 502, 403,
                          f"the {kind} could not be verified")
        added = await self.sql(W.add, self.engine, member, kind, number)
        if added not in ("added", "held"):
            raise Refused(409, 409, f"the {kind} could not go into the wallet: {added}")
        return ok({"kind": kind, "number": number})

    async def charge(self, request: Request) -> Response:
        member, data = await self._member(request)
        kind = choice(data, "kind", ("account", "credit"))
        card, source = text(data, "card", NUMBER), text(data, "source", NUMBER)
        ref, amount = text(data, "ref", _REF), whole(data, "amount", 1)
        for what, number in (("card", card), (kind, source)):
            if await self.sql(W.holds, self.engine, member, what, number) is None:
                raise Refused(404, 404, f"no such {what} in this wallet")
        status, answer = await self.ask_fin("/v1/charges", {
            "ref": "charge:" + ref, "card": card, "kind": kind, "source": source,
            "amount": amount, "currency": whole(data, "currency", 1, 999),
            "applicant": self.applicant(member)})
        if status != 200:
            raise Refused(502 if status >= 500 else 400, status,
                          f"the charge was refused: {answer.get('reason', status)}")
        note(txn=ref, step="charge", outcome=answer["result"])
        if answer["result"] == "done" and await self.card_kind(member, card) == "real":
            # a real card's purse is loaded through the load flow: its one load order
            order = await self.sql(LD.ensure, self.engine, "charge:" + ref, member, card,
                                   amount, whole(data, "currency", 1, 999))
            answer = {**answer, "load": {"account": order, "amount": amount,
                                         "secret": LD.load_token(self.config.secret_key,
                                                                 order)}}
        return ok(answer, 200 if answer["result"] == "done" else 402)

    async def checked_choice(self, member: str, data: dict[str, Any]
                             ) -> tuple[str, dict[str, Any], str]:
        """(card, purchase, return URL) a member's wallet sent, checked: a mall served here
        that signed the purchase, an expiry ahead (at most ``max_purchase_ms``), a page to
        return to on the mall's own site, our currency, and a card in this member's wallet."""
        card = text(data, "card", NUMBER)
        p = X.signed_purchase(self.config.mall_keys, data.get("purchase"))
        if p["mall"] not in self.config.mall_keys:
            raise Refused(400, 400, "purchase.mall: not a mall this gateway serves")
        now = self.now_ms()
        if not now < p["expires"] <= now + self.config.max_purchase_ms:
            raise Refused(400, 400, "purchase.expires: expired, or too far ahead")
        back = data.get("return_url")
        if not isinstance(back, str) or len(back) > 500 or not origin(back) or \
                origin(back) != self.config.mall_origins.get(p["mall"]):
            raise Refused(400, 400, "return_url: not the mall's own site")
        if p["currency"] != self.config.currency:
            raise Refused(400, 400, f"purchase.currency: cards here hold {self.config.currency}")
        if await self.sql(W.holds, self.engine, member, "card", card) is None:
            raise Refused(404, 404, "no such card in this wallet")
        return card, p, back

    async def choose(self, request: Request) -> Response:
        member, data = await self._member(request)
        secret = text(data, "secret", SECRET)
        card, p, back = await self.checked_choice(member, data)
        await self.verify_secret(card, secret)
        real = await self.card_kind(member, card) == "real"
        if real:   # a purchase its purse can pay here, else 400 and nothing stored
            PU.payable(self, p)
        pid = await self.sql(X.store_choice, self.engine, member, card, p)
        if pid is None:
            raise Refused(409, 409, "this order has a card chosen already")
        note(txn=pid, step="choose")
        if real:   # the card's purse pays first, through the card helper (purse.py)
            return ok({"purchase": pid, "return_url": back,
                       "checkout": PU.checkout_token(self.config.secret_key, pid)})
        return ok({"purchase": pid, "return_url": back})

    async def verify_secret(self, card: str, secret: str) -> None:
        """The financial system checks the card's secret (five wrong ones lock the card)."""
        status, _ = await self.ask_fin("/v1/cards/verify", {"card": card, "secret": secret})
        if status in (403, 423):
            raise Refused(403, 403, "wrong card secret" if status == 403 else
                          "the card is locked after too many wrong secrets")
        if status != 200:
            raise Refused(502, 502, "the financial system could not check the card")

    # --- each mall's link -----------------------------------------------------------------
    async def approve(self, request: Request) -> Response:
        mall, data = await self.linked(request, self.config.mall_keys)
        p = purchase(data)
        if p["mall"] != mall:
            raise Refused(403, 403, "a mall asks approval of its own purchases only")
        paid = await self.purse_evidence(p)
        how, found = await self.sql(X.match, self.engine, p, self.now_ms())
        if how == "expired" and paid:
            # the purse paid before the purchase expired (its value is the mall's now): the
            # mall asking late is approved, as the VAN answers a debit made in time
            how, found = await self.sql(PU.match_paid, self.engine, p, self.now_ms())
        return await self.answer_match(p, how, found)

    async def purse_evidence(self, p: dict[str, Any]) -> bool:
        """A real card's purchase is approved only once its purse paid it (purse.py): the
        payment server's verified debit of THIS card, for this purchase's order, amount and
        currency, to this mall's merchant id. Checked before the match: the purchase of an
        order never changes, and its evidence is never taken back. No purchase for the order
        yet: 404 here, not at the match (a choice of a real card stored between this look-up
        and the match would be approved without its purse; review2). True: the purse paid."""
        found = await self.sql(X.by_order, self.engine, p["mall"], p["order"])
        if found is None:
            raise Refused(404, 404, "no purchase was chosen in a wallet for this order")
        if found["state"] != D.CHOSEN or \
                await self.card_kind(found["member"], found["card"]) != "real":
            return False
        paid = await self.sql(PU.purse_paid, self.engine, found["id"])
        if paid is None or (paid["card"], paid["amount"], paid["currency"]) != (
                found["card"], found["amount"], found["currency"]):
            raise Refused(409, 409, "the real card's purse has not paid this purchase")
        return True

    async def answer_match(self, p: dict[str, Any], how: str, found: dict[str, Any] | None,
                           fresh: bool = False) -> Response:
        """The mall's answer to a match: refused, or debited and approved or declined.
        ``fresh``: the purchase was never asked about before (``filled``), so a debit the
        financial system had already made under its ref was the VAN's (embodiment 3): the
        same order is not approved a second time (409)."""
        note(txn=found["id"] if found else None, step="approve")
        if how != "matched" or found is None:
            status, reason = {
                "none": (404, "no purchase was chosen in a wallet for this order"),
                "approved": (409, "approved already: not approved twice"),
                "declined": (409, "declined already"),
                "approving": (409, "being approved: ask again in a few seconds"),
                "expired": (410, "the purchase expired"),
            }.get(how, (409, "the request does not match the wallet's purchase information"))
            if how in ("approved", "declined") and found is not None and all(
                    found[column] == p[name] for name, column in X.FIELDS.items()):
                # the mall's own exact purchase asked again (its answer was lost, or a restart
                # finished the debit): still no second approval, but the mall learns the state
                return ok({"approved": False, "state": how, "approval": found["id"],
                           "order": p["order"], "amount": found["amount"],
                           "currency": found["currency"], "reason": reason}, status)
            raise Refused(status, status, reason)
        crash_point("gateway-after-match")
        approved, reason, repeated = await self.debit(found)
        if fresh and repeated:
            raise Refused(409, 409, "approved or declined already (through the VAN): "
                                    "not approved twice")
        note(outcome="approved" if approved else "declined")
        body = {"approved": approved, "approval": found["id"], "order": p["order"],
                "amount": found["amount"], "currency": found["currency"]}
        if not approved:
            body["reason"] = reason
        return ok(body, 200 if approved else 402)

    async def debit(self, found: dict[str, Any]) -> tuple[bool, str, bool]:
        """Ask the financial system to debit a matched purchase (its ref is the purchase's
        id: asking again is never a second debit) and record the answer: (approved, why
        not, whether the financial system had this ref already)."""
        status, answer = await self.ask_fin("/v1/debits", {
            "ref": "pay:" + found["id"], "card": found["card"], "amount": found["amount"],
            "currency": found["currency"], "mall": found["mall"], "order": found["mall_order"]})
        if status != 200:
            raise Refused(502, 502, "the financial system's answer is unknown: ask again")
        approved = answer["result"] == "done"
        reason = "" if approved else str(answer.get("reason", "declined"))
        await self.sql(X.settle, self.engine, found["id"], approved, reason)
        return approved, reason, bool(answer.get("repeated"))

    async def recover(self) -> dict[str, int]:
        """At start: every purchase matched whose debit's outcome was not recorded (the
        gateway stopped between the match and the answer) is asked about again, and every
        recent purse payment not yet approved has its financial system's debit asked again
        (the same ref: made once)."""
        done = {"approved": 0, "declined": 0, "unknown": 0}
        for found in await self.sql(X.in_flight, self.engine):
            try:
                approved, _, _ = await self.debit(found)
            except Refused:
                done["unknown"] += 1
                continue
            done["approved" if approved else "declined"] += 1
        # purse payments recorded whose financial system's debit may be missing (review2)
        for pid in await self.sql(PU.unmirrored, self.engine,
                                  self.now_ms() - PU.MIRROR_AGAIN_MS):
            await PU.mirror(self, pid)
        return done

    async def statements(self) -> int:
        """Yesterday's statements (UTC) written to ``statement_dir``: how many files. Run
        again, the same files (each written atomically)."""
        folder = self.config.statement_dir
        if folder is None:
            return 0
        yesterday = day_of(int(self.clock() * 1000) - 86_400_000)
        written = await self.sql(write_statements, self.engine, folder, yesterday)
        return len(written)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        done = await self.recover()
        if any(done.values()):
            log.info("recovered: %s", done, extra=done)

        async def daily() -> None:
            while True:
                try:
                    await self.statements()
                except Exception:   # a full disk, say: logged, tried again next time
                    log.exception("the daily statements could not be written")
                await asyncio.sleep(self.config.statement_seconds)
        task = asyncio.get_running_loop().create_task(daily()) \
            if self.config.statement_dir is not None else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def app(self) -> Starlette:
        g = self.guarded
        return Starlette(routes=[
            Route("/v1/wallet/list", g(self.listing), methods=["POST"]),
            Route("/v1/wallet/issue", g(self.issue), methods=["POST"]),
            Route("/v1/wallet/link", g(self.link), methods=["POST"]),
            Route("/v1/wallet/charge", g(self.charge), methods=["POST"]),
            Route("/v1/wallet/choose", g(self.choose), methods=["POST"]),
            Route("/v1/wallet/fill", g(partial(E.fill, self)), methods=["POST"]),
            Route("/v1/approvals", g(self.approve), methods=["POST"]),
            Route("/v1/card-payments", g(partial(E.card_payment, self)), methods=["POST"]),
            Route("/v1/reports", g(partial(E.reports, self)), methods=["POST"]),
            Route("/v1/purse/checkout", g(partial(PU.checkout, self)), methods=["POST"]),
            Route("/v1/purse/status/{txn}", g(partial(PU.status, self)), methods=["POST"]),
            Route("/v1/bank", g(partial(LD.page, self)), methods=["GET"]),
            Route("/v1/bank/start", g(partial(LD.start, self)), methods=["POST"]),
            Route("/v1/bank/status/{txn}", g(partial(LD.status, self)), methods=["POST"]),
            Route("/v1/health", self.health, methods=["GET"]),
            openapi_route("wallet-gateway"),
        ], exception_handlers=dict(JSON_STORAGE_ERROR_HANDLERS),
            lifespan=with_writer_drained(self.sql, self.lifespan),
            middleware=[Middleware(RequestLog, server="wallet-gateway")])
