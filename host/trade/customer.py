"""The customer agent (seed 004, 201) as a library; ``svcard session`` is its command line.

:func:`open_session` sends the initiation (claims 1, 3) to the customer's account manager,
signed by the customer's key, with a fresh Ed25519 session key as the registration data; it
checks the account manager's signed answer (the mediating agent's acknowledgement and the
exchange rate, claim 8), makes the PayWord chain for the deposit in the merchant's currency
and gives the merchant the signed commitment. :func:`buy` pays the next link(s) with a signed
order; :func:`terminate` ends the session at the merchant (claim 10). The session's secrets
(its private key and the chain's seed) live in :class:`Session`, which :func:`save` writes to a
file only the user can read and whose repr shows no secret.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx

from . import closing as K
from . import signing as S
from .money import (
    Amount,
    ExchangeTable,
    MoneyError,
    minor_factor,
    table_from_payload,
    table_payload,
)
from .payword import MAX_LENGTH, Commitment, PaywordError, Wallet, link_at, order_payload
from .trust import certs


class TradeError(Exception):
    """A refusal or an answer that cannot be trusted (the message says which)."""


@dataclass
class Session:
    session: str
    pseudonym: str
    merchant: str
    merchant_url: str
    deposit: int                # the customer's currency
    currency: str
    deposit_merchant: int       # the merchant's currency
    currency_merchant: str
    rate: str                   # merchant major per customer major, "num/den"
    expires: int
    unit: int
    length: int
    spent: int
    session_key: bytes = field(repr=False)
    seed: bytes = field(repr=False)
    opened: dict[str, Any] = field(default_factory=dict, repr=False)
    orders: list[dict[str, Any]] = field(default_factory=list, repr=False)   # the list kept
    account_url: str = ""
    account_key: str = ""       # the account manager's public key (hex): its table, later
    purse_order: str = ""       # a deposit paid by a purse card: its order (the rest's load)
    closing: dict[str, str] = field(default_factory=dict, repr=False)  # the record, once made
    pending: dict[str, Any] = field(default_factory=dict, repr=False)  # FIG. 4: unpaid product
    _wallet: Wallet | None = field(default=None, repr=False, compare=False)   # not saved

    def wallet(self) -> Wallet:
        """The chain at ``spent``; its links are made once per process, not per purchase."""
        if self._wallet is None or self._wallet.spent != self.spent:
            links = self._wallet._links if self._wallet is not None else b""
            self._wallet = Wallet(self.seed, self.length, self.spent, links)
        return self._wallet

    def left(self) -> Amount:
        return Amount((self.length - self.spent) * self.unit, self.currency_merchant)

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items()
                if k not in ("session_key", "seed", "_wallet")}
        return {**data, "session_key": self.session_key.hex(), "seed": self.seed.hex()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Session:
        fields = dict(data)
        fields["session_key"] = bytes.fromhex(fields["session_key"])
        fields["seed"] = bytes.fromhex(fields["seed"])
        return cls(**fields)


def save(path: Path, session: Session) -> None:
    """Write ``session`` to ``path`` (mode 0600), replacing it atomically. The temporary file
    is always made afresh (a ``.tmp`` left from before is removed first, never reused: an
    existing file keeps its mode, and the session's private key must not land in a 0644 file;
    O_NOFOLLOW: nor follow a link planted there)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)              # whatever the umask left, the mode is exactly 0600
    with os.fdopen(fd, "w") as f:
        json.dump(session.to_json(), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> Session:
    try:
        return Session.from_json(json.loads(path.read_text()))
    except OSError as exc:
        raise TradeError(f"{path}: cannot read the session file: {exc.strerror}") from None
    except (ValueError, TypeError, KeyError):
        raise TradeError(f"{path}: not an svcard session file") from None


def reason_of(answer: httpx.Response) -> str:
    try:
        return str(answer.json().get("reason", answer.text))[:300]
    except ValueError:
        return answer.text[:300]


def fetch_table(http: httpx.Client, account_url: str, account_id: str,
                account_public: bytes) -> ExchangeTable:
    """The bank's exchange table from the customer's account manager, its signature checked."""
    answer = http.get(f"{account_url}/v1/exchange-table")
    if answer.status_code != 200:
        raise TradeError(f"no exchange table from the account manager (HTTP "
                         f"{answer.status_code}): {reason_of(answer)}")
    if answer.headers.get(S.SIGNER) != account_id or not S.verify(
            account_public, S.TABLE, answer.content, answer.headers.get(S.SIGNATURE)):
        raise TradeError("the exchange table is not signed by the account manager")
    try:
        return table_from_payload(json.loads(answer.content))
    except (ValueError, MoneyError) as exc:
        raise TradeError(f"the exchange table cannot be used: {exc}") from None


def save_table(path: Path, table: ExchangeTable) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table_payload(table)))
    os.replace(tmp, path)


def device_table(http: httpx.Client | None, path: Path, account_url: str | None,
                 account_id: str | None, account_public: bytes | None, now_ms: int,
                 fetch: bool = False) -> tuple[ExchangeTable, str | None]:
    """The exchange table this device keeps at ``path`` (the seed's currency-table
    embodiment), and a warning when it had none or it had expired. A missing or expired copy
    (or ``fetch``) is fetched anew from the account manager, its signature checked, and kept;
    with no account manager to ask, or if its table is expired as well: TradeError."""
    table = load_table(path)
    if table is not None and table.valid(now_ms) and not fetch:
        return table, None
    warning = table_warning(path, now_ms) or None
    if http is None or not (account_url and account_id and account_public):
        raise TradeError(f"{path}: fetch a new table: give --account-url, --account-id and "
                         "--account-key")
    table = fetch_table(http, account_url, account_id, account_public)
    if not table.valid(now_ms):
        raise TradeError(f"the account manager's exchange table of {table.issuer} is not "
                         f"valid now (until {when(table.expires)}): not kept")
    save_table(path, table)
    return table, warning


def table_warning(path: Path, now_ms: int) -> str:
    """Why the device's kept table cannot be used now ("" when it can)."""
    table = load_table(path)
    if table is None:
        return f"{path}: no exchange table"
    if not table.valid(now_ms):
        return f"{path}: the exchange table of {table.issuer} expired at {when(table.expires)}"
    return ""


def when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def in_customer_currency(s: Session, minor: int) -> Amount:
    """``minor`` units of the merchant's currency in the customer's, at the session's rate,
    fixed when it opened (not the device's table), rounded up: what it costs at most."""
    num, den = (int(x) for x in s.rate.split("/"))
    factor = minor_factor(Fraction(den, num), s.currency_merchant, s.currency)
    return Amount(math.ceil(minor * factor), s.currency)


def load_table(path: Path) -> ExchangeTable | None:
    """The table the device keeps, or None when there is none (or it cannot be read)."""
    try:
        return table_from_payload(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def initiation(customer: str, customer_key: bytes, session_public: bytes, merchant: str,
               operator: str, deposit: Amount, item: str, price: int,
               txn: str | None = None, created: int | None = None
               ) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a signed initiation message."""
    payload = {"customer": customer, "txn": txn or secrets.token_hex(16),
               "merchant": merchant, "operator": operator, "deposit": deposit.minor,
               "currency": deposit.code, "order": {"item": item, "price": price},
               "registration": {"session_key": session_public.hex(), "agent": "svcard"},
               "created": int(time.time()) if created is None else created}
    return S.signed(customer_key, customer, S.INITIATION, payload)


def open_session(http: httpx.Client, account_url: str, account_id: str,
                 account_public: bytes, customer: str, customer_key: bytes,
                 merchant: str, merchant_url: str, operator: str, deposit: Amount,
                 item: str = "session", price: int = 0, unit: int | None = None) -> Session:
    """Open a trading session (FIG. 2) and give the merchant the signed commitment."""
    session_key, session_public = S.new_key()
    body, headers = initiation(customer, customer_key, session_public, merchant, operator,
                               deposit, item, price)
    answer = http.post(f"{account_url}/v1/sessions", content=body, headers=headers)
    if answer.status_code != 200:
        raise TradeError(f"the account manager refused the session (HTTP "
                         f"{answer.status_code}): {reason_of(answer)}")
    if answer.headers.get(S.SIGNER) != account_id:
        raise TradeError("the account manager's answer is not signed by it")
    return opened_session(http, account_url, account_public, answer.content,
                          answer.headers.get(S.SIGNATURE), merchant, merchant_url, deposit,
                          session_key, unit)


def opened_session(http: httpx.Client, account_url: str, account_public: bytes,
                   content: bytes, signature: str | None, merchant: str, merchant_url: str,
                   deposit: Amount, session_key: bytes, unit: int | None = None,
                   purse_order: str = "") -> Session:
    """The session the account manager's signed ``opened`` answer opened (checked), its
    chain made and its commitment given to the merchant."""
    if not S.verify(account_public, S.OPENED, content, signature):
        raise TradeError("the account manager's answer is not signed by it")
    opened = json.loads(content)
    if opened.get("merchant") != merchant or opened.get("deposit") != deposit.minor or \
            opened.get("currency") != deposit.code:
        raise TradeError("the account manager opened another session than asked")
    if opened.get("merchant_cert"):    # the merchant's key, signed by our own FI only
        try:
            certs.verify(account_public, opened["merchant_cert"].encode(), opened["session"],
                         None)      # in the signed answer of the opening: any age (resume)
        except certs.CertError as exc:
            raise TradeError(f"the merchant's certificate: {exc.reason}") from None
    value = int(opened["deposit_merchant"])
    unit = unit or max(1, -(-value // MAX_LENGTH))
    length = value // unit
    if length < 1:
        raise TradeError(f"the deposit ({value} minor units of {opened['currency_merchant']})"
                         f" is less than one unit of {unit}")
    wallet = Wallet.new(length)
    s = Session(opened["session"], opened["pseudonym"], merchant, merchant_url,
                deposit.minor, deposit.code, value, opened["currency_merchant"],
                opened["rate"], int(opened["expires"]), unit, length, 0, session_key,
                wallet.seed, opened, account_url=account_url,
                account_key=account_public.hex(), purse_order=purse_order)
    commit(http, s)
    return s


def commit(http: httpx.Client, s: Session) -> None:
    c = Commitment(s.session, s.merchant, s.wallet().root, s.length, s.unit,
                   s.currency_merchant, s.expires)
    body = c.body()
    answer = http.post(f"{s.merchant_url}/v1/sessions/{s.session}/commitment",
                       json={"commitment": c.payload(),
                             "signature": S.sign(s.session_key, S.COMMITMENT, body),
                             "acquirer_ack": s.opened["acquirer_ack"],
                             "acquirer_signature": s.opened["acquirer_signature"]})
    if answer.status_code != 200:
        raise TradeError(f"the merchant refused the commitment (HTTP {answer.status_code}): "
                         f"{reason_of(answer)}")


def purchase(s: Session, item: str, units: int = 1) -> dict[str, Any]:
    """The next purchase's message. The session's ``spent`` moves on at once: a link once
    revealed counts as paid (the merchant may hold it even if its answer is lost)."""
    if s.pending:   # a later link would pay the product before its K2 is released
        raise TradeError(f"the product of link {s.pending['index']} awaits its acceptance")
    wallet = s.wallet()
    try:
        index, link = wallet.pay(units)
    except PaywordError as exc:
        raise TradeError(str(exc)) from None
    order = order_payload(s.session, index, item, units)
    s.spent = wallet.spent
    signature = S.sign(s.session_key, S.ORDER, S.canonical(order))
    s.orders.append(K.entry(index, item, units, signature))
    return {"session": s.session, "index": index, "link": link.hex(), "order": order,
            "signature": signature}


def buy(http: httpx.Client, s: Session, item: str, units: int = 1) -> dict[str, Any]:
    """Pay ``units`` links for ``item``; the merchant's answer. Refused: TradeError."""
    message = purchase(s, item, units)
    answer = http.post(f"{s.merchant_url}/v1/sessions/{s.session}/purchases", json=message)
    if 400 <= answer.status_code < 500:     # a definite no: not in this side's record
        s.orders.pop()
    if answer.status_code != 200:
        raise TradeError(f"the merchant refused the purchase (HTTP {answer.status_code}): "
                         f"{reason_of(answer)}")
    got: dict[str, Any] = answer.json()
    return got


def terminate(http: httpx.Client, s: Session) -> dict[str, Any]:
    """Claim 10: the customer agent's terminate message to the merchant agent."""
    body, headers = S.signed(s.session_key, s.pseudonym, S.TERMINATE,
                             {"session": s.session, "index": s.spent,
                              "created": int(time.time())})
    answer = http.post(f"{s.merchant_url}/v1/sessions/{s.session}/terminate", content=body,
                       headers=headers)
    if answer.status_code != 200:
        raise TradeError(f"the merchant refused to terminate (HTTP {answer.status_code}): "
                         f"{reason_of(answer)}")
    got: dict[str, Any] = answer.json()
    return got


def evidence(s: Session) -> dict[str, Any] | None:
    """The customer's own evidence for its record, the same kind a merchant shows: the
    commitment (signed again by the session key: Ed25519 is deterministic, so the same
    signature the merchant holds), the link at the last order's index and that signed order.
    It is what the customer admits: when the merchant's record never comes, the mediating
    agent pays the merchant this link (``closing.admitted``)."""
    if not s.orders:
        return None
    last = s.orders[-1]
    c = Commitment(s.session, s.merchant, s.wallet().root, s.length, s.unit,
                   s.currency_merchant, s.expires)
    order = S.canonical(order_payload(s.session, last["index"], last["item"], last["units"]))
    return {"index": last["index"], "link": link_at(s.seed, s.length, last["index"]).hex(),
            "commitment": c.body().decode(),
            "commitment_signature": S.sign(s.session_key, S.COMMITMENT, c.body()),
            "order": order.decode(), "order_signature": last["signature"]}


def record(s: Session, ended: str = "terminated", created: int | None = None
           ) -> tuple[bytes, dict[str, str]]:
    """The customer's transaction record (FIG. 3): the purchase list sealed under a key from
    the chain's seed, its hash, count and total; signed by the session key. Made once and kept
    in the session: sent again (after a lost answer), it is the same bytes."""
    if not s.closing:
        key = K.record_key(s.seed, s.session, "customer")
        payload = K.make_record(s.session, "customer", s.pseudonym, ended,
                                s.currency_merchant, s.unit, s.orders, key,
                                int(time.time()) if created is None else created,
                                evidence(s))
        body, headers = S.signed(s.session_key, s.pseudonym, S.RECORD, payload)
        s.closing = {"body": body.decode(), "signature": headers[S.SIGNATURE]}
    return s.closing["body"].encode(), {S.SIGNATURE: s.closing["signature"],
                                        S.SIGNER: s.pseudonym,
                                        "Content-Type": "application/json"}


def close(http: httpx.Client, s: Session) -> dict[str, Any]:
    """End the session: the terminate message to the merchant (claim 10), then the record to
    the account manager, which forwards it to the mediating agent (claim 11). The mediating
    agent's answer: with ``clearing`` when it cleared the session at once. Call it again
    after a lost answer: the same record goes again."""
    ended = terminate(http, s) if not s.closing else {}
    body, headers = record(s, "spent" if ended.get("state") == "spent" else "terminated")
    answer = http.post(f"{s.account_url}/v1/sessions/{s.session}/record", content=body,
                       headers=headers)
    if answer.status_code != 200:
        raise TradeError(f"the record was refused (HTTP {answer.status_code}): "
                         f"{reason_of(answer)}")
    got: dict[str, Any] = answer.json()
    return got


def my_list(s: Session, sealed: str) -> list[dict[str, Any]]:
    """Open the list this customer sealed (for a dispute)."""
    return K.unseal(K.record_key(s.seed, s.session, "customer"), s.session, "customer", sealed)


__all__ = ["Session", "TradeError", "buy", "close", "load", "my_list", "open_session",
           "record", "save", "terminate"]
