"""The goods system's configuration: one TOML file every party reads (``goods.toml``), naming
each party's id, URL and PUBLIC key, with the serving party's private key given beside it
(``private_key_file = "merchant.key"``; each process is given only its own key file).

.. code-block:: toml

    currency_code = 156
    pickup_seconds = 604800            # a paid good not on the card by then is refunded
    orders_per_device = 600            # merchant orders naming one device, per minute (429)
    registrations_per_address = 120    # new devices from one address, per minute (429)
    offer_seconds = 86400              # an order offered and not authorised by then expires
    route_seconds = 600                # routing to the authentication server retried this long
    purse_session_seconds = 30         # a device's open purse session abandoned after this
    [parties.merchant]
    id = "merchant1"
    url = "http://127.0.0.1:8301"
    public_key = "..."                 # Ed25519, 64 hex digits
    private_key_file = "merchant.key"  # only the merchant's own process needs it
    db = "sqlite:///merchant.db"
    issuer_id = "2000000000000002"     # the merchant as the issuer of its goods records
    # [parties.payment], [parties.auth], [parties.bank] (+ seal_key), [parties.fulfil]
    # (+ goods_key = "goods-key.toml": the file of its goods key only; goods_issuer =
    # "issuer.toml", an issuer file, is still taken: only its [goods_key] is read and kept)
    [[item]]
    sku = "ticket"
    kind = "ticket"                    # ticket, coupon, transit, voucher
    price = 1250                       # minor units
    value = 1250                       # the record's value (ticket, coupon, voucher)
    rides = 0                          # transit: rides bought; fare = price / rides
    valid_days = 30

:class:`GoodsSystem` is what the file says; :func:`goods_config` reads and checks it (one-line
:class:`~svcard.host.kit.config.ConfigError` naming the file and field).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from ..kit.config import (
    ConfigError,
    CurrencyCode,
    Hex8,
    Hex32,
    NonNegInt,
    PosInt,
    SecretHex32,
    Section,
    Url,
    parse_config,
)

ROLES = ("merchant", "payment", "auth", "bank", "fulfil")
Role = Literal["merchant", "payment", "auth", "bank", "fulfil"]
Name = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")]
DAY = 86_400


@dataclass(frozen=True)
class Peer:
    id: str
    url: str
    public_key: bytes


@dataclass(frozen=True)
class Item:
    sku: str
    kind: str
    price: int
    name: str = ""
    value: int = 0
    rides: int = 0
    valid_days: int = 30


@dataclass
class GoodsSystem:
    """What every party knows of the others (public), and the catalogue."""

    parties: dict[str, Peer]                # role -> peer
    items: dict[str, Item]
    merchant_issuer: bytes                  # 8 bytes: issuer_id of the merchant's goods
    seal_key: bytes                         # the institution's X25519 key for sealed PINs
    currency_code: int = 156
    pickup_seconds: int = 7 * DAY
    issue_lease: int = 30                   # seconds before an unconfirmed write is re-issued
    poll_wait: float = 25.0                 # the longest a device's long poll is held
    orders_per_device: int = 600            # merchant orders naming one device, per minute
    registrations_per_address: int = 120    # new devices from one client address, per minute
    offer_seconds: int = DAY                # an offered order not authorised by then expires
    route_seconds: int = 600                # an order's routing retried this long, then declined
    purse_session_seconds: int = 30         # a device's unproved purse session: abandoned after

    def peer(self, role: str) -> Peer:
        return self.parties[role]


@dataclass
class PartyConfig:
    """One party's process: its role, its own key, its database."""

    role: str
    system: GoodsSystem
    private_key: bytes = field(repr=False)
    db_url: str
    goods_issuer: Path | None = None        # fulfil: the issuer file with [goods_key]

    @property
    def me(self) -> Peer:
        return self.system.peer(self.role)


class PartyEntry(Section):
    id: Name
    url: Url
    public_key: Hex32
    private_key: SecretHex32 | None = None
    db: str | None = Field(default=None, max_length=1000)
    issuer_id: Hex8 | None = None           # merchant
    seal_key: Hex32 | None = None           # bank
    goods_issuer: str | None = Field(default=None, max_length=1000)   # fulfil (the old way)
    goods_key: str | None = Field(default=None, max_length=1000)      # fulfil


class ItemEntry(Section):
    sku: Name
    name: str = Field(default="", max_length=100)
    kind: Literal["ticket", "coupon", "transit", "voucher"]
    price: PosInt
    value: NonNegInt = 0
    rides: Annotated[int, Field(ge=0, le=65535)] = 0
    valid_days: Annotated[int, Field(ge=1, le=3660)] = 30


class PartiesEntry(Section):
    merchant: PartyEntry
    payment: PartyEntry
    auth: PartyEntry
    bank: PartyEntry
    fulfil: PartyEntry


class GoodsFile(Section):
    currency_code: CurrencyCode = 156
    pickup_seconds: PosInt = 7 * DAY
    issue_lease: PosInt = 30
    orders_per_device: PosInt = 600
    registrations_per_address: PosInt = 120
    offer_seconds: PosInt = DAY
    route_seconds: PosInt = 600
    purse_session_seconds: PosInt = 30
    parties: PartiesEntry
    item: list[ItemEntry] = Field(min_length=1, max_length=1000)


def goods_config(path: Path, role: str, db_url: str | None = None) -> PartyConfig:
    """The configuration of party ``role`` from the goods file at ``path``."""
    f = parse_config(GoodsFile, path)
    entries = {r: getattr(f.parties, r) for r in ROLES}
    me = entries[role]
    if me.private_key is None:
        raise ConfigError(f"{path}: parties.{role}.private_key: the serving party's key is "
                          "needed (private_key_file = ...)")
    merchant, bank, fulfil = entries["merchant"], entries["bank"], entries["fulfil"]
    if merchant.issuer_id is None:
        raise ConfigError(f"{path}: parties.merchant.issuer_id: missing")
    if bank.seal_key is None:
        raise ConfigError(f"{path}: parties.bank.seal_key: missing")
    for item in f.item:
        if item.kind == "transit" and item.rides < 1:
            raise ConfigError(f"{path}: item {item.sku}: a transit token has rides >= 1")
    items = {i.sku: Item(i.sku, i.kind, i.price, i.name, i.value, i.rides, i.valid_days)
             for i in f.item}
    if len(items) != len(f.item):
        raise ConfigError(f"{path}: item: two items have the same sku")
    system = GoodsSystem({r: Peer(e.id, e.url.rstrip("/"), e.public_key)
                          for r, e in entries.items()}, items, merchant.issuer_id,
                         bank.seal_key, f.currency_code, f.pickup_seconds, f.issue_lease,
                         orders_per_device=f.orders_per_device,
                         registrations_per_address=f.registrations_per_address,
                         offer_seconds=f.offer_seconds, route_seconds=f.route_seconds,
                         purse_session_seconds=f.purse_session_seconds)
    issuer = None
    if role == "fulfil":
        name = fulfil.goods_key or fulfil.goods_issuer
        if name is None:
            raise ConfigError(f"{path}: parties.fulfil.goods_key: the file of the fulfilment "
                              "server's goods key is needed")
        issuer = path.parent / name
    url = db_url or me.db or f"sqlite:///{path.parent / (role + '.db')}"
    return PartyConfig(role, system, me.private_key, url, issuer)
