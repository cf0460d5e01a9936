"""The provider's purse pool: the SP pays merchants with its own purse cards.

STUB (the contract between the SP server and the pool); the body comes next.

:meth:`PursePool.pay` leases one purse that can pay (never one purse twice at once, also across
processes sharing the database), runs the ordinary card payment (``pay.client.pay``) with it,
records which purse paid what under ``order_ref``, tops it up from the provider's bank when it
runs low and retires it when its counter nears 65535, then gives it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy
from pydantic import Field

from ...kit.config import (
    CurrencyCode,
    CurrencyExponent,
    NonNegInt,
    PosFloat,
    PosInt,
    SecretText,
    Section,
    Url,
)
from ...pay.client import PaymentOutcome


class PursePoolError(Exception):
    """The pool cannot pay this order; nothing was paid. The message says why (never a
    secret)."""


class PoolExhausted(PursePoolError):
    """Every purse is retired, or too low to pay the amount even after a top-up."""


class PoolBusy(PursePoolError):
    """No purse came free within ``lease_timeout`` seconds."""


class PursePoolConfig(Section):
    """The ``[purses]`` section of the SP's configuration."""

    readers: list[str] = Field(min_length=1, max_length=256)   # reader specs, one per purse
    bank_url: Url                       # the provider's bank (the load flow's bank page)
    account: str = Field(min_length=1, max_length=32)
    secret: SecretText = Field(repr=False)
    currency_code: CurrencyCode
    currency_exponent: CurrencyExponent = 2
    topup_threshold: NonNegInt = 0      # minor units: under this after a payment -> top up
    topup_amount: PosInt = 10_000       # minor units loaded per top-up
    retire_margin: NonNegInt = 16       # retire when 65535 - counter <= margin
    lease_timeout: PosFloat = 30.0      # seconds pay() waits for a free purse
    lease_ttl: PosFloat = 300.0         # a lease older than this is taken to be a dead process's


@dataclass
class PoolPaymentOutcome(PaymentOutcome):
    """The card payment's outcome, and which purse paid it."""

    order_ref: str = ""
    purse_serial: str = ""
    counter: int = 0          # the purse's offline counter the debit used
    tac: str = ""             # the card's TAC for the debit (hex)
    topups: list[dict[str, Any]] = field(default_factory=list)


class PursePool:
    """A pool of purse cards behind reader specs, sharing the SP's database."""

    @classmethod
    def open(cls, config: PursePoolConfig, engine: sqlalchemy.Engine, *,
             journal_dir: Path) -> PursePool:
        """Create the pool's tables if missing, register every configured purse (reading its
        serial, balance and counters), and resume any payment or load an interruption left
        open in a purse's journal (``journal_dir/SERIAL.jsonl``)."""
        raise NotImplementedError

    def pay(self, checkout_url: str, *, http: httpx.Client,
            order_ref: str) -> PoolPaymentOutcome:
        """Pay the merchant's checkout with one leased purse, recorded under ``order_ref``
        (the same ``order_ref`` again: its recorded outcome, never a second payment).
        Blocking: call it from a worker thread. Raises :class:`PoolExhausted`/:class:`PoolBusy`
        (nothing paid) or the payment's own errors (``pay.client``)."""
        raise NotImplementedError

    def status(self) -> list[dict[str, Any]]:
        """Every purse: serial, reader, balance, offline and online counters, state
        (ready | leased | retired | empty)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the readers this process opened."""
