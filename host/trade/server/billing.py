"""Both account managers' end of clearing (seed 004 claim 11): the clearing information, signed
by the mediating trusted agent, becomes a withdrawal record (the customer account manager,
for the customer's billing system) or a deposit record (the merchant account manager, for the
merchant's), stored in ONE step with the session's end, then written as a file; the signed
receipt goes back to the mediating agent.

The customer account manager also forwards the customer agent's record to the mediating agent
(``POST /v1/sessions/{session}/record``: the record signed by the session's key, wrapped in
the account manager's signed envelope: it vouches that the session is its customer's) and
shows the customer its clearing (``GET /v1/sessions/{session}/clearing?pseudonym=``).

Billing files: ``BILLING/withdrawals/<session>.json`` and ``BILLING/deposits/<session>.json``,
one JSON object each, written to a temporary name and renamed (a reader never sees half a
file). The database row is the truth; a file missing after a crash is written again from it
when the server starts (:func:`export`), with the same content.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import Engine, Table, insert, select, update
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ...kit.db import first_row, reading, step
from ...kit.http import Refused, read_body
from .. import closing as K
from .. import db as D
from .. import messages as M
from .. import signing as S
from .common import refused, same_pseudonym, signed_json

if TYPE_CHECKING:
    from .account import AccountManager

MAX_INFO = 8192
INFO: dict[str, Any] = {
    "acquirer": M.IDENT, "session": M.SESSION, "account_manager": M.IDENT,
    "merchant": M.IDENT, "pseudonym": M.IDENT, "ended": lambda v: v in K.ENDINGS,
    "outcome": lambda v: v in ("agreed", "one-sided", "disputed"), "reasons": M._text(2000),
    "index": M._int(0, 1_000_000), "paid": M.MINOR, "deposit_merchant": M.MINOR,
    "currency_merchant": M.CURRENCY, "deposit_customer": M.MINOR,
    "currency_customer": M.CURRENCY, "returned": M.MINOR, "withdrawal": M.MINOR,
    "rounding": M.MINOR, "rate": M.RATE, "merchant_list": lambda v: v == "" or M.DIGEST(v),
    "customer_list": lambda v: v == "" or M.DIGEST(v), "created": M.SECONDS}


def write_file(folder: Path, kind: str, session: str, payload: dict[str, Any]) -> Path:
    """``folder/kind/session.json``, atomically (a temporary name, then a rename)."""
    where = folder / kind
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{session}.json"
    tmp = where / f".{session}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def file_payload(kind: str, row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in ("id", "info", "signature")}
    return {"record": kind, **out, "clearing": row["info"],
            "clearing_signature": row["signature"]}


def export(engine: Engine, table: Table, folder: Path, kind: str,
           extra: Callable[[Engine, str], dict[str, Any]] | None = None) -> int:
    """Write every record whose file is missing (after a crash); how many were written.
    ``extra``: more of the record (a purse-funded session's payment and load)."""
    with reading(engine) as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(table)).all()]
    written = 0
    for row in rows:
        if not (folder / kind / f"{row['session']}.json").exists():
            more = extra(engine, row["session"]) if extra else {}
            write_file(folder, kind, row["session"], {**file_payload(kind, row), **more})
            written += 1
    return written


def withdrawal_extra(engine: Engine, session: str) -> dict[str, Any]:
    """What the withdrawal record says of a purse-funded session: the card's payment of the
    deposit and the load of the rest ({} for a session on credit)."""
    row = first_row(engine, D.am_purse, session=session)
    if row is None:
        return {}
    return {"funding": "purse",
            "purse": {"order": row["order_id"], "amount": row["amount"],
                      "currency": row["currency"], "card_serial": row["card_serial"],
                      "card_counter": row["card_counter"], "tac": row["tac"]},
            "load": {"amount": row["rest"], "state": row["load_state"],
                     "txn": row["load_txn"]}}


def take_withdrawal(engine: Engine, info: dict[str, Any], body: str, signature: str,
                    now: int) -> dict[str, Any]:
    """The session ends (``open`` -> ``cleared``), its reservation is given back and the
    customer is charged the withdrawal, in ONE step; a second delivery finds the record."""
    s, c = D.am_sessions.c, D.am_customers.c
    try:
        with step(engine) as conn:
            row = conn.execute(select(D.am_sessions).where(
                s.session == info["session"])).first()
            if row is None or row.pseudonym != info["pseudonym"] or \
                    row.deposit != info["deposit_customer"] or \
                    row.currency != info["currency_customer"] or \
                    row.merchant != info["merchant"]:
                raise Refused(409, 409, "clearing: not this account manager's session")
            kept = conn.execute(select(D.am_withdrawals).where(
                D.am_withdrawals.c.session == info["session"])).first()
            if kept is not None:
                return dict(kept._mapping)
            if conn.execute(update(D.am_sessions).where(
                    s.session == info["session"], s.state.in_(D.RESERVING)).values(
                    state=D.CLEARED, updated=now)).rowcount != 1:
                raise Refused(409, 409, f"clearing: the session is {row.state}")
            conn.execute(update(D.am_customers).where(c.id == row.customer).values(
                reserved=c.reserved - row.deposit, updated=now))
            p = D.am_purse.c        # a purse-funded session: its rest is due to the card
            # found by its initiation, not only by the session it names: an order paid but
            # not yet marked open (a stop between the two) still gets its rest
            conn.execute(update(D.am_purse).where(
                p.customer == row.customer, p.txn == row.txn, p.digest == row.digest,
                p.state.in_(("paid", "open")), p.load_state == "none").values(
                session=info["session"], rest=info["returned"],
                load_state="due" if info["returned"] else "none", updated=now))
            values = {"session": info["session"], "customer": row.customer,
                      "deposit": row.deposit, "returned": info["returned"],
                      "amount": info["withdrawal"], "currency": row.currency,
                      "outcome": info["outcome"], "info": body, "signature": signature,
                      "at": now}
            conn.execute(insert(D.am_withdrawals).values(**values))
            return values
    except IntegrityError:
        kept_row = first_row(engine, D.am_withdrawals, session=info["session"])
        if kept_row is None:
            raise
        return kept_row


def take_deposit(engine: Engine, info: dict[str, Any], body: str, signature: str,
                 now: int) -> dict[str, Any]:
    values = {"session": info["session"], "merchant": info["merchant"],
              "acquirer": info["acquirer"], "amount": info["paid"],
              "currency": info["currency_merchant"], "outcome": info["outcome"],
              "info": body, "signature": signature, "at": now}
    try:
        with step(engine) as conn:
            conn.execute(insert(D.mam_deposits).values(**values))
        return values
    except IntegrityError:
        kept = first_row(engine, D.mam_deposits, session=info["session"])
        assert kept is not None
        return kept


async def read_clearing(request: Request, acquirers: dict[str, bytes],
                        ) -> tuple[str, dict[str, Any], str]:
    """(body, fields, signature) of clearing information signed by a known acquirer."""
    body = await read_body(request, MAX_INFO)
    try:
        loaded = json.loads(body)
    except (ValueError, RecursionError):
        raise M.MessageError("clearing: not JSON") from None
    data = M.check(loaded, INFO, "clearing")
    signer = request.headers.get(S.SIGNER, "")
    key = acquirers.get(signer)
    if key is None or data["acquirer"] != signer:
        raise Refused(403, 403, "clearing: not from a mediating agent this server knows")
    signature = request.headers.get(S.SIGNATURE, "")
    if not S.verify(key, S.CLEARING, body, signature):
        raise Refused(401, 401, "clearing: the signature does not verify")
    return body.decode(), data, signature


def receipt(private: bytes, party: str, session: str, body: str) -> Response:
    return signed_json(private, party, S.RECEIPT, {
        "party": party, "session": session, "clearing": M.digest(body.encode())})


class AccountClearing:
    """The customer account manager's routes for the end of a session."""

    def __init__(self, am: AccountManager) -> None:
        self.am = am

    async def rewrite(self, session: str) -> None:
        """(Re)write the session's withdrawal file from the database (a purse-funded
        session's again when the rest is loaded)."""
        am = self.am
        row = await am.sql(first_row, am.engine, D.am_withdrawals, session=session)
        if row is not None:
            more = await am.sql(withdrawal_extra, am.engine, session)
            write_file(am.config.billing, "withdrawals", session,
                       {**file_payload("withdrawals", row), **more})

    def _acquirers(self) -> dict[str, bytes]:
        return {p.id: p.public_key for p in self.am.config.operators.values()}

    async def clearing(self, request: Request) -> Response:
        try:
            am = self.am
            body, info, signature = await read_clearing(request, self._acquirers())
            if info["account_manager"] != am.config.id:
                raise Refused(403, 403, "clearing: for another account manager")
            # only the session's own mediating agent clears it (its operator is fixed at
            # initiation), not any acquirer this account manager knows
            held = await am.sql(first_row, am.engine, D.am_sessions, session=info["session"])
            operator = am.config.operators.get(held["operator"]) if held else None
            if operator is None or operator.id != info["acquirer"]:
                raise Refused(403, 403, "clearing: not from this session's mediating agent")
            await am.sql(take_withdrawal, am.engine, info, body, signature, am.now_ms())
            await self.rewrite(info["session"])
            return receipt(am.config.private_key, am.config.id, info["session"], body)
        except Refused as exc:
            return refused(exc)

    async def _session(self, session: str, pseudonym: str | None) -> dict[str, Any]:
        row = await self.am.sql(first_row, self.am.engine, D.am_sessions, session=session) \
            if M.SESSION(session) else None
        if row is None or not same_pseudonym(pseudonym, row["pseudonym"]):
            raise Refused(404, 404, "no such session")
        return row

    async def record(self, request: Request) -> Response:
        """The customer agent's record (signed by the session key) to the mediating agent."""
        try:
            am = self.am
            session = request.path_params["session"]
            body = await read_body(request, K.MAX_RECORD)
            row = await self._session(session, request.headers.get(S.SIGNER))
            signature = request.headers.get(S.SIGNATURE, "")
            if not S.verify(bytes.fromhex(row["session_key"]), S.RECORD, body, signature):
                raise Refused(401, 401, "record: not signed by the session's key")
            try:
                rec = K.parse_record(body)
            except K.ClosingError as exc:
                raise M.MessageError(str(exc)) from None
            if rec["session"] != session or rec["side"] != "customer":
                raise Refused(400, 400, "record: for another session or side")
            operator = am.config.operators.get(row["operator"])
            if operator is None:
                raise Refused(404, 404, "record: the session's operator is not known now")
            env, headers = S.signed(am.config.private_key, am.config.id, S.FORWARD, {
                "account_manager": am.config.id, "session": session,
                "record": body.decode(), "signature": signature})
            try:
                async with httpx.AsyncClient(timeout=60) as http:
                    answer = await http.post(f"{operator.url}/v1/records/customer",
                                             content=env, headers=headers)
            except httpx.HTTPError as exc:
                raise Refused(502, 502, f"the mediating agent did not answer: "
                                        f"{type(exc).__name__}") from None
            return Response(answer.content[:M.MAX_MESSAGE * 4],
                            status_code=answer.status_code, media_type="application/json")
        except Refused as exc:
            return refused(exc)

    async def show(self, request: Request) -> Response:
        """The session's clearing, for the customer (``?pseudonym=``): the mediating agent's
        signed clearing information and the withdrawal."""
        try:
            session = request.path_params["session"]
            await self._session(session, request.query_params.get("pseudonym"))
            row = await self.am.sql(first_row, self.am.engine, D.am_withdrawals,
                                    session=session)
            if row is None:
                raise Refused(404, 404, f"session {session} is not cleared yet")
        except Refused as exc:
            return refused(exc)
        return JSONResponse({"clearing": row["info"], "signature": row["signature"],
                             "withdrawal": row["amount"], "currency": row["currency"]})
