"""Money for trading sessions (seed 004): ISO 4217 currencies with their real exponents,
amounts as whole minor units with their currency, exchange tables with a lifespan stamp, and a
conversion whose every leftover minor unit is booked to an explicit rounding account.

A rate is an exact fraction (parsed from its decimal text, never a float): ``1 EUR = 158.2345
JPY``. Converting ``amount`` minor units of ``A`` into ``B`` at rate ``r`` (major per major)
gives ``floor(amount * r * 10^eB / 10^eA)`` minor units of ``B``: the holder of the money never
receives more than its exact value. What is left over is the part of ``amount`` that the whole
minor units of ``B`` do not cover: ``amount - ceil(out / factor)`` minor units of ``A``, which
go to the rounding account in ``A``. So in each currency the postings of a conversion sum to
zero (:class:`Ledger` checks it) and the leftover is always worth less than one minor unit of
``B``.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction

# ISO 4217 active alphabetic codes and their minor-unit exponents. Codes with exponent 2 are
# the rule; the others are listed apart so that a wrong one is easy to see.
_EXPONENT_0 = ("BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF")
_EXPONENT_3 = "BHD IQD JOD KWD LYD OMR TND"
_EXPONENT_4 = "CLF UYW"
_EXPONENT_2 = (
    "AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BOV BRL BSD BTN BWP BYN "
    "BZD CAD CDF CHE CHF CHW CNY COP COU CRC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR FJD FKP "
    "GBP GEL GHS GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR JMD KES KGS KHR KPW KYD KZT "
    "LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN "
    "NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON RSD RUB SAR SBD SCR SDG SEK SGD SHP SLE "
    "SOS SRD SSP STN SVC SYP SZL THB TJS TMT TOP TRY TTD TWD TZS UAH USD USN UYU UZS VES WST "
    "XCD YER ZAR ZMW ZWG")
EXPONENTS: Mapping[str, int] = {
    code: exponent
    for exponent, codes in ((0, _EXPONENT_0), (2, _EXPONENT_2), (3, _EXPONENT_3),
                            (4, _EXPONENT_4))
    for code in codes.split()}
MAX_MINOR = 10**15          # the largest amount taken anywhere (bounded input)
MAX_RATE_DIGITS = 24        # a rate's decimal text, digits in all
_RATE = re.compile(r"[0-9]{1,15}(\.[0-9]{1,12})?")


class MoneyError(ValueError):
    """An amount, currency, rate or table that cannot be used (the message names it)."""


class TableExpired(MoneyError):
    """The exchange table's lifespan has ended: fetch a new one."""


def exponent(code: str) -> int:
    """The minor-unit exponent of ISO 4217 ``code`` (``JPY`` 0, ``EUR`` 2, ``KWD`` 3)."""
    try:
        return EXPONENTS[code]
    except (KeyError, TypeError):
        raise MoneyError(f"currency: {code!r} is not an ISO 4217 code") from None


@dataclass(frozen=True)
class Amount:
    """Whole minor units of one currency."""

    minor: int
    code: str

    def __post_init__(self) -> None:
        exponent(self.code)
        if not isinstance(self.minor, int) or isinstance(self.minor, bool) or \
                abs(self.minor) > MAX_MINOR:
            raise MoneyError(f"amount: {self.minor!r} is not a whole number of minor units "
                             f"within +-{MAX_MINOR}")

    def __str__(self) -> str:
        e = exponent(self.code)
        sign, units = ("-" if self.minor < 0 else ""), abs(self.minor)
        if e == 0:
            return f"{sign}{units} {self.code}"
        return f"{sign}{units // 10**e}.{units % 10**e:0{e}d} {self.code}"

    @classmethod
    def parse(cls, text: str, code: str) -> Amount:
        """``"12.50"`` in ``EUR`` is 1250 minor units; more decimals than the currency has
        are refused, never rounded."""
        e = exponent(code)
        try:
            value = Decimal(text.strip())
        except InvalidOperation:
            raise MoneyError(f"amount: {text!r} is not a number") from None
        if not value.is_finite():
            raise MoneyError(f"amount: {text!r} is not a number")
        minor = value.scaleb(e)
        if minor != minor.to_integral_value():
            raise MoneyError(f"amount: {text!r} has more than {e} decimals for {code}")
        return cls(int(minor), code)


def parse_rate(text: str) -> Fraction:
    """A positive rate from its decimal text, exactly."""
    if not isinstance(text, str) or not _RATE.fullmatch(text) or \
            sum(ch.isdigit() for ch in text) > MAX_RATE_DIGITS:
        raise MoneyError(f"rate: {text!r} is not a decimal number (up to 15.12 digits)")
    rate = Fraction(Decimal(text))
    if rate <= 0:
        raise MoneyError(f"rate: {text!r} is not positive")
    return rate


def minor_factor(rate: Fraction, source: str, target: str) -> Fraction:
    """Minor units of ``target`` per minor unit of ``source`` at ``rate`` (major per major)."""
    return rate * Fraction(10 ** exponent(target), 10 ** exponent(source))


@dataclass(frozen=True)
class Conversion:
    """``source`` became ``target``; ``rounding`` (in the source's currency) is the part of
    the source that whole target minor units do not cover: source == covered + rounding."""

    source: Amount
    target: Amount
    rounding: Amount
    rate: Fraction

    @property
    def covered(self) -> Amount:
        return Amount(self.source.minor - self.rounding.minor, self.source.code)


def convert(amount: Amount, target: str, rate: Fraction) -> Conversion:
    """``amount`` in ``target`` currency at ``rate`` (``target`` major per ``amount``'s major),
    rounded down, with the leftover in the source's currency (see the module docstring)."""
    if amount.minor < 0:
        raise MoneyError("amount: a conversion takes a non-negative amount")
    if rate <= 0:
        raise MoneyError("rate: not positive")
    factor = minor_factor(rate, amount.code, target)
    out = math.floor(amount.minor * factor)
    covered = math.ceil(out / factor) if out else 0
    return Conversion(amount, Amount(out, target), Amount(amount.minor - covered, amount.code),
                      rate)


@dataclass(frozen=True)
class ExchangeTable:
    """A bank's exchange table: rates against its base currency, valid from ``issued`` to
    ``expires`` (ms since 1970). The device keeps it and uses one rate for a whole session."""

    issuer: str
    base: str
    rates: Mapping[str, Fraction]      # code -> that currency's major units per base major unit
    issued: int
    expires: int

    def __post_init__(self) -> None:
        exponent(self.base)
        for code, rate in self.rates.items():
            exponent(code)
            if rate <= 0:
                raise MoneyError(f"rates.{code}: not positive")
        if not 0 <= self.issued < self.expires:
            raise MoneyError("expires: the table's lifespan ends before it begins")

    @classmethod
    def from_text(cls, issuer: str, base: str, rates: Mapping[str, str], issued: int,
                  expires: int) -> ExchangeTable:
        return cls(issuer, base, {c: parse_rate(r) for c, r in rates.items()}, issued, expires)

    def valid(self, now_ms: int) -> bool:
        return self.issued <= now_ms < self.expires

    def rate(self, source: str, target: str, now_ms: int) -> Fraction:
        """``target`` major units per ``source`` major unit; an expired table is refused."""
        if not self.valid(now_ms):
            raise TableExpired(f"the exchange table of {self.issuer} is valid from "
                               f"{self.issued} to {self.expires} (ms), not at {now_ms}: "
                               "fetch a new one")
        exponent(source)
        exponent(target)
        if source == target:
            return Fraction(1)
        known = dict(self.rates)
        known[self.base] = Fraction(1)
        if source not in known or target not in known:
            missing = source if source not in known else target
            raise MoneyError(f"rates: the table of {self.issuer} has no rate for {missing}")
        return known[target] / known[source]


def decimal_text(rate: Fraction) -> str:
    """The exact decimal text of a rate parsed from decimal text (refused if it has none
    within 12 decimals)."""
    for places in range(13):
        scaled = rate * 10**places
        if scaled.denominator == 1:
            whole = int(scaled)
            if places == 0:
                return str(whole)
            return f"{whole // 10**places}.{whole % 10**places:0{places}d}"
    raise MoneyError(f"rate: {rate} has no decimal form within 12 decimals")


def table_payload(table: ExchangeTable) -> dict[str, object]:
    return {"issuer": table.issuer, "base": table.base, "issued": table.issued,
            "expires": table.expires,
            "rates": {code: decimal_text(r) for code, r in sorted(table.rates.items())}}


def table_from_payload(data: object) -> ExchangeTable:
    """An exchange table from its JSON object, every field checked (MoneyError)."""
    fields = {"issuer", "base", "issued", "expires", "rates"}
    if not isinstance(data, dict) or set(data) != fields or \
            not isinstance(data["rates"], dict) or len(data["rates"]) > 500 or \
            not isinstance(data["issuer"], str) or not 0 < len(data["issuer"]) <= 32 or \
            not all(isinstance(data[k], int) and not isinstance(data[k], bool)
                    for k in ("issued", "expires")):
        raise MoneyError(f"table: exactly the fields {sorted(fields)}, well formed")
    return ExchangeTable.from_text(data["issuer"], data["base"], data["rates"],
                                   data["issued"], data["expires"])


def price_in(price: Amount, code: str, table: ExchangeTable, now_ms: int) -> Amount:
    """``price`` shown in currency ``code`` at ``table``'s rate, rounded UP: what it costs
    the customer at most (an expired table is refused: fetch a new one)."""
    factor = minor_factor(table.rate(price.code, code, now_ms), price.code, code)
    return Amount(math.ceil(price.minor * factor), code)


@dataclass
class Ledger:
    """Double-entry postings in minor units: every booking's postings sum to zero in each
    currency, so each currency's books close exactly."""

    balances: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def book(self, postings: Iterable[tuple[str, Amount]]) -> None:
        postings = list(postings)
        totals: dict[str, int] = defaultdict(int)
        for _account, amount in postings:
            totals[amount.code] += amount.minor
        unbalanced = {code: total for code, total in totals.items() if total}
        if unbalanced:
            raise MoneyError(f"postings do not balance: {unbalanced}")
        for account, amount in postings:
            self.balances[(account, amount.code)] += amount.minor

    def balance(self, account: str, code: str) -> int:
        return self.balances.get((account, code), 0)

    def closes(self) -> bool:
        """Whether each currency's accounts sum to zero."""
        totals: dict[str, int] = defaultdict(int)
        for (_account, code), minor in self.balances.items():
            totals[code] += minor
        return not any(totals.values())


def conversion_postings(conv: Conversion, payer: str, payee: str, exchange: str = "fx",
                        rounding: str = "rounding") -> list[tuple[str, Amount]]:
    """The postings of ``conv``: ``payer`` gives the source, ``payee`` gets the target; the
    exchange desk takes what is covered in one currency and gives the target in the other; the
    rounding account takes the leftover."""
    src, dst = conv.source.code, conv.target.code
    return [(payer, Amount(-conv.source.minor, src)),
            (f"{exchange}:{src}", conv.covered),
            (rounding, conv.rounding),
            (f"{exchange}:{dst}", Amount(-conv.target.minor, dst)),
            (payee, conv.target)]
