"""TOML configuration of the payment, merchant, bank and load servers (``svcard serve ...``)
and of clearing (``svcard clearing ...``)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A server configuration that cannot be used; the message names the field."""


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"no such file: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def hex_field(value: Any, size: int, field: str) -> bytes:
    try:
        raw = bytes.fromhex(str(value))
    except ValueError:
        raise ConfigError(f"{field}: not hex") from None
    if len(raw) != size:
        raise ConfigError(f"{field}: expected {size} bytes, got {len(raw)}")
    return raw


def optional_count(data: dict[str, Any], key: str, path: Path) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{path}: {key} must be a whole number >= 1")
    return value


