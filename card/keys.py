"""Key records kept inside the emulated chips, and their JSON form in a card image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..protocols import mac_schemes


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One key of a purse: its index (as addressed by INITIALIZE), version and algorithm."""

    index: int
    version: int
    algorithm: int
    key: bytes

    def __repr__(self) -> str:  # never show key bytes
        return f"KeyEntry(index={self.index}, version={self.version}, algorithm={self.algorithm})"

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "version": self.version, "algorithm": self.algorithm,
                "key": self.key.hex().upper()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyEntry:
        key = bytes.fromhex(data["key"])
        if len(key) != 16:
            raise ValueError(f"key index {data['index']} must have 16 bytes")
        return cls(int(data["index"]), int(data["version"]), int(data.get("algorithm", 0)), key)


@dataclass(frozen=True, slots=True)
class IssuerScheme:
    """What an issuer file says about its cryptography, as the PSAM and the HSM keep it: the
    algorithm each algorithm id stands for, and the MAC-scheme profile of its purses.

    ``algorithms`` empty (the default) is svcard's old rule: a card must answer exactly its
    key's configured algorithm id. Given, a card may answer any id the issuer maps to the
    same algorithm as the key's own id; an id the issuer does not know is refused.
    """

    algorithms: tuple[tuple[int, str], ...] = ()
    mac_scheme: str = mac_schemes.DEFAULT

    def accepts(self, key_algorithm: int, asked: int) -> bool:
        """Whether a card answering algorithm id ``asked`` uses a key configured with
        ``key_algorithm``."""
        if asked == key_algorithm:
            return True
        known = dict(self.algorithms)
        return asked in known and known[asked] == known.get(key_algorithm)

    def to_json(self) -> dict[str, Any]:
        return {"algorithms": {f"{i:02X}": a for i, a in self.algorithms},
                "mac_scheme": self.mac_scheme}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> IssuerScheme:
        if not data:
            return cls()
        algorithms = tuple(sorted((int(i, 16), str(a))
                                  for i, a in dict(data.get("algorithms", {})).items()))
        name = str(data.get("mac_scheme", mac_schemes.DEFAULT))
        mac_schemes.scheme(name)  # an unknown profile is refused when the image is read
        return cls(algorithms, name)


DEFAULT_SCHEME = IssuerScheme()   # PBOC MACs, a card's algorithm id exactly its key's
