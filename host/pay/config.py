"""TOML configuration of the payment server and the merchant server (``svcard serve payment``,
``svcard serve merchant``)."""

from __future__ import annotations

from pathlib import Path

from ...protocols import messages as M
from ..kit.config import ConfigError, hex_field, optional_count, read_toml
from .merchant.server import DEFAULT_VARIANTS, MerchantConfig
from .server.app import MerchantAccount, PaymentConfig


def payment_config(path: Path, db_url: str | None = None) -> PaymentConfig:
    data = read_toml(path)
    merchants = {}
    for i, m in enumerate(data.get("merchant", [])):
        where = f"{path}: merchant[{i}]"
        mid = hex_field(m.get("id"), 8, f"{where}.id")
        names = m.get("variants", list(M.VARIANTS))
        unknown = [n for n in names if n not in M.VARIANTS]
        if unknown:
            raise ConfigError(f"{where}.variants: unknown {', '.join(unknown)}")
        shared_key = hex_field(m.get("shared_key"), 32, f"{where}.shared_key")
        merchants[mid] = MerchantAccount(mid, shared_key,
                                         frozenset(M.VARIANTS[n] for n in names))
    if not merchants:
        raise ConfigError(f"{path}: no [[merchant]]: the payment server would refuse everyone")
    return PaymentConfig(merchants, db_url=db_url or str(data.get("db", "sqlite:///payments.db")),
                         acquire_timeout=float(data.get("acquire_timeout", 2.0)),
                         hold_timeout=float(data.get("hold_timeout", 10.0)),
                         max_holds_per_merchant=optional_count(data, "max_holds_per_merchant",
                                                                path),
                         max_holds_per_client=optional_count(data, "max_holds_per_client",
                                                              path),
                         admin_token=str(data.get("admin_token", "")),
                         concentration_dir=str(data.get("concentration_dir", "")))


def merchant_config(path: Path, db_url: str | None = None) -> MerchantConfig:
    d = read_toml(path)
    names = d.get("variants", sorted(DEFAULT_VARIANTS))
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{path}: variants: a list of variant names")
    unknown = [n for n in names if n not in M.VARIANTS]
    if unknown or not names:
        raise ConfigError(f"{path}: variants: " + (f"unknown {', '.join(unknown)}" if unknown
                                                  else "none enabled"))
    variant = str(d.get("default_variant", "fig6"))
    if variant not in M.VARIANTS:
        raise ConfigError(f"{path}: default_variant must be one of {', '.join(M.VARIANTS)}")
    terminals_table = d.get("client_terminals", {})
    if not isinstance(terminals_table, dict):
        raise ConfigError(f"{path}: client_terminals: a table of terminal id = public key")
    terminals = {hex_field(tid, 8, f"{path}: client_terminals id {str(tid)[:20]!r}"):
                 hex_field(key, 32, f"{path}: client_terminals.{tid}")
                 for tid, key in terminals_table.items()}

    def number(name: str, default: int) -> int:
        value = d.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{path}: {name}: an integer")
        return value

    try:
        return MerchantConfig(
            merchant_id=hex_field(d.get("merchant_id"), 8, "merchant_id"),
            shared_key=hex_field(d.get("shared_key"), 32, "shared_key"),
            payment_url=str(d["payment_url"]),
            terminal_id=hex_field(d.get("terminal_id"), 6, "terminal_id"),
            public_url=str(d.get("public_url", "http://127.0.0.1:8081")),
            currency_code=number("currency_code", 156),
            currency_exponent=number("currency_exponent", 2), default_variant=variant,
            variants=frozenset(names), client_terminals=terminals,
            db_url=db_url or str(d.get("db", "sqlite:///merchant.db")),
            order_lifetime=number("order_lifetime", 600),
            confirm_grace=number("confirm_grace", 600),
            max_open_orders=number("max_open_orders", 10_000),
            max_open_per_client=number("max_open_per_client", 100))
    except KeyError as exc:
        raise ConfigError(f"{path}: missing {exc}") from None
    except ValueError as exc:  # MerchantConfig's own checks name the field
        raise ConfigError(f"{path}: {exc}") from None
