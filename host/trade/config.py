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

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from ..kit.config import (
    ConfigError,
    CurrencyCode,
    Hex6,
    Hex8,
    Hex32,
    PosInt,
    SecretHex32,
    SecretText,
    Section,
    Url,
    db_setting,
    parse_config,
)
from .money import ExchangeTable, exponent


@dataclass(frozen=True)
class Peer:
    id: str
    url: str
    public_key: bytes


@dataclass(frozen=True)
class MerchantPeer(Peer):
    currency: str = "EUR"


@dataclass
class PurseSettings:
    """The account manager's purse desk (issue 15 point 7): a merchant of a seed-002 payment
    server (the card pays the deposit into its PSAM) and a bank of a load server (the rest
    is loaded back onto the same card)."""

    merchant_id: bytes                      # 8 bytes: its merchant id at the payment server
    payment_key: bytes = field(repr=False)  # the key it shares with the payment server
    payment_url: str = ""
    payment_terminal: bytes = bytes(6)      # the payment server's PSAM terminal id
    bank_id: bytes = bytes(8)               # its bank id at the load server
    load_key: bytes = field(default=b"", repr=False)   # shared with the load server
    load_url: str = ""
    load_terminal: bytes = bytes(6)         # the load server's terminal id
    currency: str = "CNY"                   # the cards' currency (ISO 4217 alphabetic)
    currency_code: int = 156                # ... and numeric, as the card holds it
    public_url: str = ""                    # where customers reach this account manager


@dataclass
class AccountManagerConfig:
    id: str
    private_key: bytes = field(repr=False)
    db_url: str
    operators: dict[str, Peer]              # merchant operator id -> its mediating agent
    session_ms: int = 3_600_000             # how long a session may last
    billing: Path = Path("billing")         # where withdrawal records are written
    max_sessions: int = 10_000              # open sessions per customer (bounded)
    recover_seconds: float = 30.0           # how often undecided initiations are settled
    table: ExchangeTable | None = None      # the bank's table its customers' devices keep
    purse: PurseSettings | None = None      # deposits paid by purse cards (point 7)


@dataclass
class AcquirerConfig:
    id: str
    private_key: bytes = field(repr=False)
    db_url: str
    account_managers: dict[str, bytes]      # id -> public key
    merchants: dict[str, MerchantPeer]
    table: ExchangeTable
    account_manager_urls: dict[str, str] = field(default_factory=dict)   # clearing goes there
    merchant_account: Peer | None = None    # the merchants' account manager (204)
    grace_ms: int = 60_000                  # how long the second record is waited for
    close_seconds: float = 5.0              # how often the clearing clock runs
    abandon_ms: int = 7 * 86_400_000        # after the expiry: a merchant that never answers
                                            # is cleared without (the deposit held till then)


@dataclass
class MerchantAccountConfig:
    """The merchant account manager (204): takes the clearing information from its acquirers
    and writes deposit records for the merchants' billing."""

    id: str
    private_key: bytes = field(repr=False)
    db_url: str
    acquirers: dict[str, bytes]             # id -> public key
    billing: Path = Path("billing")


@dataclass
class MerchantConfig:
    id: str
    private_key: bytes = field(repr=False)
    db_url: str
    acquirer: Peer
    currency: str
    # FIG. 4: the digital products it delivers, item -> (file, the description it signs)
    products: dict[str, tuple[Path, str]] = field(default_factory=dict)


# --- the TOML files of `svcard serve trade-*` ---------------------------------------------

Ident = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.@-]+$")]
Code = Annotated[str, Field(min_length=3, max_length=3, pattern=r"^[A-Z]{3}$")]


class OperatorEntry(Section):
    id: Ident                   # the merchant operator's id, as customers name it
    acquirer: Ident             # its mediating trusted agent's id
    url: Url
    public_key: Hex32


class PartyEntry(Section):
    id: Ident
    public_key: Hex32
    url: Url | None = None      # where this party is reached (clearing, records)


class PeerEntry(Section):
    id: Ident
    url: Url
    public_key: Hex32


class MerchantEntry(Section):
    id: Ident
    url: Url
    public_key: Hex32
    currency: Code


class TableEntry(Section):
    issuer: Ident
    base: Code
    issued: dt.datetime
    expires: dt.datetime
    rates: dict[Code, Annotated[str, Field(max_length=40)]] = Field(max_length=500)


class ProductEntry(Section):
    id: Ident                   # the item a purchase's order names
    file: Annotated[str, Field(min_length=1, max_length=500)]
    text: Annotated[str, Field(min_length=1, max_length=2048)]


class PurseEntry(Section):
    """The account manager's purse desk: ``[purse]`` (docs/trade.md, point 7)."""
    merchant_id: Hex8           # its merchant id at the payment server
    payment_key: SecretHex32    # the key it shares with the payment server
    payment_url: Url
    payment_terminal: Hex6      # the payment server's PSAM terminal id
    bank_id: Hex8               # its bank id at the load server
    load_key: SecretHex32       # the key it shares with the load server
    load_url: Url
    load_terminal: Hex6
    currency: Code              # the cards' currency, alphabetic ...
    currency_code: CurrencyCode  # ... and numeric
    public_url: Url             # where customers reach this account manager


class ServerFile(Section):
    id: Ident
    key: SecretHex32
    db: SecretText | None = None
    session_seconds: PosInt = 3600
    max_sessions: PosInt = 10_000
    operator: list[OperatorEntry] = Field(default_factory=list, max_length=1000)
    account_manager: list[PartyEntry] = Field(default_factory=list, max_length=1000)
    merchant: list[MerchantEntry] = Field(default_factory=list, max_length=10_000)
    table: TableEntry | None = None
    acquirer: PartyEntry | None = None
    currency: Code | None = None
    merchant_account: PeerEntry | None = None
    billing: Annotated[str, Field(min_length=1, max_length=500)] | None = None
    grace_seconds: PosInt = 60
    abandon_seconds: PosInt = 7 * 86_400
    purse: PurseEntry | None = None
    product: list[ProductEntry] = Field(default_factory=list, max_length=10_000)


def _ms(when: dt.datetime) -> int:
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def _unique(entries: list[Any], what: str) -> None:
    seen: set[str] = set()
    for i, e in enumerate(entries):
        if e.id in seen:
            raise ValueError(f"{what}[{i}].id: {e.id} is given twice")
        seen.add(e.id)


def server_config(role: str, path: Path, db_url: str | None = None
                  ) -> AccountManagerConfig | AcquirerConfig | MerchantConfig | \
        MerchantAccountConfig:
    """The configuration of a ``role`` server (``account-manager``, ``acquirer``,
    ``merchant``, ``merchant-account``) from the TOML file at ``path``; ``db_url``
    (``--db``) wins over the file's. A problem is one :class:`ConfigError` line naming the
    file and the field."""
    f = parse_config(ServerFile, path)
    db = db_setting(f.db, db_url).get("db_url", f"sqlite:///{f.id}.db")
    needs = {"account-manager": ("operator",), "acquirer": ("account_manager", "merchant",
                                                             "table"),
             "merchant": ("acquirer", "currency"), "merchant-account": ("acquirer",)}[role]
    try:
        for name in needs:
            if not getattr(f, name):
                raise ValueError(f"{name}: the {role} server needs it")
        for name, entries in (("operator", f.operator), ("account_manager", f.account_manager),
                              ("merchant", f.merchant)):
            _unique(entries, name)
        billing = Path(f.billing) if f.billing else Path(f"billing-{f.id}")
        table = None if f.table is None else ExchangeTable.from_text(
            f.table.issuer, f.table.base, f.table.rates, _ms(f.table.issued),
            _ms(f.table.expires))
        if role == "account-manager":
            return AccountManagerConfig(
                f.id, f.key, db, {o.id: Peer(o.acquirer, o.url.rstrip("/"), o.public_key)
                                  for o in f.operator},
                session_ms=f.session_seconds * 1000, max_sessions=f.max_sessions, table=table,
                billing=billing, purse=None if f.purse is None else PurseSettings(
                    f.purse.merchant_id, f.purse.payment_key, f.purse.payment_url.rstrip("/"),
                    f.purse.payment_terminal, f.purse.bank_id, f.purse.load_key,
                    f.purse.load_url.rstrip("/"), f.purse.load_terminal, f.purse.currency,
                    f.purse.currency_code, f.purse.public_url.rstrip("/")))
        if role == "acquirer":
            assert table is not None
            for m in f.merchant:
                table.rate(table.base, m.currency, table.issued)
            return AcquirerConfig(
                f.id, f.key, db, {a.id: a.public_key for a in f.account_manager},
                {m.id: MerchantPeer(m.id, m.url.rstrip("/"), m.public_key, m.currency)
                 for m in f.merchant}, table,
                {a.id: a.url.rstrip("/") for a in f.account_manager if a.url},
                None if f.merchant_account is None else Peer(
                    f.merchant_account.id, f.merchant_account.url.rstrip("/"),
                    f.merchant_account.public_key), grace_ms=f.grace_seconds * 1000,
                abandon_ms=f.abandon_seconds * 1000)
        assert f.acquirer is not None
        acq = Peer(f.acquirer.id, (f.acquirer.url or "").rstrip("/"), f.acquirer.public_key)
        if role == "merchant-account":
            return MerchantAccountConfig(f.id, f.key, db, {acq.id: acq.public_key}, billing)
        assert f.currency is not None
        exponent(f.currency)
        _unique(f.product, "product")
        return MerchantConfig(f.id, f.key, db, acq, f.currency,
                              {p.id: (path.parent / p.file, p.text) for p in f.product})
    except ValueError as exc:   # MoneyError too: a rate, a code, a lifespan
        raise ConfigError(f"{path}: {exc}") from None
