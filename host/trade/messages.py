"""The trading-session messages (seed 004 FIG. 2, claims 1-8): their fields, each checked.

Every message is a bounded JSON object with exactly its fields (a missing or unknown one is
refused, naming it). The checkers below say what each field may hold; :func:`parse` applies a
field table to a body and raises :class:`MessageError` (400 at a server) naming the field.

=========================  =========================================================
message                    fields
=========================  =========================================================
initiation (claims 1, 3)   customer, txn, merchant, operator, deposit, currency,
                           order {item, price}, registration {session_key, agent}, created
amended (claim 4, 9)       account_manager, session, txn, merchant, deposit, currency,
                           pseudonym, session_key, cert, vouched, expires, created
lookup                     account_manager, session, txn, created
information (claim 5)      acquirer, merchant, session, pseudonym, deposit, currency,
                           cert, expires, created
merchant ack (claim 6)     merchant, session, pseudonym, deposit, currency, information
agent ack (claims 7, 8)    acquirer, session, txn, accepted, reason and, when accepted,
                           pseudonym, merchant, deposit_customer, currency_customer,
                           deposit_merchant, currency_merchant, rate, rounding, table,
                           merchant_ack, merchant_cert
purchase                   session, index, link, order {session, index, item, units},
                           signature
terminate (claim 10)       session, index, created
=========================  =========================================================

``cert`` is a temporary certificate (``trust/certs.py``) as its canonical text: in the amended
initiation the customer's FI (the account manager) signed it for the mediating agent; in the
information message the mediating agent signed it again for its merchant, which takes the
session's key from it and from nothing else. ``merchant_cert`` is the reverse direction: the
merchant's key for this session, signed by the mediating agent for the account manager, which
signs it again for its customer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from ..kit.http import Refused, check_json_shape
from .money import EXPONENTS, MAX_MINOR

MAX_MESSAGE = 4096       # bytes of any one message
MAX_SKEW = 300           # seconds between a message's "created" and the receiver's clock
_IDENT = re.compile(r"[A-Za-z0-9_.@-]{1,32}")
_SESSION = re.compile(r"[A-Za-z0-9_-]{1,32}\.[0-9]{1,12}")
_TXN = re.compile(r"[0-9a-f]{16,64}")
_HEX32 = re.compile(r"[0-9a-f]{64}")
_HEX64 = re.compile(r"[0-9a-f]{128}")
_RATE = re.compile(r"[1-9][0-9]{0,39}/[1-9][0-9]{0,39}")

Checker = Callable[[Any], bool]


class MessageError(Refused):
    """A message that is not well formed: 400, naming the field."""

    def __init__(self, reason: str) -> None:
        super().__init__(400, 400, reason)


def _pattern(p: re.Pattern[str]) -> Checker:
    return lambda v: isinstance(v, str) and p.fullmatch(v) is not None


def _int(low: int, high: int) -> Checker:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _text(most: int) -> Checker:
    return lambda v: isinstance(v, str) and len(v) <= most and v.isprintable()


IDENT = _pattern(_IDENT)
SESSION = _pattern(_SESSION)
TXN = _pattern(_TXN)
KEY = _pattern(_HEX32)
DIGEST = KEY
SIGNATURE = _pattern(_HEX64)
RATE = _pattern(_RATE)
CURRENCY: Checker = lambda v: isinstance(v, str) and v in EXPONENTS   # noqa: E731
DEPOSIT = _int(1, MAX_MINOR)
MINOR = _int(0, MAX_MINOR)
SECONDS = _int(1, 2**40)
MS = _int(1, 2**44)
INDEX = _int(1, 1_000_000)
UNITS = _int(1, 10_000)
ACK_TEXT = _text(2048)
CERT = _text(1024)          # a temporary certificate's canonical text (trust/certs.MAX_CERT)
TRUE: Checker = lambda v: v is True   # noqa: E731
BOOL: Checker = lambda v: isinstance(v, bool)   # noqa: E731

ORDER_INFO = {"item": IDENT, "price": MINOR}
REGISTRATION = {"session_key": KEY, "agent": _text(64)}
INITIATION: dict[str, Any] = {
    "customer": IDENT, "txn": TXN, "merchant": IDENT, "operator": IDENT, "deposit": DEPOSIT,
    "currency": CURRENCY, "order": ORDER_INFO, "registration": REGISTRATION, "created": SECONDS}
AMENDED: dict[str, Any] = {
    "account_manager": IDENT, "session": SESSION, "txn": TXN, "merchant": IDENT,
    "deposit": DEPOSIT, "currency": CURRENCY, "pseudonym": IDENT, "session_key": KEY,
    "cert": CERT, "vouched": TRUE, "expires": MS, "created": SECONDS}
INFORMATION: dict[str, Any] = {
    "acquirer": IDENT, "merchant": IDENT, "session": SESSION, "pseudonym": IDENT,
    "deposit": DEPOSIT, "currency": CURRENCY, "cert": CERT, "expires": MS,
    "created": SECONDS}
LOOKUP: dict[str, Any] = {
    "account_manager": IDENT, "session": SESSION, "txn": TXN, "created": SECONDS}
MERCHANT_ACK: dict[str, Any] = {
    "merchant": IDENT, "session": SESSION, "pseudonym": IDENT, "deposit": DEPOSIT,
    "currency": CURRENCY, "information": DIGEST}
AGENT_REFUSAL: dict[str, Any] = {
    "acquirer": IDENT, "session": SESSION, "txn": TXN, "accepted": BOOL, "reason": _text(300)}
AGENT_ACK: dict[str, Any] = {
    **AGENT_REFUSAL, "pseudonym": IDENT, "merchant": IDENT, "deposit_customer": DEPOSIT,
    "currency_customer": CURRENCY, "deposit_merchant": MINOR, "currency_merchant": CURRENCY,
    "rate": RATE, "rounding": MINOR, "table": IDENT, "merchant_ack": DIGEST,
    "merchant_cert": CERT}
PURCHASE_ORDER = {"session": SESSION, "index": INDEX, "item": IDENT, "units": UNITS}
LINK_OR_NONE: Checker = lambda v: v == "" or KEY(v)   # noqa: E731
PURCHASE: dict[str, Any] = {   # link "": a FIG. 4 product, paid by the trusted party's release
    "session": SESSION, "index": INDEX, "link": LINK_OR_NONE, "order": PURCHASE_ORDER,
    "signature": SIGNATURE}
TERMINATE: dict[str, Any] = {"session": SESSION, "index": _int(0, 1_000_000),
                             "created": SECONDS}


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def load(body: bytes, what: str) -> Any:
    if len(body) > MAX_MESSAGE:
        raise Refused(413, 413, f"{what}: more than {MAX_MESSAGE} bytes")
    check_json_shape(body, max_depth=3, max_items=48)
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise MessageError(f"{what}: not JSON") from None


def check(data: Any, fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``data`` with exactly ``fields`` (a nested table is a nested object), each checked."""
    if not isinstance(data, dict):
        raise MessageError(f"{where}: not a JSON object")
    if set(data) != set(fields):
        missing, extra = sorted(set(fields) - set(data)), sorted(set(data) - set(fields))
        raise MessageError(f"{where}: fields missing {missing}, unknown {extra[:4]}")
    for name, rule in fields.items():
        if isinstance(rule, dict):
            check(data[name], rule, f"{where}.{name}")
        elif not rule(data[name]):
            raise MessageError(f"{where}.{name}: not a valid value")
    return data


def parse(body: bytes, fields: Mapping[str, Any], what: str) -> dict[str, Any]:
    return check(load(body, what), fields, what)


def parse_agent_ack(body: bytes) -> dict[str, Any]:
    data = load(body, "agent ack")
    accepted = isinstance(data, dict) and data.get("accepted") is True
    return check(data, AGENT_ACK if accepted else AGENT_REFUSAL, "agent ack")
