"""Trading-session money (seed 004's currency table): ISO 4217 exponents, exact rates, expired
tables refused, and the property that converting a deposit and its unspent rest back never
creates or loses a minor unit in any currency (the rounding account takes the difference)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from svcard.host.trade.money import (
    EXPONENTS,
    MAX_MINOR,
    Amount,
    ExchangeTable,
    Ledger,
    MoneyError,
    TableExpired,
    conversion_postings,
    convert,
    minor_factor,
    parse_rate,
)


def test_real_exponents() -> None:
    assert (EXPONENTS["JPY"], EXPONENTS["EUR"], EXPONENTS["KWD"], EXPONENTS["CLF"]) == \
        (0, 2, 3, 4)
    assert EXPONENTS["KRW"] == 0 and EXPONENTS["BHD"] == 3 and EXPONENTS["USD"] == 2
    assert str(Amount(1250, "EUR")) == "12.50 EUR"
    assert str(Amount(1250, "JPY")) == "1250 JPY"
    assert str(Amount(-5, "KWD")) == "-0.005 KWD"
    assert Amount.parse("12.5", "EUR") == Amount(1250, "EUR")
    assert Amount.parse("0.125", "KWD") == Amount(125, "KWD")


@pytest.mark.parametrize(("text", "code"), [("1.5", "JPY"), ("0.001", "EUR"), ("x", "EUR"),
                                            ("1", "XXX"), ("NaN", "EUR"), ("1", "eur")])
def test_bad_amounts_refused(text: str, code: str) -> None:
    with pytest.raises(MoneyError):
        Amount.parse(text, code)


@pytest.mark.parametrize("text", ["0", "-1", "1e3", "1.", ".5", "1" * 16, "1.0000000000001",
                                  ""])
def test_bad_rates_refused(text: str) -> None:
    with pytest.raises(MoneyError):
        parse_rate(text)


def test_rate_is_exact() -> None:
    assert parse_rate("158.2345") == Fraction(1582345, 10000)


def table(issued: int = 1_000, expires: int = 2_000) -> ExchangeTable:
    return ExchangeTable.from_text("bank-a", "EUR", {"JPY": "158.2345", "KWD": "0.3312",
                                                     "USD": "1.0821"}, issued, expires)


def test_expired_table_refused() -> None:
    t = table()
    assert t.rate("EUR", "JPY", 1_500) == Fraction(1582345, 10000)
    assert t.rate("JPY", "KWD", 1_999) == Fraction(3312, 10000) / Fraction(1582345, 10000)
    for now in (999, 2_000, 10**12):
        with pytest.raises(TableExpired, match="fetch a new one"):
            t.rate("EUR", "JPY", now)
    with pytest.raises(MoneyError, match="no rate for GBP"):
        t.rate("EUR", "GBP", 1_500)
    with pytest.raises(MoneyError, match="lifespan"):
        table(2_000, 2_000)


def test_conversion_examples() -> None:
    conv = convert(Amount(1000, "EUR"), "JPY", parse_rate("158.2345"))
    assert conv.target == Amount(1582, "JPY")          # 1582.345 JPY, rounded down
    # 1582 JPY are covered by ceil(1582 / 158.2345) = 1000 cents? 999.78.. -> 1000
    assert conv.rounding == Amount(0, "EUR")
    conv = convert(Amount(1, "KWD"), "JPY", parse_rate("480"))   # 0.001 KWD = 0.48 JPY
    assert conv.target == Amount(0, "JPY") and conv.rounding == Amount(1, "KWD")


CODES = sorted(EXPONENTS)


@settings(max_examples=400, deadline=None)
@given(customer=st.sampled_from(CODES), merchant=st.sampled_from(CODES),
       deposit=st.integers(0, 10**12),
       rate_units=st.integers(1, 10**9), rate_scale=st.integers(0, 8),
       spent_share=st.fractions(0, 1))
def test_deposit_and_rest_back_never_create_or_lose_a_minor_unit(
        customer: str, merchant: str, deposit: int, rate_units: int, rate_scale: int,
        spent_share: Fraction) -> None:
    rate = Fraction(rate_units, 10**rate_scale)
    assume(deposit * minor_factor(rate, customer, merchant) <= MAX_MINOR)
    books = Ledger()
    there = convert(Amount(deposit, customer), merchant, rate)
    books.book(conversion_postings(there, "customer", "deposit"))
    spent = int(there.target.minor * spent_share)
    books.book([("deposit", Amount(-spent, merchant)), ("merchant", Amount(spent, merchant))])
    rest = Amount(there.target.minor - spent, merchant)
    back = convert(rest, customer, 1 / rate)
    books.book(conversion_postings(back, "deposit", "customer"))
    assert books.closes()                              # no currency gained or lost a unit
    assert books.balance("deposit", merchant) == 0     # the deposit is used up exactly
    assert books.balance("merchant", merchant) == spent
    # the customer never gets back more than was deposited, and what is kept is exactly
    # the leftovers plus what the merchant got (valued at the desk)
    assert 0 <= -books.balance("customer", customer) <= deposit
    # each leftover is worth less than one minor unit of the other currency
    f = minor_factor(rate, customer, merchant)
    assert there.rounding.minor * f < 1
    assert back.rounding.minor / f < 1
    assert there.rounding.minor >= 0 and back.rounding.minor >= 0
    if spent == 0 and customer == merchant and rate == 1:
        assert books.balance("customer", customer) == 0   # nothing bought, nothing kept


def test_unbalanced_booking_refused_and_changes_nothing() -> None:
    books = Ledger()
    with pytest.raises(MoneyError, match="do not balance"):
        books.book([("a", Amount(-5, "EUR")), ("b", Amount(4, "EUR"))])
    assert books.balances == {} or not any(books.balances.values())


def test_table_travels_as_exact_decimal_text() -> None:
    from svcard.host.trade.money import decimal_text, table_from_payload, table_payload

    t = table()
    payload = table_payload(t)
    assert payload["rates"] == {"JPY": "158.2345", "KWD": "0.3312", "USD": "1.0821"}
    assert table_from_payload(payload) == t
    assert decimal_text(Fraction(5)) == "5" and decimal_text(Fraction(1, 8)) == "0.125"
    with pytest.raises(MoneyError):
        decimal_text(Fraction(1, 3))
    for bad in ({}, {**payload, "x": 1}, {**payload, "issued": True},
                {**payload, "rates": {"JPY": "-1"}}, {**payload, "rates": []}, []):
        with pytest.raises(MoneyError):
            table_from_payload(bad)


def test_price_shown_rounded_up_in_the_customers_currency() -> None:
    from svcard.host.trade.money import price_in

    t = table()
    assert price_in(Amount(120, "JPY"), "EUR", t, 1_500) == Amount(76, "EUR")  # 0.7583..
    assert price_in(Amount(1, "KWD"), "EUR", t, 1_500) == Amount(1, "EUR")     # 0.3 cent
    with pytest.raises(TableExpired):
        price_in(Amount(120, "JPY"), "EUR", t, 2_000)
