"""Random sequences around the composite (CAPP) purchase, checked against a model: the goods
cached by UPDATE CAPP DATA CACHE reach the card only with a DEBIT FOR CAPP PURCHASE whose MAC1
is right and that follows its INITIALIZE with nothing but cache writes in between; every other
path (another command, junk, a wrong MAC1, a reset, a refused record) leaves goods and purse as
they were.

The number of sequences is ``--capp-seqs`` (or SVCARD_CAPP_SEQS; default 150); a failure prints
the seed, and ``--capp-seed`` (SVCARD_CAPP_SEED) replays it."""

from __future__ import annotations

import os
import random

import pytest
from conftest import demo_image, with_balance
from fuzzing import IEP_SEEDS, mutate
from test_capp import COUPONS, TICKETS, TRANSIT, CappHost, good, update_cache

from svcard.card.image import card_from_image
from svcard.protocols import goods as G

FILES = {TICKETS: "ticket", COUPONS: "coupon", TRANSIT: "transit"}


def _option(config: pytest.Config, name: str, env: str, default: int | None) -> int | None:
    try:
        value = config.getoption(name)
    except ValueError:
        value = None
    if value is None:
        value = os.environ.get(env)
    return default if value is None else int(value)


def run_sequence(seed: int, steps: int = 40) -> dict[str, int]:
    rng = random.Random(seed)
    card = card_from_image(with_balance(demo_image("iep", capp_plain_update=True), ep=1_000_000))
    host = CappHost(card)
    host.select()
    goods = card.apps[0].state.goods
    model = {(sfi, n): G.EMPTY for sfi in FILES for n in range(1, 9)}
    balance = 1_000_000
    session: dict | None = None       # the model's open CAPP session: amount, cache, init
    stats = {"committed": 0, "dropped": 0}
    serial = 0
    for _ in range(steps):
        action = rng.choice(["init", "cache", "cache", "cache", "debit", "bad-debit", "junk",
                             "other", "reset", "bad-record"])
        if action == "init":
            amount = rng.randrange(0, 500)
            if session is not None and session["cache"]:
                stats["dropped"] += 1
            session = {"amount": amount, "cache": {}, "init": host.init_capp(amount)}
        elif action == "cache":
            sfi = rng.choice(list(FILES))
            serial += 1
            record = good(FILES[sfi], serial)
            if rng.random() < 0.5:
                apdu, number = update_cache(sfi, rng.randrange(1, 9), record), None
            else:
                apdu, number = update_cache(sfi, record[0], record, G.MODE_TAG), 0
            sw = host.sw(apdu)
            if session is None:
                assert sw == 0x6985
                continue
            if sw == 0x6A84:       # the cache or the file is full: the session ends
                stats["dropped"] += 1 if session["cache"] else 0
                session = None
                continue
            assert sw == 0x9000, hex(sw)
            if number is None:
                number = apdu[2]
            else:                  # tag mode, a new good: the first record free in the model
                view = {**model, **session["cache"]}
                number = next(n for n in range(1, 9) if view[(sfi, n)] == G.EMPTY)
            session["cache"][(sfi, number)] = record
        elif action in ("debit", "bad-debit"):
            if session is None:
                assert host.capp_debit(
                    {"init": host._init(bytes(15))}, 1, bad_mac=True)[1] == 0x6985
                continue
            sw = host.capp_debit(session["init"], session["amount"],
                                 bad_mac=action == "bad-debit")[1]
            if action == "debit":
                assert sw == 0x9000, hex(sw)
                model.update(session["cache"])
                balance -= session["amount"]
                stats["committed"] += 1
            else:
                assert sw == 0x9302
                stats["dropped"] += 1 if session["cache"] else 0
                card.apps[0].state.purchase_mac_failures.clear()   # keep the key usable
            session = None
        elif action == "bad-record":
            sw = host.sw(update_cache(TICKETS, 1, good("coupon")))
            assert sw in (0x6A80, 0x6985)
            if session is not None:
                stats["dropped"] += 1 if session["cache"] else 0
            session = None
        else:
            if action == "junk":
                host.send(mutate(rng.choice(IEP_SEEDS), rng))
            elif action == "other":
                host.send(rng.choice(["805C000204", "00B201C417", "00B2018C28"]))
            else:
                card.reset()
            if session is not None and session["cache"]:
                stats["dropped"] += 1
            session = None
            host.select()
        assert {(sfi, n): goods.read(sfi, n) for sfi, n in model} == model, f"seed {seed}"
        assert card.apps[0].state.ep.balance == balance, f"seed {seed}"
    return stats


def test_the_cache_never_commits_without_its_debit(request: pytest.FixtureRequest) -> None:
    count = _option(request.config, "--capp-seqs", "SVCARD_CAPP_SEQS", 150)
    fixed = _option(request.config, "--capp-seed", "SVCARD_CAPP_SEED", None)
    seeds = [fixed] if fixed is not None else [random.randrange(2**32)
                                               for _ in range(count or 0)]
    totals = {"committed": 0, "dropped": 0}
    for seed in seeds:
        print(f"CAPP sequence seed {seed} (replay: SVCARD_CAPP_SEED={seed})")
        stats = run_sequence(seed)
        for key in totals:
            totals[key] += stats[key]
    if fixed is None and (count or 0) >= 50:
        assert totals["committed"] > 0 and totals["dropped"] > 0, totals
