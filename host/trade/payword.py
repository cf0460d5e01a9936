"""Purchases inside a trading session: PayWord hash chains under one signed commitment.

At session start the customer agent draws a random seed ``w_n`` and hashes it down to the root
``w_0`` (``w_{i-1} = H(w_i)``, SHA-256). It signs ONE :class:`Commitment` with the session's
Ed25519 key: the root, the chain's length ``n``, the value of one link in the merchant's
currency, the session id, the merchant id and the expiry. The merchant learned the session's
public key from the mediating trusted agent (the information message), so it checks that one
signature, and from then on each payment of ``k`` units is the link ``w_{j+k}``: the merchant,
holding ``w_j``, hashes the new link ``k`` times and must meet ``w_j`` (hashes only: no
signature per purchase). The merchant keeps the highest link it verified; that link is what it
redeems, and nobody but the customer could have made it (a hash cannot be run backwards).

Each purchase also carries the customer's signed order (``sign(order)^c`` in the seed), the
evidence of WHAT was ordered for that link: :func:`order_payload` binds session, link index,
item and units. The merchant keeps it with the link.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from . import signing as S

LINK = 32                  # bytes of a link
MAX_LENGTH = 1_000_000     # links in one chain
MAX_STEP = 10_000          # links one payment may reveal at once (bounds the merchant's work)


class PaywordError(ValueError):
    """A commitment or payment that is refused (the message says why)."""


def h(link: bytes) -> bytes:
    return hashlib.sha256(link).digest()


def chain(seed: bytes, length: int) -> list[bytes]:
    """``[w_0, ..., w_length]`` from ``w_length = seed``."""
    if len(seed) != LINK or not 1 <= length <= MAX_LENGTH:
        raise PaywordError(f"a chain takes a {LINK}-byte seed and 1..{MAX_LENGTH} links")
    links = [seed]
    for _ in range(length):
        links.append(h(links[-1]))
    links.reverse()
    return links


def link_at(seed: bytes, length: int, index: int) -> bytes:
    """``w_index`` from the seed alone (``length - index`` hashes)."""
    if not 0 <= index <= length:
        raise PaywordError(f"link {index} is outside the chain 0..{length}")
    link = seed
    for _ in range(length - index):
        link = h(link)
    return link


@dataclass(frozen=True)
class Commitment:
    session: str
    merchant: str
    root: bytes
    length: int
    unit: int          # minor units of ``currency`` one link is worth
    currency: str
    expires: int       # ms since 1970

    def payload(self) -> dict[str, Any]:
        return {"session": self.session, "merchant": self.merchant, "root": self.root.hex(),
                "length": self.length, "unit": self.unit, "currency": self.currency,
                "expires": self.expires}

    def body(self) -> bytes:
        return S.canonical(self.payload())

    @property
    def value(self) -> int:
        return self.length * self.unit

    @classmethod
    def from_payload(cls, data: Any) -> Commitment:
        """A commitment from its JSON object, every field checked."""
        fields = {"session", "merchant", "root", "length", "unit", "currency", "expires"}
        if not isinstance(data, dict) or set(data) != fields:
            raise PaywordError(f"commitment: exactly the fields {sorted(fields)}")
        for name in ("session", "merchant", "currency", "root"):
            if not isinstance(data[name], str) or not 0 < len(data[name]) <= 64:
                raise PaywordError(f"commitment.{name}: not a short text")
        for name, top in (("length", MAX_LENGTH), ("unit", 10**12), ("expires", 2**44)):
            value = data[name]
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= top:
                raise PaywordError(f"commitment.{name}: not a whole number in 1..{top}")
        try:
            root = bytes.fromhex(data["root"])
        except ValueError:
            root = b""
        if len(root) != LINK:
            raise PaywordError(f"commitment.root: not {LINK} bytes of hex")
        return cls(data["session"], data["merchant"], root, data["length"], data["unit"],
                   data["currency"], data["expires"])


@dataclass
class Wallet:
    """The customer agent's side of one chain: the seed and the next link to spend."""

    seed: bytes = field(repr=False)   # the secret end of the chain
    length: int
    spent: int = 0          # links revealed so far
    _links: bytes = field(default=b"", repr=False)   # w_0 .. w_n, made at the first payment

    @classmethod
    def new(cls, length: int) -> Wallet:
        if not 1 <= length <= MAX_LENGTH:
            raise PaywordError(f"a chain has 1..{MAX_LENGTH} links")
        return cls(os.urandom(LINK), length)

    @property
    def root(self) -> bytes:
        return link_at(self.seed, self.length, 0)

    def pay(self, units: int) -> tuple[int, bytes]:
        """(index, link) paying ``units`` more links; refused past the chain's end."""
        if not 1 <= units <= MAX_STEP or self.spent + units > self.length:
            raise PaywordError(f"cannot pay {units} links: {self.length - self.spent} left "
                               f"(at most {MAX_STEP} at once)")
        if not self._links:
            self._links = b"".join(chain(self.seed, self.length))
        self.spent += units
        return self.spent, self._links[self.spent * LINK:(self.spent + 1) * LINK]


def order_payload(session: str, index: int, item: str, units: int) -> dict[str, Any]:
    """What the customer signs for one purchase: the order and the link that pays it."""
    return {"session": session, "index": index, "item": item, "units": units}


@dataclass
class Verifier:
    """The merchant's side: the verified commitment and the highest link it holds."""

    commitment: Commitment
    index: int = 0
    link: bytes = b""

    def __post_init__(self) -> None:
        if not self.link:
            self.link = self.commitment.root

    @classmethod
    def open(cls, body: bytes, signature: str, session_key: bytes, session: str,
             merchant: str, now_ms: int) -> Verifier:
        """Check a commitment's signature (the session's key) and that it is for this
        session and merchant and not expired."""
        if not S.verify(session_key, S.COMMITMENT, body, signature):
            raise PaywordError("the commitment's signature does not verify")
        try:
            c = Commitment.from_payload(json.loads(body))
        except ValueError as exc:
            raise PaywordError(str(exc)) from None
        if c.session != session or c.merchant != merchant:
            raise PaywordError("the commitment is for another session or merchant")
        if c.expires <= now_ms:
            raise PaywordError("the commitment has expired")
        return cls(c)

    def check(self, index: int, link: bytes) -> int:
        """Units paid by ``link`` at ``index`` beyond the held one, hashes only; raises if it
        does not hash down to the held link. Does not change the verifier (see :meth:`take`)."""
        step = index - self.index
        if len(link) != LINK:
            raise PaywordError(f"a link is {LINK} bytes")
        if index > self.commitment.length:
            raise PaywordError(f"link {index} is past the chain's end "
                               f"({self.commitment.length})")
        if step <= 0:
            raise PaywordError(f"link {index} was paid already (the merchant holds "
                               f"{self.index}): a replay")
        if step > MAX_STEP:
            raise PaywordError(f"a payment reveals at most {MAX_STEP} links")
        x = link
        for _ in range(step):
            x = h(x)
        if x != self.link:
            raise PaywordError(f"link {index} does not hash down to the held link "
                               f"{self.index}: forged or for another chain")
        return step

    def take(self, index: int, link: bytes) -> int:
        step = self.check(index, link)
        self.index, self.link = index, link
        return step
