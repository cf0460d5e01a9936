"""The financial institution of seed 000: a bank account pays for a good (claim 1: "said
financial institution is asked to execute said payment and to send a payment confirmation").

An account pays for one card (``card``: the purse's application serial, its identification),
after the card's security information: the PIN the device sealed for this institution only
(``wire.seal_pin``), checked against the account's salted scrypt hash; :data:`PIN_TRIES` wrong
PINs in a row block the account (a right one sets the count back to 0).

``POST /v1/payments`` (payment server, ``PAYMENT``): in ONE database step, the payment row
(unique per order) and the debit (only if the balance covers it). A replayed or retried order
finds its row and gets the same decision: an order is paid once. The answer is a signed
decision: ``{"order", "paid": true, "amount", "currency", "card", "bank_ref"}`` (the payment
confirmation the fulfilment server checks too) or ``{"paid": false, "reason", "final"}``
(``final`` false: a wrong PIN, the device may try again).
``POST /v1/refunds`` (payment server, ``REFUND``): the payment ``paid`` -> ``refunded`` and
the amount back on the account, one step; a repeat answers the same.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ...kit.db import reading, step
from ...kit.http import Refused
from .. import db as D
from .. import wire as W
from .common import REPLY, PartyServer, handled, read_one

PIN_TRIES = 3
SCRYPT_LOG_N = 12
PAYMENT_FIELDS: dict[str, W.Checker] = {
    "order": W.ORDER, "card": W.SERIAL, "amount": W.AMOUNT, "currency": W.CURRENCY,
    "merchant": W.IDENT, "pin": W.SEALED, "created": W.SECONDS}
REFUND_FIELDS: dict[str, W.Checker] = {"order": W.ORDER, "amount": W.AMOUNT,
                                       "created": W.SECONDS}
STATUS_FIELDS: dict[str, W.Checker] = {"order": W.ORDER, "created": W.SECONDS}


def hash_pin(pin: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(pin.encode(), salt=salt, n=1 << SCRYPT_LOG_N, r=8, p=1, dklen=32)
    return (f"scrypt${SCRYPT_LOG_N}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def pin_matches(stored: str, pin: str) -> bool:
    try:
        _, log_n, salt, digest = stored.split("$")
        n = int(log_n)
        if not 1 <= n <= 20:
            return False
        got = hashlib.scrypt(pin.encode(), salt=base64.b64decode(salt), n=1 << n, r=8, p=1,
                             dklen=32)
        return hmac.compare_digest(got, base64.b64decode(digest))
    except (ValueError, TypeError):
        return False


def add_account(engine: Any, account: str, card: str, pin: str, balance: int,
                currency_code: int, now_ms: int) -> None:
    """Open ``account`` paying for ``card`` (its application serial, 20 hex digits)."""
    if not W.IDENT(account) or not W.SERIAL(card.upper()):
        raise ValueError("an account id is 1..32 of A-Z a-z 0-9 _ . -, a card 20 hex digits")
    if not (pin.isdigit() and 4 <= len(pin) <= 12) or balance < 0:
        raise ValueError("a PIN is 4..12 digits; a balance is not negative")
    with step(engine) as conn:
        conn.execute(insert(D.accounts).values(
            account=account, card=card.upper(), pin_hash=hash_pin(pin), pin_failures=0,
            balance=balance, currency_code=currency_code, state="active", created=now_ms,
            updated=now_ms))


class BankServer(PartyServer):
    role = "bank"
    health_table = D.accounts

    async def payments(self, request: Request) -> Response:
        async def work() -> Response:
            _, data, _ = await self.authenticated(request, PAYMENT_FIELDS, "payment",
                                                  W.PAYMENT, ("payment",))
            return self.reply(W.PAYMENT, await self._pay(data))
        return await handled(work)

    async def _pay(self, data: dict[str, Any]) -> dict[str, Any]:
        order = data["order"]
        done = await self.sql(self._paid_already, order)
        if done is not None:
            return done
        account = await self.sql(read_one, self.engine, D.accounts, card=data["card"])
        if account is None:
            return {"order": order, "paid": False, "final": True,
                    "reason": "no account pays for this card"}
        if account["currency_code"] != data["currency"]:
            return {"order": order, "paid": False, "final": True,
                    "reason": "the account is in another currency"}
        pin = W.open_pin(self.config.private_key, data["pin"], order, data["card"])
        right = pin is not None and pin_matches(account["pin_hash"], pin)
        return await self.sql(self._debit, data, account["id"], right)

    def _decision(self, row: dict[str, Any], card: str) -> dict[str, Any]:
        return {"order": row["order_ref"], "paid": True, "amount": row["amount"],
                "currency": row["currency_code"], "card": card,
                "bank_ref": f"{self.me}:{row['id']}"}

    def _paid_in(self, conn: Any, order: str) -> dict[str, Any] | None:
        """The decision of ``order`` if it is paid, naming the card of the account that paid
        (never the card a repeated request names: that one's PIN was never checked)."""
        p, a = D.bank_payments, D.accounts
        row = conn.execute(select(p, a.c.card.label("paid_card")).join(
            a, a.c.account == p.c.account).where(p.c.order_ref == order)).first()
        return None if row is None else self._decision(dict(row._mapping), row.paid_card)

    def _paid_already(self, order: str) -> dict[str, Any] | None:
        with reading(self.engine) as conn:
            return self._paid_in(conn, order)

    def _debit(self, data: dict[str, Any], account_id: int, right_pin: bool) -> dict[str, Any]:
        """One step: the PIN's count, the balance, the payment row and the debit."""
        order, now = data["order"], self.now_ms()
        a = D.accounts
        with step(self.engine) as conn:
            # locked: the PIN's count and the balance are read-then-written here (PostgreSQL
            # would otherwise let parallel wrong PINs each write the same count + 1)
            account = conn.execute(select(a).where(a.c.id == account_id).with_for_update()
                                   ).first()
            assert account is not None
            paid = self._paid_in(conn, order)   # paid since `_pay` looked: the same decision,
            if paid is not None:                 # never a second debit or a decline
                return paid
            if account.state != "active":
                return {"order": order, "paid": False, "final": True,
                        "reason": "the account is blocked (too many wrong PINs)"}
            if not right_pin:
                failures = account.pin_failures + 1
                conn.execute(update(a).where(a.c.id == account_id).values(
                    pin_failures=failures, updated=now,
                    state="blocked" if failures >= PIN_TRIES else "active"))
                return {"order": order, "paid": False, "final": failures >= PIN_TRIES,
                        "reason": f"wrong PIN ({PIN_TRIES - failures} tries left)"}
            debited = conn.execute(update(a).where(
                a.c.id == account_id, a.c.balance >= data["amount"]).values(
                balance=a.c.balance - data["amount"], pin_failures=0, updated=now))
            if int(debited.rowcount or 0) != 1:
                conn.execute(update(a).where(a.c.id == account_id).values(pin_failures=0))
                return {"order": order, "paid": False, "final": True,
                        "reason": "insufficient funds"}
            try:
                with conn.begin_nested():
                    conn.execute(insert(D.bank_payments).values(
                        order_ref=order, state=D.PAID, account=account.account,
                        amount=data["amount"], currency_code=data["currency"],
                        merchant=data["merchant"], created=now, updated=now))
            except IntegrityError:   # raced by the same order: undo this debit
                conn.execute(update(a).where(a.c.id == account_id).values(
                    balance=a.c.balance + data["amount"]))
            decision = self._paid_in(conn, order)
            assert decision is not None
            return decision

    async def status(self, request: Request) -> Response:
        """``PAYMENT_STATUS``: whether an order is paid, for the payment server's recovery of
        a payment whose answer it lost; paid, with the payment confirmation as ``PAYMENT``
        answers it (signed as that answer, so the fulfilment server takes it)."""
        async def work() -> Response:
            _, data, _ = await self.authenticated(request, STATUS_FIELDS, "payment status",
                                                  W.PAYMENT_STATUS, ("payment",))
            paid = await self.sql(self._paid_already, data["order"])
            if paid is None:
                return self.reply(W.PAYMENT_STATUS, {"order": data["order"], "paid": False})
            text = W.canonical(paid).decode()
            return self.reply(W.PAYMENT_STATUS, {
                "order": data["order"], "paid": True, "confirmation": text,
                "confirmation_signature": W.sign(self.config.private_key, REPLY + W.PAYMENT,
                                                 text.encode())})
        return await handled(work)

    async def refunds(self, request: Request) -> Response:
        async def work() -> Response:
            _, data, _ = await self.authenticated(request, REFUND_FIELDS, "refund", W.REFUND,
                                                  ("payment",))
            refunded = await self.sql(self._refund, data["order"], data["amount"])
            if not refunded:
                raise Refused(409, 409, "refund: no such payment of that amount")
            return self.reply(W.REFUND, {"order": data["order"], "refunded": True})
        return await handled(work)

    def _refund(self, order: str, amount: int) -> bool:
        p, a = D.bank_payments, D.accounts
        with step(self.engine) as conn:
            row = conn.execute(select(p).where(p.c.order_ref == order)).first()
            if row is None or row.amount != amount:
                return False
            if row.state == D.REFUNDED:
                return True
            changed = conn.execute(update(p).where(p.c.id == row.id, p.c.state == D.PAID)
                                   .values(state=D.REFUNDED, updated=self.now_ms()))
            if int(changed.rowcount or 0) == 1:
                conn.execute(update(a).where(a.c.account == row.account).values(
                    balance=a.c.balance + amount, updated=self.now_ms()))
            return True

    def routes(self) -> list[Route]:
        return [Route("/v1/payments", self.payments, methods=["POST"]),
                Route("/v1/refunds", self.refunds, methods=["POST"]),
                Route("/v1/payments/status", self.status, methods=["POST"])]
