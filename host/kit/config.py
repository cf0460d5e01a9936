"""TOML configuration of the payment, merchant, bank and load servers (``svcard serve ...``)
and of clearing (``svcard clearing ...``)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from svcard.card.personalise import ProfileError, load_issuer
from svcard.host.bank_server import BankConfig
from svcard.host.clearing import ClearingConfig, IssuerTac, Terminal
from svcard.host.load_server import BankAccount, LoadConfig
from svcard.host.merchant_server import DEFAULT_VARIANTS, MerchantConfig
from svcard.host.payment_server import MerchantAccount, PaymentConfig
from svcard.protocols import messages as M


class ConfigError(ValueError):
    """A server configuration that cannot be used; the message names the field."""


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"no such file: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _hex(value: Any, size: int, field: str) -> bytes:
    try:
        raw = bytes.fromhex(str(value))
    except ValueError:
        raise ConfigError(f"{field}: not hex") from None
    if len(raw) != size:
        raise ConfigError(f"{field}: expected {size} bytes, got {len(raw)}")
    return raw


def _optional_count(data: dict[str, Any], key: str, path: Path) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{path}: {key} must be a whole number >= 1")
    return value


def payment_config(path: Path, db_url: str | None = None) -> PaymentConfig:
    data = _read(path)
    merchants = {}
    for i, m in enumerate(data.get("merchant", [])):
        where = f"{path}: merchant[{i}]"
        mid = _hex(m.get("id"), 8, f"{where}.id")
        names = m.get("variants", list(M.VARIANTS))
        unknown = [n for n in names if n not in M.VARIANTS]
        if unknown:
            raise ConfigError(f"{where}.variants: unknown {', '.join(unknown)}")
        merchants[mid] = MerchantAccount(mid, _hex(m.get("shared_key"), 32,
                                                   f"{where}.shared_key"),
                                         frozenset(M.VARIANTS[n] for n in names))
    if not merchants:
        raise ConfigError(f"{path}: no [[merchant]]: the payment server would refuse everyone")
    return PaymentConfig(merchants, db_url=db_url or str(data.get("db", "sqlite:///payments.db")),
                         acquire_timeout=float(data.get("acquire_timeout", 2.0)),
                         hold_timeout=float(data.get("hold_timeout", 10.0)),
                         max_holds_per_merchant=_optional_count(data, "max_holds_per_merchant",
                                                                path),
                         max_holds_per_client=_optional_count(data, "max_holds_per_client",
                                                              path),
                         admin_token=str(data.get("admin_token", "")),
                         concentration_dir=str(data.get("concentration_dir", "")))


def merchant_config(path: Path, db_url: str | None = None) -> MerchantConfig:
    d = _read(path)
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
    terminals = {_hex(tid, 8, f"{path}: client_terminals id {str(tid)[:20]!r}"):
                 _hex(key, 32, f"{path}: client_terminals.{tid}")
                 for tid, key in terminals_table.items()}

    def number(name: str, default: int) -> int:
        value = d.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{path}: {name}: an integer")
        return value

    try:
        return MerchantConfig(
            merchant_id=_hex(d.get("merchant_id"), 8, "merchant_id"),
            shared_key=_hex(d.get("shared_key"), 32, "shared_key"),
            payment_url=str(d["payment_url"]), terminal_id=_hex(d.get("terminal_id"), 6,
                                                                 "terminal_id"),
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


def load_config(path: Path, db_url: str | None = None) -> LoadConfig:
    data = _read(path)
    banks = {}
    for i, b in enumerate(data.get("bank", [])):
        where = f"{path}: bank[{i}]"
        bank_id = _hex(b.get("id"), 8, f"{where}.id")
        banks[bank_id] = BankAccount(bank_id, _hex(b.get("shared_key"), 32,
                                                   f"{where}.shared_key"))
    if not banks:
        raise ConfigError(f"{path}: no [[bank]]: the load server would refuse everyone")
    return LoadConfig(banks, _hex(data.get("terminal_id"), 6, "terminal_id"),
                      db_url=db_url or str(data.get("db", "sqlite:///loads.db")),
                      acquire_timeout=float(data.get("acquire_timeout", 2.0)))


def bank_config(path: Path, db_url: str | None = None) -> BankConfig:
    d = _read(path)
    try:
        return BankConfig(
            bank_id=_hex(d.get("bank_id"), 8, "bank_id"),
            shared_key=_hex(d.get("shared_key"), 32, "shared_key"),
            load_url=str(d["load_url"]),
            terminal_id=_hex(d.get("terminal_id"), 6, "terminal_id"),
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


def clearing_config(path: Path) -> ClearingConfig:
    """Issuers (their TAC master keys, from issuer files), terminals (batch key, merchant,
    acquirer) and the settlement key of a clearing system."""
    data = _read(path)
    issuers = {}
    for i, entry in enumerate(data.get("issuer", [])):
        try:
            issuer = load_issuer(path.parent / str(entry["profile"]))
        except (KeyError, ProfileError) as exc:
            raise ConfigError(f"{path}: issuer[{i}]: {exc}") from None
        issuers[issuer.issuer_id] = IssuerTac(issuer.issuer_id, issuer.tac, issuer.two_level)
    terminals = {}
    for i, t in enumerate(data.get("terminal", [])):
        where = f"{path}: terminal[{i}]"
        tid = _hex(t.get("terminal_id"), 6, f"{where}.terminal_id")
        terminals[tid] = Terminal(tid, _hex(t.get("batch_key"), 16, f"{where}.batch_key"),
                                  _hex(t.get("merchant_id"), 8, f"{where}.merchant_id"),
                                  _hex(t.get("acquirer_id"), 8, f"{where}.acquirer_id"))
    if not issuers or not terminals:
        raise ConfigError(f"{path}: needs [[issuer]] and [[terminal]] entries")
    return ClearingConfig(_hex(data.get("settlement_key"), 32, "settlement_key"), issuers,
                          terminals)
