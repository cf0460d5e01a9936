"""Reading a system's TOML configuration file: each system's ``config.py`` describes its file
as pydantic models built from the pieces here, and :func:`parse_config` checks a file against
one. Every problem is a :class:`ConfigError` of one line, ``FILE: FIELD.PATH: PROBLEM``
(``payment.toml: merchant[0].variantz: unknown key``), never holding a secret's value.

The pieces themselves live in ``card/toml_schema.py``, since card profiles are checked the same
way and ``card/`` imports nothing of ``host/``; this module is where the systems take them from.
A secret field ``X`` (a key, a token, a database URL) may be written ``X = "..."``,
``X_file = "PATH"`` (relative to the configuration file) or ``X_env = "NAME"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from ...card.toml_schema import (
    SECRET,
    Byte,
    CurrencyCode,
    CurrencyExponent,
    Hex6,
    Hex8,
    Hex16,
    Hex32,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    SecretHex16,
    SecretHex32,
    SecretText,
    Section,
    Url,
    check,
    one_of,
    read_document,
)

__all__ = ["SECRET", "Byte", "ConfigError", "CurrencyCode", "CurrencyExponent", "Hex6", "Hex8",
           "Hex16", "Hex32", "NonNegFloat", "NonNegInt", "PosFloat", "PosInt", "SecretHex16",
           "SecretHex32", "SecretText", "Section", "Url", "db_setting", "one_of",
           "parse_config", "read_toml"]

M = TypeVar("M", bound=Section)


class ConfigError(ValueError):
    """A server configuration that cannot be used; the message names the file and the field."""


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML document at ``path``; a missing file or bad TOML is a :class:`ConfigError`."""
    return read_document(path, ConfigError)


def parse_config(model: type[M], path: Path) -> M:
    """The configuration file at ``path`` checked against ``model`` (a :class:`Section`)."""
    return check(model, read_toml(path), path, ConfigError)


def db_setting(file_url: str | None, db_url: str | None) -> dict[str, Any]:
    """The ``db_url`` keyword of a server's configuration: ``db_url`` (the command line's
    ``--db``) over the file's ``db``; neither: nothing, so the server's default holds."""
    url = db_url or file_url
    return {"db_url": url} if url else {}
