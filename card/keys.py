"""Key records kept inside the emulated chips, and their JSON form in a card image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
