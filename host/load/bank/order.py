"""A load start's request as the bank reads it (``POST /v1/load/start``): bounded fields,
each refused by name (:class:`ValueError`, :class:`KeyError`, :class:`TypeError`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class LoadOrder:
    account: str
    secret: str
    amount: int
    card_serial: bytes
    balance: int
    limit: int | None              # what the card answered to GET DATA 9F77, if it did
    currency_code: int
    issuer_id: bytes | None = None
    request_id: str | None = None
    lookup_only: bool = False      # a client resuming: answer an existing load, never debit

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LoadOrder:
        card = d["card"]
        for name in ("account", "secret"):
            if not isinstance(d[name], str) or not 1 <= len(d[name]) <= 128:
                raise ValueError(f"{name} is a string of 1..128 characters")
        limit = card.get("limit")
        out = cls(str(d["account"]), str(d["secret"]), int_field(d["amount"], "amount"),
                  bytes.fromhex(str(card["serial"])), int_field(card["balance"], "card.balance"),
                  None if limit is None else int_field(limit, "card.limit"),
                  int_field(card["currency_code"], "card.currency_code"))
        issuer = card.get("issuer_id")
        if issuer is not None:
            try:
                out.issuer_id = bytes.fromhex(issuer) if isinstance(issuer, str) else b""
            except ValueError:
                out.issuer_id = b""
            if len(out.issuer_id) != 8:
                raise ValueError("card.issuer_id is 8 bytes of hex")
        request_id = d.get("request_id")
        if request_id is not None:
            if not isinstance(request_id, str) or not 8 <= len(request_id) <= 64:
                raise ValueError("request_id is a string of 8..64 characters")
            out.request_id = request_id
            out.lookup_only = d.get("lookup_only") is True
        if len(out.card_serial) != 10:
            raise ValueError("card.serial has 10 bytes")
        if out.amount <= 0:
            raise ValueError("amount is a positive number of minor units")
        return out

    @property
    def issuer_hex(self) -> str:
        return self.issuer_id.hex().upper() if self.issuer_id else "(not given)"


def int_field(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} is an integer 0..4294967295 (minor units)")
    return value

