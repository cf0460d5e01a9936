"""TOML configuration of the load server and the bank (``svcard serve load``, ``svcard serve
bank``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..kit.config import ConfigError, hex_field, read_toml
from .bank.server import BankConfig
from .server.app import BankAccount, LoadConfig


def load_config(path: Path, db_url: str | None = None) -> LoadConfig:
    data = read_toml(path)
    banks = {}
    for i, b in enumerate(data.get("bank", [])):
        where = f"{path}: bank[{i}]"
        bank_id = hex_field(b.get("id"), 8, f"{where}.id")
        banks[bank_id] = BankAccount(bank_id,
                                     hex_field(b.get("shared_key"), 32, f"{where}.shared_key"))
    if not banks:
        raise ConfigError(f"{path}: no [[bank]]: the load server would refuse everyone")
    return LoadConfig(banks, hex_field(data.get("terminal_id"), 6, "terminal_id"),
                      db_url=db_url or str(data.get("db", "sqlite:///loads.db")),
                      acquire_timeout=float(data.get("acquire_timeout", 2.0)))


def bank_config(path: Path, db_url: str | None = None) -> BankConfig:
    d = read_toml(path)
    try:
        return BankConfig(
            bank_id=hex_field(d.get("bank_id"), 8, "bank_id"),
            shared_key=hex_field(d.get("shared_key"), 32, "shared_key"),
            load_url=str(d["load_url"]),
            terminal_id=hex_field(d.get("terminal_id"), 6, "terminal_id"),
            db_url=db_url or str(d.get("db", "sqlite:///bank.db")),
            public_url=str(d.get("public_url", "http://127.0.0.1:8083")),
            currency_code=int(d.get("currency_code", 156)),
            currency_exponent=int(d.get("currency_exponent", 2)),
            **_bank_limits(d, path))
    except KeyError as exc:
        raise ConfigError(f"{path}: missing {exc}") from None


_BANK_LIMITS = {"secret_max_failures": int, "secret_lockout": float,
                "secret_lockout_max": float, "address_max_failures": int,
                "address_window": float, "secret_cache_seconds": float}


def _bank_limits(d: dict[str, Any], path: Path) -> dict[str, Any]:
    """The bank's throttling settings present in the file (BankConfig has the defaults)."""
    out: dict[str, Any] = {}
    for key, kind in _BANK_LIMITS.items():
        if key in d:
            value = d[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
                    or (kind is int and not isinstance(value, int)):
                raise ConfigError(f"{path}: {key} must be a {'whole ' if kind is int else ''}"
                                  "number >= 0")
            out[key] = kind(value)
    return out
