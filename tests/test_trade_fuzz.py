"""Randomised purchases at the merchant agent's books (its database steps, no HTTP): several
sessions, each purchase honest or one of the attacks (a forged link, a link of another
session, a replay, a reordered one, a claim of more links than revealed, an order for other
units), each through the merchant's order check and its one-step purchase. Invariants after
every step: only honest purchases are taken, in order; the held link is the customer's last
revealed one; the amounts taken sum to held index x unit and never pass the deposit.

Count: SVCARD_TRADE_FUZZ (default 400 steps; the long run in the report used 20,000); seed:
SVCARD_TRADE_SEED (printed, to replay)."""

from __future__ import annotations

import os
import random
import secrets
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from svcard.host.kit.http import Refused
from svcard.host.trade import db as D
from svcard.host.trade import signing as S
from svcard.host.trade.customer import Session, purchase
from svcard.host.trade.payword import Commitment, Wallet
from svcard.host.trade.server.merchant import (
    check_order,
    record_information,
    take_commitment,
    take_purchase,
)

NOW = 1_800_000_000_000


def new_session(engine: Any, n: int, length: int, unit: int) -> Session:
    key, public = S.new_key()
    sid = f"am1.{n}"
    record_information(engine, {"session": sid, "pseudonym": f"p{n}",
                                "session_key": public.hex(), "deposit": length * unit,
                                "currency": "JPY", "expires": NOW + 3_600_000}, "d", NOW)
    wallet = Wallet.new(length)
    c = Commitment(sid, "shop", wallet.root, length, unit, "JPY", NOW + 3_600_000)
    assert take_commitment(engine, sid, c, "{}", NOW)
    return Session(sid, f"p{n}", "shop", "", length * unit, "JPY", length * unit, "JPY", "1",
                   NOW + 3_600_000, unit, length, 0, key, wallet.seed)


def test_random_purchases_keep_the_merchants_books(tmp_path: Path) -> None:
    steps = int(os.environ.get("SVCARD_TRADE_FUZZ", "400"))
    seed = int(os.environ.get("SVCARD_TRADE_SEED", str(secrets.randbits(32))))
    print(f"seed {seed} (replay: SVCARD_TRADE_SEED={seed})")
    rng = random.Random(seed)
    engine = D.ma_engine(f"sqlite:///{tmp_path / 'shop.db'}")
    try:
        sessions = [new_session(engine, n, rng.randint(5, 60), rng.choice((1, 5, 10)))
                    for n in range(1, 5)]
        taken: dict[str, int] = {s.session: 0 for s in sessions}    # index the merchant holds
        held_back: list[tuple[Session, dict[str, Any]]] = []        # sent later, out of order
        accepted = refused = 0
        for _ in range(steps):
            if all(x.spent == x.length for x in sessions[-4:]):     # new sessions
                fresh = [new_session(engine, len(sessions) + i + 1, rng.randint(5, 60),
                                     rng.choice((1, 5, 10))) for i in range(4)]
                sessions += fresh
                taken.update({x.session: 0 for x in fresh})
            s = rng.choice(sessions[-4:])
            kind = rng.choice(("honest", "honest", "honest", "forged", "other", "replay",
                               "reorder", "more", "units"))
            message: dict[str, Any] | None = None
            honest = False
            if kind in ("honest", "reorder") and s.spent < s.length:
                message = purchase(s, "item", rng.randint(1, min(3, s.length - s.spent)))
                if kind == "reorder":        # this one is sent later, after the next one
                    held_back.append((s, message))
                    continue
                honest = message["index"] - message["order"]["units"] == taken[s.session]
            elif kind == "forged" and s.spent < s.length:
                message = {**purchase(s, "item", 1), "link": secrets.token_hex(32)}
            elif kind == "other":
                o = rng.choice([x for x in sessions[-4:] if x is not s])
                if o.spent < o.length:
                    m = purchase(o, "item", 1)
                    message = {**m, "session": s.session}     # aimed at another session
                    held_back.append((o, m))
            elif kind == "replay" and held_back:
                # most often the missing one, late (fills the gap), else any: a replay
                due = [i for i, (o, m) in enumerate(held_back)
                       if m["index"] - m["order"]["units"] == taken[o.session]
                       and m["order"]["units"] == m["index"] - taken[o.session]]
                pick = rng.choice(due) if due and rng.random() < 0.7 else \
                    rng.randrange(len(held_back))
                s, message = held_back.pop(pick)
                honest = message["index"] - message["order"]["units"] == taken[s.session]
            elif kind == "more" and s.spent < s.length:
                m = purchase(s, "item", 1)
                held_back.append((s, m))
                message = {**m, "index": m["index"] + 1,      # claims a link not revealed
                           "order": {**m["order"], "index": m["index"] + 1}}
            elif kind == "units" and s.spent < s.length:
                m = purchase(s, "item", 1)
                held_back.append((s, m))
                message = {**m, "order": {**m["order"], "units": 2}}
            if message is None:
                continue
            try:
                check_order(s.session, S.public_of(s.session_key), message)
                got = take_purchase(engine, s.session, message, "{}", NOW)
            except Refused:
                assert not honest, (kind, message["index"], taken[s.session])
                refused += 1
            else:
                assert honest, (kind, message["index"], taken[s.session])
                taken[s.session] = got["index"]
                accepted += 1
        with engine.connect() as conn:
            for s in sessions:
                row = conn.execute(select(D.ma_sessions).where(
                    D.ma_sessions.c.session == s.session)).one()
                total = conn.execute(select(func.coalesce(func.sum(D.ma_purchases.c.amount), 0))
                                     .where(D.ma_purchases.c.session == s.session)).scalar_one()
                assert row.held_index == taken[s.session]
                assert total == row.held_index * s.unit <= s.deposit_merchant
        print(f"{accepted} purchases taken, {refused} refused, {len(sessions)} sessions")
        assert accepted and refused
    finally:
        engine.dispose()


@pytest.mark.parametrize("units", [0, 10_001])
def test_order_units_bounded(units: int) -> None:
    from svcard.host.trade import messages as M

    assert not M.UNITS(units)
