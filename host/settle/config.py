"""Configuration of clearing (``svcard clearing ...``): what it knows of issuers and terminals,
and its TOML file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...card.personalise import ProfileError, load_issuer
from ..kit.config import ConfigError, hex_field, read_toml


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


def clearing_config(path: Path) -> ClearingConfig:
    """Issuers (their TAC master keys, from issuer files), terminals (batch key, merchant,
    acquirer) and the settlement key of a clearing system."""
    data = read_toml(path)
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
        tid = hex_field(t.get("terminal_id"), 6, f"{where}.terminal_id")
        terminals[tid] = Terminal(tid, hex_field(t.get("batch_key"), 16, f"{where}.batch_key"),
                                  hex_field(t.get("merchant_id"), 8, f"{where}.merchant_id"),
                                  hex_field(t.get("acquirer_id"), 8, f"{where}.acquirer_id"))
    if not issuers or not terminals:
        raise ConfigError(f"{path}: needs [[issuer]] and [[terminal]] entries")
    return ClearingConfig(hex_field(data.get("settlement_key"), 32, "settlement_key"), issuers,
                          terminals)
