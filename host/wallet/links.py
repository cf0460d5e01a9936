"""What the wallet's servers share: the keyed link between two servers, passwords and card
secrets as stored, the product list's digest, and the checked fields of a JSON request.

A **link** (the seed's leased line: web server -> gateway, gateway -> financial system, a mall
-> gateway, a cash agent -> financial system) is HTTP with three headers: the sending party's
id, the time (Unix seconds) and an HMAC-SHA256, under the key the two parties share, over the
party, the method, the path, the time and the body. The receiver refuses (401) an unknown
party, a time more than :data:`MAX_SKEW` seconds from its clock, or a MAC that does not verify.
A request replayed within that window is harmless because every state change carries its own
unique reference (a charge's ``ref``, a purchase's id), which the receiver keeps.

Passwords are stored as argon2id hashes (argon2-cffi; ``hashlib.scrypt`` when that library is
missing). Card, account and credit-card secrets are stored as an HMAC under the financial
system's own key (a database copied without that key tells nothing about them).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from ..kit.http import Refused

LINK_DOMAIN = b"svcard-wallet-link-v1"
MAX_SKEW = 120                   # seconds between the sender's and the receiver's clock
PARTY, STAMP, MAC = "X-Wallet-Party", "X-Wallet-Time", "X-Wallet-Mac"
MAX_PRODUCTS = 50
MAX_AMOUNT = 10**12              # minor units
ID = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")
NUMBER = re.compile(r"^[0-9]{16}$")
SECRET = re.compile(r"^[0-9A-Za-z]{4,64}$")
CURRENCIES = range(1, 1000)


def link_mac(key: bytes, party: str, method: str, path: str, stamp: str, body: bytes) -> str:
    message = b"\n".join([LINK_DOMAIN, party.encode(), method.upper().encode(), path.encode(),
                          stamp.encode(), body])
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def link_headers(key: bytes, party: str, method: str, path: str, body: bytes,
                 now: float | None = None) -> dict[str, str]:
    """The headers that authenticate ``body`` sent by ``party`` as ``METHOD path``."""
    stamp = str(int(time.time() if now is None else now))
    return {PARTY: party, STAMP: stamp, MAC: link_mac(key, party, method, path, stamp, body),
            "Content-Type": "application/json"}


def check_link(keys: Mapping[str, bytes], headers: Mapping[str, str], method: str, path: str,
               body: bytes, now: float | None = None) -> str:
    """The authenticated party of a link request, else :class:`Refused` (401)."""
    party, stamp, mac = headers.get(PARTY, ""), headers.get(STAMP, ""), headers.get(MAC, "")
    key = keys.get(party)
    if key is None:
        raise Refused(401, 401, "unknown party on this link")
    if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12 or \
            abs(int(stamp) - int(time.time() if now is None else now)) > MAX_SKEW:
        raise Refused(401, 401, f"the request's time is more than {MAX_SKEW} s from ours")
    if not hmac.compare_digest(mac.encode(), link_mac(key, party, method, path, stamp,
                                                      body).encode()):
        raise Refused(401, 401, "the request's MAC does not verify")
    return party


# --- passwords and secrets -------------------------------------------------------------------

try:
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError

    # OWASP's minimum for argon2id: 19 MiB, 2 passes, one lane
    _hasher: PasswordHasher | None = PasswordHasher(time_cost=2, memory_cost=19 * 1024,
                                                    parallelism=1)
except ImportError:   # pragma: no cover - argon2-cffi is a dependency
    _hasher = None


def hash_password(password: str) -> str:
    if _hasher is not None:
        return _hasher.hash(password)
    salt = secrets.token_bytes(16)  # pragma: no cover
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)  # pragma: no cover
    return "scrypt$" + salt.hex() + "$" + digest.hex()  # pragma: no cover


def check_password(stored: str, password: str) -> bool:
    if stored.startswith("scrypt$"):
        _, salt, digest = stored.split("$")
        return hmac.compare_digest(bytes.fromhex(digest), hashlib.scrypt(
            password.encode(), salt=bytes.fromhex(salt), n=2**14, r=8, p=1))
    if _hasher is None:   # pragma: no cover
        return False
    try:
        return bool(_hasher.verify(stored, password))
    except (VerificationError, InvalidHashError):
        return False


def secret_digest(key: bytes, what: str, ident: str, secret: str) -> str:
    """How a card's, account's or credit card's secret is stored: keyed, never in clear."""
    return hmac.new(key, f"{what}\n{ident}\n{secret}".encode(), hashlib.sha256).hexdigest()


def new_secret(digits: int = 8) -> str:
    return "".join(secrets.choice("0123456789") for _ in range(digits))


def token() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def token_digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def origin(url: str) -> str:
    """``scheme://host:port`` of an http(s) URL, else ""."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme in ("http", "https") else ""


# --- checked fields --------------------------------------------------------------------------

def need(data: Any, name: str) -> Any:
    if not isinstance(data, dict) or name not in data:
        raise Refused(400, 400, f"{name}: missing")
    return data[name]


def text(data: Any, name: str, pattern: re.Pattern[str] = ID) -> str:
    value = need(data, name)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise Refused(400, 400, f"{name}: not a valid value")
    return value


def whole(data: Any, name: str, low: int = 0, high: int = MAX_AMOUNT) -> int:
    value = need(data, name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise Refused(400, 400, f"{name}: a whole number from {low} to {high}")
    return value


def choice(data: Any, name: str, allowed: tuple[str, ...]) -> str:
    value = need(data, name)
    if value not in allowed:
        raise Refused(400, 400, f"{name}: one of {', '.join(allowed)}")
    return str(value)


def products(data: Any) -> tuple[list[dict[str, Any]], int]:
    """The product list (1..MAX_PRODUCTS lines of sku, qty, price) and its total."""
    value = need(data, "products")
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_PRODUCTS:
        raise Refused(400, 400, f"products: a list of 1 to {MAX_PRODUCTS} lines")
    lines, total = [], 0
    for i, line in enumerate(value):
        if not isinstance(line, dict) or set(line) != {"sku", "qty", "price"}:
            raise Refused(400, 400, f"products[{i}]: exactly sku, qty and price")
        qty, price = whole(line, "qty", 1, 999), whole(line, "price", 0, MAX_AMOUNT)
        lines.append({"sku": text(line, "sku"), "qty": qty, "price": price})
        total += qty * price
    return lines, total


def products_digest(lines: list[dict[str, Any]]) -> str:
    """SHA-256 of the product list in one canonical JSON form."""
    canonical = json.dumps(lines, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


PURCHASE_FIELDS = ("mall", "order", "customer", "products", "amount", "currency", "nonce",
                   "expires")
NONCE = re.compile(r"^[0-9a-f]{32}$")


def purchase(data: Any) -> dict[str, Any]:
    """A purchase as the mall's page gives it and as the mall asks approval of it: mall id,
    order, the customer's id at the mall, products, amount (their total), currency, a nonce
    and the expiry (Unix ms). Only these keys."""
    if not isinstance(data, dict) or set(data) != set(PURCHASE_FIELDS):
        raise Refused(400, 400, "purchase: exactly " + ", ".join(PURCHASE_FIELDS))
    lines, total = products(data)
    out = {"mall": text(data, "mall"), "order": text(data, "order"),
           "customer": text(data, "customer"), "products_digest": products_digest(lines),
           "amount": whole(data, "amount", 1), "currency": whole(data, "currency", 1, 999),
           "nonce": text(data, "nonce", NONCE), "expires": whole(data, "expires", 0, 2**53)}
    if out["amount"] != total:
        raise Refused(400, 400, "amount: not the total of the products")
    return out


FILL_DOMAIN = b"svcard-wallet-fill-v1"
PROFILE = re.compile(r"^[0-9a-f]{96}$")


def fill_mac(link_key: bytes, pid: str, card: str, p: Mapping[str, Any]) -> str:
    """The MAC part of a card's *profile* token (embodiments 2 and 3): the gateway makes it
    when the member's wallet fills the card's details into a mall's form, under a key derived
    from the gateway <-> financial system link key, so the financial system can check it for
    the VAN without asking the gateway. It binds the purchase id, the card and every field of
    the purchase as :func:`purchase` reads it (mall, order, customer, the products' digest,
    amount, currency, nonce, expiry)."""
    key = hmac.new(link_key, FILL_DOMAIN, hashlib.sha256).digest()
    message = "\n".join([pid, card] + [str(p[name]) for name in (
        "mall", "order", "customer", "products_digest", "amount", "currency", "nonce",
        "expires")])
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def profile_token(link_key: bytes, pid: str, card: str, p: Mapping[str, Any]) -> str:
    return pid + fill_mac(link_key, pid, card, p)


def check_profile(link_key: bytes, token_value: str, card: str, p: Mapping[str, Any]) -> str | None:
    """The purchase id in a profile token made for ``card`` and purchase ``p``, else None."""
    if not PROFILE.fullmatch(token_value):
        return None
    pid, mac = token_value[:32], token_value[32:]
    good = fill_mac(link_key, pid, card, p)
    return pid if hmac.compare_digest(mac.encode(), good.encode()) else None


class LinkClient:
    """One side of a link: POSTs JSON to ``base`` as ``party`` under ``key``."""

    def __init__(self, http: Any, base: str, party: str, key: bytes) -> None:
        self.http, self.base, self.party, self.key = http, base.rstrip("/"), party, key

    def post(self, path: str, data: Any) -> tuple[int, Any]:
        """(status, JSON answer); a transport error is raised (httpx.TransportError)."""
        body = json.dumps(data, separators=(",", ":")).encode()
        r = self.http.post(self.base + path, content=body,
                           headers=link_headers(self.key, self.party, "POST", path, body))
        try:
            answer = r.json()
        except ValueError:
            answer = {"reason": r.text[:200]}
        return r.status_code, answer

    def __repr__(self) -> str:
        return f"LinkClient({self.base!r}, party={self.party!r})"
