"""TOML configuration of the load server and the bank (``svcard serve load``, ``svcard serve
bank``): each file as a pydantic model (``LoadFile``, ``BankFile``); a field left out takes the
default of ``LoadConfig`` or ``BankConfig``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from ..kit.config import (
    ConfigError,
    CurrencyCode,
    CurrencyExponent,
    Hex6,
    Hex8,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    SecretHex32,
    SecretText,
    Section,
    Url,
    db_setting,
    parse_config,
)
from .bank.server import BankConfig
from .server.app import BankAccount, LoadConfig

# one of several load nodes on one database (server/leases.py; docs/deploy-nodes.md)
NodeName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,60}$")]
LeaseSeconds = Annotated[float, Field(ge=1.0, le=3600.0)]


class BankEntry(Section):
    """A ``[[bank]]`` of the load server."""

    id: Hex8
    shared_key: SecretHex32


class LoadFile(Section):
    terminal_id: Hex6
    bank: list[BankEntry] = Field(min_length=1)
    db: SecretText | None = None
    acquire_timeout: PosFloat | None = None
    node_name: NodeName | None = None
    lease_seconds: LeaseSeconds | None = None


class IssuerEntry(Section):
    """An ``[[issuers]]`` entry of the bank: the balance limit of that issuer's cards."""

    issuer_id: Hex8
    balance_limit: Annotated[int, Field(ge=0, le=0xFFFFFFFF)]   # minor units, as GET DATA 9F77


class BankFile(Section):
    bank_id: Hex8
    shared_key: SecretHex32
    load_url: Url
    terminal_id: Hex6
    db: SecretText | None = None
    public_url: Url | None = None
    currency_code: CurrencyCode | None = None
    currency_exponent: CurrencyExponent | None = None
    order_lifetime: PosInt | None = None
    secret_max_failures: NonNegInt | None = None
    secret_lockout: NonNegFloat | None = None
    secret_lockout_max: NonNegFloat | None = None
    address_max_failures: NonNegInt | None = None
    address_window: NonNegFloat | None = None
    secret_cache_seconds: NonNegFloat | None = None
    issuers: list[IssuerEntry] = Field(default_factory=list)


def load_config(path: Path, db_url: str | None = None) -> LoadConfig:
    f = parse_config(LoadFile, path)
    banks: dict[bytes, BankAccount] = {}
    for i, b in enumerate(f.bank):
        if b.id in banks:
            raise ConfigError(f"{path}: bank[{i}].id: {b.id.hex().upper()} is given twice")
        banks[b.id] = BankAccount(b.id, b.shared_key)
    if f.lease_seconds is not None and f.node_name is None:
        raise ConfigError(f"{path}: lease_seconds: only for a node (give node_name too)")
    settings = f.model_dump(exclude_none=True, exclude={"bank", "db", "terminal_id"})
    return LoadConfig(banks, f.terminal_id, **settings, **db_setting(f.db, db_url))


def bank_config(path: Path, db_url: str | None = None) -> BankConfig:
    f = parse_config(BankFile, path)
    limits: dict[bytes, int] = {}
    for i, issuer in enumerate(f.issuers):
        if issuer.issuer_id in limits:
            raise ConfigError(f"{path}: issuers[{i}].issuer_id: "
                              f"{issuer.issuer_id.hex().upper()} is given twice")
        limits[issuer.issuer_id] = issuer.balance_limit
    return BankConfig(**f.model_dump(exclude_none=True, exclude={"db", "issuers"}),
                      issuer_limits=limits, **db_setting(f.db, db_url))
