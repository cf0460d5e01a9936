"""TOML configuration of the payment server and the merchant server (``svcard serve payment``,
``svcard serve merchant``): each file as a pydantic model (``PaymentFile``, ``MerchantFile``);
a field left out takes the default of ``PaymentConfig`` or ``MerchantConfig``."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from ...protocols import messages as M
from ..kit.config import (
    ConfigError,
    CurrencyCode,
    CurrencyExponent,
    Hex6,
    Hex8,
    Hex32,
    NonNegInt,
    PosFloat,
    PosInt,
    SecretHex32,
    SecretText,
    Section,
    Url,
    db_setting,
    one_of,
    parse_config,
    read_toml,
)
from .merchant.pon import PonSettings
from .merchant.server import MerchantConfig
from .server.app import MerchantAccount, PaymentConfig

Variant = Annotated[str, one_of(M.VARIANTS)]
# a payment-server node (docs/deploy-nodes.md): its name (the lease holder's id is this name, the
# process id and a nonce, joined by '#') and how long a PSAM lease lasts without renewal
NODE_NAME = r"^[A-Za-z0-9_.-]{1,60}$"
NodeName = Annotated[str, Field(pattern=NODE_NAME)]
MIN_LEASE, MAX_LEASE = 1.0, 3600.0
LeaseSeconds = Annotated[float, Field(ge=MIN_LEASE, le=MAX_LEASE)]


class MerchantEntry(Section):
    """A ``[[merchant]]`` of the payment server."""

    id: Hex8
    shared_key: SecretHex32
    variants: list[Variant] = Field(default_factory=lambda: list(M.VARIANTS), min_length=1)
    # a shared POS (seed 001 FIG. 4B): the PSAM terminal this merchant's payments are made on
    terminal_id: Hex6 | None = None


class PaymentFile(Section):
    merchant: list[MerchantEntry] = Field(min_length=1)
    db: SecretText | None = None
    acquire_timeout: PosFloat | None = None
    hold_timeout: PosFloat | None = None
    max_holds_per_merchant: PosInt | None = None
    max_holds_per_client: PosInt | None = None
    admin_token: SecretText | None = None
    concentration_dir: str | None = None
    node_name: NodeName | None = None
    lease_seconds: LeaseSeconds | None = None


class PonEntry(Section):
    """A merchant's ``[pon]`` (seed 001 FIG. 3B and order copies; docs/sp.md)."""

    key: SecretHex32                     # Ed25519 private key; key_file (mode 0600) or key_env
    sp_name: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")]
    sp_url: Url | None = None            # where copies of customers' orders go
    lifetime: PosInt = 3600              # seconds a PON may be paid
    max_open: PosInt = 10_000            # tentative PONs at once


class MerchantFile(Section):
    merchant_id: Hex8
    shared_key: SecretHex32
    payment_url: Url
    terminal_id: Hex6
    public_url: Url | None = None
    currency_code: CurrencyCode | None = None
    currency_exponent: CurrencyExponent | None = None
    db: SecretText | None = None
    variants: list[Variant] | None = Field(default=None, min_length=1)
    default_variant: Variant | None = None
    client_terminals: dict[Hex8, Hex32] | None = None
    order_lifetime: PosInt | None = None
    confirm_grace: NonNegInt | None = None
    max_open_orders: PosInt | None = None
    max_open_per_client: PosInt | None = None
    pon: PonEntry | None = None


def payment_config(path: Path, db_url: str | None = None) -> PaymentConfig:
    f = parse_config(PaymentFile, path)
    merchants: dict[bytes, MerchantAccount] = {}
    for i, m in enumerate(f.merchant):
        if m.id in merchants:
            raise ConfigError(f"{path}: merchant[{i}].id: {m.id.hex().upper()} is given twice")
        if (m.terminal_id is None) != (f.merchant[0].terminal_id is None):
            raise ConfigError(f"{path}: merchant[{i}].terminal_id: give every merchant a "
                              "terminal_id (a shared POS) or none")
        merchants[m.id] = MerchantAccount(m.id, m.shared_key,
                                          frozenset(M.VARIANTS[n] for n in m.variants),
                                          m.terminal_id)
    settings = f.model_dump(exclude_none=True, exclude={"merchant", "db"})
    return PaymentConfig(merchants, **settings, **db_setting(f.db, db_url))


def node_options(config: PaymentConfig, node: str | None,
                 lease_seconds: str | None) -> PaymentConfig:
    """``svcard serve payment --node NAME --lease-seconds S`` over the file's settings: the
    one implementation, :func:`~svcard.host.kit.serving.node_settings` (this name stays for
    its callers)."""
    from ..kit.serving import node_settings

    return node_settings(config, node, lease_seconds)


def merchant_config(path: Path, db_url: str | None = None) -> MerchantConfig:
    f = parse_config(MerchantFile, path)
    settings = f.model_dump(exclude_none=True, exclude={"db", "variants", "pon"})
    if f.variants is not None:
        settings["variants"] = frozenset(f.variants)
    if f.pon is not None:
        _private_key_file(path, read_toml(path).get("pon"))
    try:
        if f.pon is not None:
            settings["pon"] = PonSettings(**f.pon.model_dump())
        return MerchantConfig(**settings, **db_setting(f.db, db_url))
    except ValueError as exc:  # MerchantConfig's own checks name the field
        raise ConfigError(f"{path}: {exc}") from None


def _private_key_file(path: Path, pon: Any) -> None:
    """A ``pon.key_file`` others may read is refused, as the helper's PIN file is."""
    name = pon.get("key_file") if isinstance(pon, dict) else None
    if not isinstance(name, str):
        return
    key_file = path.parent / name
    try:
        mode = stat.S_IMODE(os.stat(key_file).st_mode)
    except OSError as exc:
        raise ConfigError(f"{path}: pon.key_file: cannot read {key_file}: "
                          f"{exc.strerror or type(exc).__name__}") from None
    if mode & 0o077:
        raise ConfigError(f"{path}: pon.key_file: others may read {key_file} "
                          f"(mode {mode:04o}); chmod 600 it")
