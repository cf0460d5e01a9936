"""The purse pool's configuration section, its outcome and its errors (what the SP server
sees of the pool; :mod:`.pool` re-exports them).

The errors say what happened to the money: :class:`PursePoolError` (and its kinds) means
NOTHING was paid for the order, so the SP may fail it and free the customer's reservation;
:class:`PaymentInDoubt` means the order's payment may have happened (a card debited and the
merchant not reached, or the order being paid by another call right now): ask the pool again
later under the same ``order_ref``, which settles it and never pays twice.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, field_validator

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

ORDER_REF = re.compile(r"[A-Za-z0-9._:-]{1,64}")
MAX_URL = 2048


class PursePoolError(Exception):
    """The pool cannot pay this order; nothing was paid. The message says why (never a
    secret)."""


class PoolExhausted(PursePoolError):
    """Every purse is retired, or too low to pay the amount even after a top-up."""


class PoolBusy(PursePoolError):
    """No purse came free within ``lease_timeout`` seconds."""


class PaymentInDoubt(Exception):
    """The order's payment may have happened (not a :class:`PursePoolError`): ask again later
    under the same ``order_ref``."""


class PursePoolConfig(Section):
    """The ``[purses]`` section of the SP's configuration."""

    readers: list[str] = Field(min_length=1, max_length=256)   # reader specs, one per purse
    bank_url: Url                       # the provider's bank (the load flow's bank page)
    account: str = Field(min_length=1, max_length=32)
    secret: SecretText = Field(repr=False)
    currency_code: CurrencyCode
    currency_exponent: CurrencyExponent = 2
    topup_threshold: NonNegInt = 0      # minor units: under this -> top up (before and after)
    topup_amount: PosInt = 10_000       # minor units loaded per top-up (more if a payment needs)
    retire_margin: NonNegInt = 16       # retire when 65535 - a counter <= margin
    # counters before retirement at which a purse is drained: preferred for orders it can pay
    # and never topped up again, so its balance is spent rather than left on a retired card
    # (an EP purse cannot be unloaded); 0: off
    drain_margin: NonNegInt = 0
    lease_timeout: PosFloat = 30.0      # seconds pay() waits for a free purse
    lease_ttl: PosFloat = 300.0         # a lease older than this is a dead process's
    journal_max_bytes: PosInt = 1 << 20   # a purse journal past this: finished lines rotated
    # the payment servers (acquirers) a merchant's checkout may send the purse's draw to;
    # empty: any. The confirmation always goes to the checkout's own origin.
    payment_servers: list[Url] = Field(default_factory=list, max_length=64)

    @field_validator("readers")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        for spec in value:
            if not 3 <= len(spec) <= 300 or ":" not in spec:
                raise ValueError(f"{spec[:40]!r} is not a reader spec (SCHEME:TARGET, at most "
                                 f"300 characters)")
        if len(set(value)) != len(value):
            raise ValueError("a reader is named twice")
        return value


@dataclass
class PoolPaymentOutcome(PaymentOutcome):
    """The card payment's outcome, and which purse paid it."""

    order_ref: str = ""
    purse_serial: str = ""
    counter: int = 0          # the purse's offline counter the debit used
    tac: str = ""             # the card's TAC for the debit (hex)
    topups: list[dict[str, Any]] = field(default_factory=list)


def check_input(checkout_url: str, order_ref: str, amount: int | None,
                max_amount: int | None = None) -> None:
    if not isinstance(order_ref, str) or not ORDER_REF.fullmatch(order_ref):
        raise PursePoolError("order_ref must be 1-64 characters of A-Z a-z 0-9 . _ : -")
    if not isinstance(checkout_url, str) or len(checkout_url) > MAX_URL or \
            not checkout_url.startswith(("http://", "https://")):
        raise PursePoolError(f"the checkout URL must be http(s) and at most {MAX_URL} "
                             f"characters")
    if amount is not None and not 0 < amount <= 0xFFFFFFFF:
        raise PursePoolError("the amount must be 1..4294967295 minor units")
    if max_amount is not None and not 0 <= max_amount <= 0xFFFFFFFF:
        raise PursePoolError("the maximum amount must be 0..4294967295 minor units")


def from_row(row: dict[str, Any]) -> PoolPaymentOutcome:
    """An order paid before, from its row (its full outcome when it was recorded)."""
    known = json.loads(row["outcome"] or "{}")
    base = {"txn_id": row["txn_id"], "variant": "", "amount": row["amount"] or 0,
            "currency_exponent": 0, "balance_before": 0, "balance_after": 0, "goods": "",
            "item": "", "receipt": {}, "round_trips": 0}
    fields = set(PoolPaymentOutcome.__dataclass_fields__)
    data = {**base, **{k: v for k, v in known.items() if k in fields}}
    data.update(order_ref=row["order_ref"], purse_serial=row["purse_serial"],
                counter=row["counter"] or 0, tac=row["tac"], resumed=True)
    return PoolPaymentOutcome(**data)
