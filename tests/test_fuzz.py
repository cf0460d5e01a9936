"""Property-based fuzzing of the IEP and PSAM (the 1,000,000-APDU run is scripts/fuzz_cards.py)."""

from __future__ import annotations

import random

from fuzzing import IEP_SEEDS, PSAM_SEEDS, FuzzTarget, mutate, run
from hypothesis import given, settings
from hypothesis import strategies as st
from rawhost import RawHost


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=300)), max_size=30))
def test_random_bytes_never_crash_or_move_value(commands: list[tuple[bool, bytes]]) -> None:
    target = FuzzTarget()
    for to_iep, apdu in commands:
        target.send("iep" if to_iep else "psam", apdu)
    target.check()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 1000), st.integers(0, 2**32)),
                max_size=40))
def test_mutated_commands_never_crash_or_move_value(plan: list[tuple[bool, int, int]]) -> None:
    target = FuzzTarget()
    for to_iep, index, seed in plan:
        seeds = IEP_SEEDS if to_iep else PSAM_SEEDS
        target.send("iep" if to_iep else "psam",
                    mutate(seeds[index % len(seeds)], random.Random(seed)))
    target.check()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.integers(1, 500), st.binary(min_size=4, max_size=30)),
                max_size=20))
def test_value_moves_exactly_by_the_valid_purchases(steps: list[int | bytes]) -> None:
    """Valid purchases among junk: the balance drops by exactly their sum."""
    target = FuzzTarget()
    host = RawHost(target.iep)
    spent = 0
    for step in steps:
        if isinstance(step, int):
            host.select()
            if host.balance() >= step:
                host.purchase(step)
                spent += step
        else:
            target.send("iep", step)
    host.select()
    assert host.balance() == 10_000 - spent


def test_a_short_seeded_run_covers_many_status_words() -> None:
    counts = run(20_000, seed=1)
    assert sum(counts.values()) == 20_000
    for sw in ("9000", "6700", "6A86", "6D00", "6E00", "6985", "9302", "6983"):
        assert sw in counts, sw
