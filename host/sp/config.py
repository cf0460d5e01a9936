"""The SP server's TOML configuration (``svcard serve sp --config sp.toml``), as pydantic models.

The prices come from here, never from a customer's message: each ``[[merchant]]`` lists the
items the SP sells for it, with the RETAIL price the customer is billed, and the merchant's fee
and discount rules. What the merchant charges the SP (the WHOLESALE amount) is what its checkout
asks and the purse pays. A bill line is then ``retail + fee - discount``, where the discount is
``pass_on_percent`` of the merchant's wholesale discount (retail - wholesale, never below 0).
``wholesale``, when the SP has agreed a price with the merchant, is the one amount the purse
pays: a checkout asking anything else is refused before the card is asked (nothing paid).
Without it, the purse pays what the checkout asks up to ``max_wholesale`` (default: the
retail price): a checkout asking more is refused the same way, so a merchant cannot make the SP
pay more than it bills (nothing is paid first and logged later).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from ..kit.config import (
    ConfigError,
    CurrencyCode,
    CurrencyExponent,
    NonNegInt,
    PosInt,
    SecretText,
    Section,
    Url,
    db_setting,
    parse_config,
)
from .purses.pool import PursePoolConfig
from .signing import DEFAULT_SP

Name = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")]
Sku = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
Period = Literal["day", "week", "month"]


class ItemEntry(Section):
    sku: Sku
    name: str = Field(default="", max_length=200)
    retail: NonNegInt                    # minor units: what the customer is billed
    wholesale: PosInt | None = None      # the agreed price: the only amount the purse pays
    max_wholesale: NonNegInt | None = None


class MerchantEntry(Section):
    name: Name
    checkout_url: Url                    # the merchant's checkout; the item's sku is appended
    fee: NonNegInt = 0                   # minor units added to each line
    pass_on_percent: Annotated[int, Field(ge=0, le=100)] = 0
    variant: str | None = Field(default=None, max_length=8)   # a preference; the merchant decides
    item: list[ItemEntry] = Field(min_length=1, max_length=10_000)


class BillingEntry(Section):
    maximum: PosInt = 50_000             # minor units: a bill as soon as the open total reaches it
    period: Period = "month"             # bills at the end of each (UTC) period
    due_days: PosInt = 14                # an issued bill unpaid this long is overdue
    check_seconds: PosInt = 60           # how often the server looks for ended periods


class SpFile(Section):
    name: Name = DEFAULT_SP              # the SP's name: customers sign their orders for it
    db: SecretText | None = None
    journal_dir: str = "sp-journals"
    currency_code: CurrencyCode = 156
    currency_exponent: CurrencyExponent = 2
    default_credit_limit: NonNegInt = 10_000
    billing: BillingEntry = Field(default_factory=BillingEntry)
    merchant: list[MerchantEntry] = Field(min_length=1, max_length=1000)
    purses: PursePoolConfig | None = None


@dataclass(frozen=True)
class Item:
    merchant: str
    sku: str
    name: str
    retail: int
    max_wholesale: int
    fee: int
    pass_on_percent: int
    checkout_url: str
    wholesale: int | None = None


@dataclass
class SpConfig:
    """The SP server's settings (the file's, with paths resolved)."""

    items: dict[tuple[str, str], Item]
    name: str = DEFAULT_SP     # customers' signed requests name it (signing.py)
    db_url: str = field(default="sqlite:///sp.db", repr=False)   # may hold a password
    journal_dir: Path = Path("sp-journals")
    currency_code: int = 156
    currency_exponent: int = 2
    default_credit_limit: int = 10_000
    billing: BillingEntry = field(default_factory=BillingEntry)
    purses: PursePoolConfig | None = None

    def item(self, merchant: str, sku: str) -> Item | None:
        return self.items.get((merchant, sku))


def items_of(merchants: list[MerchantEntry]) -> dict[tuple[str, str], Item]:
    """The catalogue, keyed by (merchant, sku); a merchant or item given twice is refused."""
    out: dict[tuple[str, str], Item] = {}
    seen: set[str] = set()
    for i, m in enumerate(merchants):
        if m.name in seen:
            raise ValueError(f"merchant[{i}].name: {m.name} is given twice")
        seen.add(m.name)
        base = m.checkout_url.rstrip("/")
        for j, it in enumerate(m.item):
            if (m.name, it.sku) in out:
                raise ValueError(f"merchant[{i}].item[{j}].sku: {it.sku} is given twice")
            if it.wholesale is not None and it.max_wholesale is not None and \
                    it.max_wholesale < it.wholesale:
                raise ValueError(f"merchant[{i}].item[{j}].max_wholesale: {it.max_wholesale} "
                                 f"is below the agreed wholesale {it.wholesale}")
            url = f"{base}/{it.sku}" + (f"?variant={m.variant}" if m.variant else "")
            ceiling = (it.max_wholesale if it.max_wholesale is not None
                       else it.wholesale if it.wholesale is not None else it.retail)
            out[(m.name, it.sku)] = Item(m.name, it.sku, it.name or it.sku, it.retail, ceiling,
                                         m.fee, m.pass_on_percent, url, it.wholesale)
    return out


def sp_config(path: Path, db_url: str | None = None) -> SpConfig:
    """The configuration file at ``path`` (``db_url``, the command line's ``--db``, wins)."""
    f = parse_config(SpFile, path)
    try:
        items = items_of(f.merchant)
        if f.purses is not None and (f.purses.currency_code, f.purses.currency_exponent) != (
                f.currency_code, f.currency_exponent):
            raise ValueError(f"purses.currency_code: the purses pay in {f.purses.currency_code}"
                             f" (exponent {f.purses.currency_exponent}), the SP bills in "
                             f"{f.currency_code} (exponent {f.currency_exponent})")
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    journal = Path(f.journal_dir)
    if not journal.is_absolute():
        journal = path.parent / journal
    return SpConfig(items, name=f.name, journal_dir=journal, currency_code=f.currency_code,
                    currency_exponent=f.currency_exponent,
                    default_credit_limit=f.default_credit_limit, billing=f.billing,
                    purses=f.purses,
                    **db_setting(f.db, db_url))
