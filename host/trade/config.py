"""The parties of a trading session and what each knows of the others.

Each server has its own Ed25519 key and knows the PUBLIC keys of the parties it hears from:
the account manager knows its customers (in its database) and, for each merchant operator,
that operator's mediating trusted agent (its URL, id and key: claim 3's "merchant's operator
id ... for locating a proper mediating trusted agent"); the mediating agent knows the account
managers it takes initiations from and its merchants (URL, key, currency) and holds its
bank's exchange table; the merchant agent knows its mediating agent. No party ever accepts a
message whose signer it does not know.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .money import ExchangeTable


@dataclass(frozen=True)
class Peer:
    id: str
    url: str
    public_key: bytes


@dataclass(frozen=True)
class MerchantPeer(Peer):
    currency: str = "EUR"


@dataclass
class AccountManagerConfig:
    id: str
    private_key: bytes = field(repr=False)
    db_url: str
    operators: dict[str, Peer]              # merchant operator id -> its mediating agent
    session_ms: int = 3_600_000             # how long a session may last
    max_sessions: int = 10_000              # open sessions per customer (bounded)


@dataclass
class AcquirerConfig:
    id: str
    private_key: bytes = field(repr=False)
    db_url: str
    account_managers: dict[str, bytes]      # id -> public key
    merchants: dict[str, MerchantPeer]
    table: ExchangeTable


@dataclass
class MerchantConfig:
    id: str
    private_key: bytes = field(repr=False)
    db_url: str
    acquirer: Peer
    currency: str
