"""Reading a system's TOML configuration file: the error every reader raises (its message names
the file and the field) and the field readers the systems' ``config.py`` modules share."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A server configuration that cannot be used; the message names the field."""


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML document at ``path``; a missing file or bad TOML is a :class:`ConfigError`."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"no such file: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def hex_field(value: Any, size: int, field: str) -> bytes:
    """``value`` as exactly ``size`` bytes of hex; ``field`` names it in the error."""
    try:
        raw = bytes.fromhex(str(value))
    except ValueError:
        raise ConfigError(f"{field}: not hex") from None
    if len(raw) != size:
        raise ConfigError(f"{field}: expected {size} bytes, got {len(raw)}")
    return raw


def optional_count(data: dict[str, Any], key: str, path: Path) -> int | None:
    """``data[key]`` as a whole number >= 1, or None when it is absent."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{path}: {key} must be a whole number >= 1")
    return value


