#!/usr/bin/env python3
"""Fuzz the emulated IEP and PSAM with COUNT random and mutated APDUs.

    python scripts/fuzz_cards.py --count 1000000 [--seed N]

Exits 0 when no APDU crashed a card, every answer ended in a valid status word and no value
moved without a valid MAC; prints the status words seen and the rate.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fuzzing import run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    try:
        counts = run(args.count, args.seed)
    except AssertionError as exc:
        print(f"FAILED: {exc}")
        return 1
    took = time.perf_counter() - started
    print(f"{args.count} APDUs (seed {args.seed}) in {took:.1f} s "
          f"({args.count / took:,.0f} APDUs/s): no crash, no invalid status word, "
          "no value moved without a valid MAC")
    for sw, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {sw}: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
