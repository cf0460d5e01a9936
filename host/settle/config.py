"""Configuration of clearing (``svcard clearing ...``): what it knows of issuers and terminals,
and its TOML file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field

from ...card.loyalty import POINTS_CURRENCY
from ...card.personalise import ProfileError, load_issuer
from ..kit.config import (
    ConfigError,
    CurrencyCode,
    Hex6,
    Hex8,
    SecretHex16,
    SecretHex32,
    Section,
    parse_config,
)


@dataclass(frozen=True)
class Terminal:
    terminal_id: bytes
    batch_key: bytes = field(repr=False)
    merchant_id: bytes
    acquirer_id: bytes

    def names(self) -> tuple[str, str, str]:
        """The terminal's id, merchant and acquirer, in upper-case hex."""
        return (self.terminal_id.hex().upper(), self.merchant_id.hex().upper(),
                self.acquirer_id.hex().upper())


@dataclass(frozen=True)
class IssuerTac:
    issuer_id: bytes
    tac_master: bytes = field(repr=False)
    two_level: bool


@dataclass
class ClearingConfig:
    settlement_key: bytes = field(repr=False)
    issuers: dict[bytes, IssuerTac]
    terminals: dict[bytes, Terminal]
    currency_code: int = 156   # ISO 4217 numeric: the currency amounts are printed in


class IssuerEntry(Section):
    """An ``[[issuer]]``: its issuer file (relative to the configuration file)."""

    profile: str


class TerminalEntry(Section):
    """A ``[[terminal]]``: a PSAM terminal id, its batch key, merchant and acquirer."""

    terminal_id: Hex6
    batch_key: SecretHex16
    merchant_id: Hex8
    acquirer_id: Hex8


class ClearingFile(Section):
    settlement_key: SecretHex32
    issuer: list[IssuerEntry] = Field(min_length=1)
    terminal: list[TerminalEntry] = Field(min_length=1)
    currency_code: CurrencyCode | None = None


def clearing_config(path: Path) -> ClearingConfig:
    """Issuers (their TAC master keys, from issuer files), terminals (batch key, merchant,
    acquirer) and the settlement key of a clearing system."""
    f = parse_config(ClearingFile, path)
    issuers = {}
    points = f.currency_code == POINTS_CURRENCY   # a loyalty programme's clearing, in points
    for i, entry in enumerate(f.issuer):
        try:
            issuer = load_issuer(path.parent / entry.profile)
        except ProfileError as exc:
            raise ConfigError(f"{path}: issuer[{i}].profile: {exc}") from None
        if issuer.points != points:   # points and money are never cleared together
            units = ("points", "money") if issuer.points else ("money", "points")
            raise ConfigError(f"{path}: issuer[{i}].profile: a {units[0]} issuer in a "
                              f"clearing of {units[1]} (currency_code 999 clears points, any "
                              "other money)")
        issuers[issuer.issuer_id] = IssuerTac(issuer.issuer_id, issuer.tac, issuer.two_level)
    terminals = {}
    for i, t in enumerate(f.terminal):
        if t.terminal_id in terminals:
            raise ConfigError(f"{path}: terminal[{i}].terminal_id: "
                              f"{t.terminal_id.hex().upper()} is given twice")
        terminals[t.terminal_id] = Terminal(t.terminal_id, t.batch_key, t.merchant_id,
                                            t.acquirer_id)
    if f.currency_code is None:
        return ClearingConfig(f.settlement_key, issuers, terminals)
    return ClearingConfig(f.settlement_key, issuers, terminals, f.currency_code)
