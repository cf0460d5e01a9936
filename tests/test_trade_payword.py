"""PayWord inside a trading session: one signed commitment, then links verified with hashes
only; forged, replayed, truncated, reordered links and links of another chain are refused and
leave the merchant's held link as it was."""

from __future__ import annotations

import os

import pytest

from svcard.host.trade import signing as S
from svcard.host.trade.payword import (
    LINK,
    MAX_STEP,
    Commitment,
    PaywordError,
    Verifier,
    Wallet,
    chain,
    h,
    link_at,
    order_payload,
)

NOW = 1_800_000_000_000


def setup(length: int = 20, session: str = "am1.7", merchant: str = "shop"
          ) -> tuple[Wallet, bytes, Verifier]:
    private, public = S.new_key()
    wallet = Wallet.new(length)
    c = Commitment(session, merchant, wallet.root, length, 5, "EUR", NOW + 60_000)
    body = c.body()
    verifier = Verifier.open(body, S.sign(private, S.COMMITMENT, body), public, session,
                             merchant, NOW)
    return wallet, private, verifier


def test_chain_links() -> None:
    seed = os.urandom(LINK)
    links = chain(seed, 10)
    assert links[10] == seed and all(h(links[i + 1]) == links[i] for i in range(10))
    assert link_at(seed, 10, 3) == links[3]


def test_payments_verified_with_hashes_and_redeemed() -> None:
    wallet, _private, verifier = setup()
    assert verifier.take(*wallet.pay(1)) == 1
    assert verifier.take(*wallet.pay(3)) == 3
    assert (verifier.index, verifier.commitment.value) == (4, 100)
    assert verifier.link == link_at(wallet.seed, 20, 4)
    assert verifier.take(*wallet.pay(16)) == 16
    with pytest.raises(PaywordError, match="left"):
        wallet.pay(1)


def test_attacks_on_links_change_nothing() -> None:
    wallet, _private, verifier = setup()
    i1, l1 = wallet.pay(2)
    i2, l2 = wallet.pay(2)
    held = (verifier.index, verifier.link)
    bad = [(i1, os.urandom(LINK), "does not hash"),            # forged
           (i1, l1[:31], "32 bytes"),                           # truncated
           (i2 + 1, l2, "does not hash"),                       # claims more than revealed
           (21, l2, "past the chain's end"),
           (0, verifier.commitment.root, "paid already")]
    other, _p, _v = setup()
    bad.append((*other.pay(2), "does not hash"))               # another session's chain
    for index, link, why in bad:
        with pytest.raises(PaywordError, match=why):
            verifier.take(index, link)
        assert (verifier.index, verifier.link) == held
    verifier.take(i2, l2)                                       # reordered: later first
    with pytest.raises(PaywordError, match="a replay"):
        verifier.take(i1, l1)
    with pytest.raises(PaywordError, match="a replay"):
        verifier.take(i2, l2)                                   # replayed
    assert verifier.index == 4


def test_one_payment_reveals_a_bounded_number_of_links() -> None:
    wallet, _private, verifier = setup(MAX_STEP + 5)
    index = MAX_STEP + 1
    with pytest.raises(PaywordError, match="at most"):
        verifier.take(index, link_at(wallet.seed, MAX_STEP + 5, index))


def test_commitment_checked() -> None:
    private, public = S.new_key()
    wallet = Wallet.new(5)
    c = Commitment("am1.7", "shop", wallet.root, 5, 5, "EUR", NOW + 1)
    body = c.body()
    sig = S.sign(private, S.COMMITMENT, body)
    with pytest.raises(PaywordError, match="another session"):
        Verifier.open(body, sig, public, "am1.8", "shop", NOW)
    with pytest.raises(PaywordError, match="another session"):
        Verifier.open(body, sig, public, "am1.7", "other", NOW)
    with pytest.raises(PaywordError, match="expired"):
        Verifier.open(body, sig, public, "am1.7", "shop", NOW + 1)
    with pytest.raises(PaywordError, match="does not verify"):
        Verifier.open(body.replace(b'"unit":5', b'"unit":9'), sig, public, "am1.7", "shop",
                      NOW)
    with pytest.raises(PaywordError, match="does not verify"):     # an order's signature
        Verifier.open(body, S.sign(private, S.ORDER, body), public, "am1.7", "shop", NOW)
    with pytest.raises(PaywordError, match="does not verify"):
        Verifier.open(body, sig, S.new_key()[1], "am1.7", "shop", NOW)
    for bad in ({}, {**c.payload(), "extra": 1}, {**c.payload(), "length": 0},
                {**c.payload(), "root": "00" * 31}, {**c.payload(), "unit": True}):
        body = S.canonical(bad)
        with pytest.raises(PaywordError, match="commitment"):
            Verifier.open(body, S.sign(private, S.COMMITMENT, body), public, "am1.7", "shop",
                          NOW)


def test_signed_order_binds_session_link_item() -> None:
    private, public = S.new_key()
    body = S.canonical(order_payload("am1.7", 3, "song-9", 2))
    sig = S.sign(private, S.ORDER, body)
    assert S.verify(public, S.ORDER, body, sig)
    for other in (order_payload("am1.8", 3, "song-9", 2), order_payload("am1.7", 4, "song-9", 2),
                  order_payload("am1.7", 3, "song-8", 2)):
        assert not S.verify(public, S.ORDER, S.canonical(other), sig)
    assert not S.verify(public, S.COMMITMENT, body, sig)


def test_seed_never_in_repr() -> None:
    wallet = Wallet.new(3)
    wallet.pay(1)
    assert wallet.seed.hex() not in repr(wallet) and "seed" not in repr(wallet)
