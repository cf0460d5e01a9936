"""Money as people write it and read it.

An amount on the command line is either a decimal in the currency's own unit (``12.34``, ``12``,
``0.99``), placed in minor units by the currency's exponent (the card's, or the bank's), or a
count of minor units (``1234u``, or the ``--minor`` option). Decimals are parsed with
:class:`decimal.Decimal`, never with a float, and an amount that the exponent cannot hold
exactly (``12.345`` at exponent 2) is refused rather than rounded.

Money is printed with its currency: the ISO 4217 alphabetic code from the numeric code cards and
servers carry (``CNY 12.50``), or ``#NNN`` for a numeric code this table does not know. The
numeric code 999 (ISO 4217 ``XXX``, "no currency") is a purse of points: ``1250 pts``.
The table is a small hand-written one on purpose: only the numeric code, the alphabetic code
and the exponent are needed, and no kept library maps all three.
"""

from __future__ import annotations

import decimal
import re
from dataclasses import dataclass
from decimal import Decimal

MAX_MINOR = 0xFFFFFFFF          # an amount field on the card is 4 bytes
POINTS = 999                    # ISO 4217 XXX: no currency; svcard prints it as points
MAX_TEXT = 40                   # longest amount text read (every input is bounded)

# ISO 4217 numeric code -> (alphabetic code, minor-unit exponent), common currencies
CURRENCIES: dict[int, tuple[str, int]] = {
    36: ("AUD", 2), 48: ("BHD", 3), 124: ("CAD", 2), 156: ("CNY", 2), 203: ("CZK", 2),
    208: ("DKK", 2), 344: ("HKD", 2), 348: ("HUF", 2), 356: ("INR", 2), 360: ("IDR", 2),
    376: ("ILS", 2), 392: ("JPY", 0), 400: ("JOD", 3), 410: ("KRW", 0), 414: ("KWD", 3),
    446: ("MOP", 2), 458: ("MYR", 2), 484: ("MXN", 2), 512: ("OMR", 3), 554: ("NZD", 2),
    578: ("NOK", 2), 608: ("PHP", 2), 643: ("RUB", 2), 682: ("SAR", 2), 702: ("SGD", 2),
    704: ("VND", 0), 710: ("ZAR", 2), 752: ("SEK", 2), 756: ("CHF", 2), 764: ("THB", 2),
    784: ("AED", 2), 788: ("TND", 3), 826: ("GBP", 2), 840: ("USD", 2), 901: ("TWD", 2),
    949: ("TRY", 2), 978: ("EUR", 2), 985: ("PLN", 2), 986: ("BRL", 2), POINTS: ("XXX", 0),
}

_MINOR = re.compile(r"(\d+)[uU]")
_DECIMAL = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_EXACT = decimal.Context(prec=60, traps=[decimal.Inexact, decimal.InvalidOperation])


class AmountError(ValueError):
    """An amount that cannot be used: ``OPTION TEXT: REASON`` (``reason`` alone as well)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.reason = reason


def currency_label(code: int | None) -> str:
    """``CNY`` for 156, ``#123`` for a code the table does not know, ``""`` for no code."""
    if code is None:
        return ""
    known = CURRENCIES.get(code)
    return known[0] if known else f"#{code:03d}"


def exponent_of(code: int | None) -> int | None:
    """The ISO 4217 exponent of a numeric currency code, or None if the table does not know it."""
    known = CURRENCIES.get(code) if code is not None else None
    return known[1] if known else None


def format_amount(minor: int, exponent: int | None) -> str:
    """Integer minor units as a decimal string (``1234``, 2 -> ``12.34``), integers only."""
    exp = exponent or 0
    if exp == 0:
        return str(minor)
    sign = "-" if minor < 0 else ""
    whole, frac = divmod(abs(minor), 10**exp)
    return f"{sign}{whole}.{frac:0{exp}d}"


def format_points(points: int) -> str:
    return f"{points} pts"


def format_money(minor: int, currency_code: int | None, exponent: int | None = None) -> str:
    """``CNY 12.34``: minor units with the currency's code, in its exponent (the one given, as
    the card states it, else the table's). Points (code 999) print as ``1234 pts``."""
    if currency_code == POINTS:
        return format_points(minor)
    exp = exponent if exponent is not None else exponent_of(currency_code)
    label = currency_label(currency_code)
    number = format_amount(minor, exp)
    return f"{label} {number}" if label else number


@dataclass(frozen=True)
class Amount:
    """An amount as it was typed: either minor units already, or a decimal that the currency's
    exponent turns into minor units (:meth:`minor_units`)."""

    text: str
    option: str = "--amount"
    minor: int | None = None
    decimal: Decimal | None = None

    def minor_units(self, exponent: int | None, currency_code: int | None = None,
                    *, maximum: int = MAX_MINOR) -> int:
        """The amount in minor units at ``exponent``; :class:`AmountError` if the exponent is
        unknown (for a decimal), cannot hold the amount exactly, or the amount is too large."""
        where = f"{self.option} {self.text}"
        if self.minor is not None:
            value = self.minor
        else:
            assert self.decimal is not None
            label = currency_label(currency_code) or "the currency"
            if exponent is None:
                raise AmountError(where, f"{label} has no known exponent, so a decimal "
                                         "cannot be placed; give minor units (e.g. 1234u)")
            try:
                scaled = self.decimal.scaleb(exponent, _EXACT)
                value = int(scaled.to_integral_exact(context=_EXACT))
            except decimal.Inexact:
                hint = f"at most {exponent} decimals" if exponent else "a whole number"
                raise AmountError(where, f"more decimals than {label} has ({exponent}); "
                                         f"write {hint}") from None
        if value > maximum:
            raise AmountError(where, "too large (at most "
                                     f"{format_money(maximum, currency_code, exponent)})")
        return value


def parse_amount(text: str, option: str = "--amount") -> Amount:
    """``12.34`` / ``12`` / ``0.99`` (a decimal, placed later by the exponent) or ``1234u``
    (minor units). Refused with :class:`AmountError`: negative, not a number, too long."""
    raw = text.strip()
    shown = raw if len(raw) <= MAX_TEXT else raw[:MAX_TEXT] + "..."
    if len(raw) > MAX_TEXT:
        raise AmountError(f"{option} {shown}", "too long for an amount")
    if raw.startswith("-"):
        raise AmountError(f"{option} {shown}", "an amount is not negative")
    if m := _MINOR.fullmatch(raw):
        minor = int(m.group(1))
        if minor > MAX_MINOR:
            raise AmountError(f"{option} {shown}", f"too large (at most {MAX_MINOR}u)")
        return Amount(raw, option, minor=minor)
    if _DECIMAL.fullmatch(raw):
        return Amount(raw, option, decimal=Decimal(raw))
    raise AmountError(f"{option} {shown}", "not an amount; write 12.34 (in the currency's "
                                           "unit) or 1234u (minor units)")


def minor_amount(minor: int, option: str = "--minor") -> Amount:
    """An amount given as a plain count of minor units (the ``--minor`` option)."""
    if not 0 <= minor <= MAX_MINOR:
        raise AmountError(f"{option} {minor}", f"an amount is 0..{MAX_MINOR} minor units")
    return Amount(str(minor), option, minor=minor)
