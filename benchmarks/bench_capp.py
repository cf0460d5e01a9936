#!/usr/bin/env python3
"""The composite (CAPP) purchase against a plain purchase, in one run: a CAPP purchase that
writes one goods record costs at most 1.3x a plain purchase (goal, issue 12), in memory.

    python benchmarks/bench_capp.py            # the figures
    python benchmarks/bench_capp.py --smoke    # a short run for CI (figures not meaningful)

Both are the whole local-terminal flow through the virtual reader (SELECT card and PSAM, READ
BINARY of the terminal id, INITIALIZE, INIT SAM, DEBIT, CREDIT SAM); the CAPP purchase adds one
UPDATE CAPP DATA CACHE (a 40-byte ticket, record 1 of SFI 11, by number) and the goods write in
the card's image commit. The ratio is taken over interleaved rounds, so machine-wide drift hits
both alike. Persisted (images fsynced) figures are printed too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from svcard.card.image import card_from_image, open_card, save_new_image
from svcard.card.keys import KeyEntry
from svcard.card.personalise import image_from_profile
from svcard.fixtures import fixture_path
from svcard.host.terminal import capp as C
from svcard.host.terminal import purse as T
from svcard.host.terminal.goods_key import GoodsKeyService
from svcard.protocols import goods as G
from svcard.reader import VirtualReader

WHEN = dt.datetime(2027, 3, 14, 15, 9, 26)
TICKET = G.build("ticket", issuer_id=b"MERCHANT", good_id=bytes(8),
                 valid_from=bytes.fromhex("20270101"), valid_to=bytes.fromhex("20271231"),
                 value=0, reference=b"ROW7SEAT")
ONE_RECORD = [C.GoodsWrite(0x11, TICKET, 1)]
# the record goes MAC'd (84 DE) under the card's goods key, as a card takes it by default
GOODS_KEY = KeyEntry(1, 1, 0, bytes.fromhex("00112233445566778899AABBCCDDEEFF"))   # TEST KEY
KEYS = GoodsKeyService.for_card(GOODS_KEY)


def per_second(fn: Callable[[], object], seconds: float) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def interleaved_ratio(slow: Callable[[], object], fast: Callable[[], object],
                      seconds: float, rounds: int = 15) -> tuple[float, float, float, float]:
    """Median, min and max of per-round cost ratios slow/fast, and the fast one's median
    cost in seconds; the two run alternately."""
    per = max(seconds / rounds / 2, 0.01)
    ratios, fast_costs = [], []
    for _ in range(rounds):
        costs = []
        for fn in (slow, fast):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < per:
                fn()
                n += 1
            costs.append((time.perf_counter() - t0) / n)
        ratios.append(costs[0] / costs[1])
        fast_costs.append(costs[1])
    return (statistics.median(ratios), min(ratios), max(ratios),
            statistics.median(fast_costs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="a short run, for CI")
    parser.add_argument("--seconds", type=float, default=6.0, help="time for the ratio")
    args = parser.parse_args()
    seconds = 0.3 if args.smoke else args.seconds

    iep_image = image_from_profile(fixture_path("iep-demo.toml"))
    iep_image["app"]["ep"]["balance"] = 100_000
    iep_image["app"]["goods_key"] = GOODS_KEY.to_json()
    psam_image = image_from_profile(fixture_path("psam-demo.toml"))

    card = VirtualReader(card_from_image(iep_image))
    psam = VirtualReader(card_from_image(psam_image))
    card.connect()
    psam.connect()

    def plain() -> None:
        T.purchase(card, psam, 0, when=WHEN)

    def capp() -> None:
        C.capp_purchase(card, psam, 0, ONE_RECORD, when=WHEN, goods_keys=KEYS)

    ratio, lo, hi, plain_cost = interleaved_ratio(capp, plain, seconds)

    with tempfile.TemporaryDirectory() as tmp:
        save_new_image(Path(tmp) / "iep.json", iep_image)
        save_new_image(Path(tmp) / "psam.json", psam_image)
        dcard, dpsam = open_card(Path(tmp) / "iep.json"), open_card(Path(tmp) / "psam.json")
        card_d, psam_d = VirtualReader(dcard), VirtualReader(dpsam)
        card_d.connect()
        psam_d.connect()
        disk_plain = per_second(lambda: T.purchase(card_d, psam_d, 0, when=WHEN), seconds / 4)
        disk_capp = per_second(lambda: C.capp_purchase(card_d, psam_d, 0, ONE_RECORD,
                                                       when=WHEN, goods_keys=KEYS), seconds / 4)
        dcard.close()
        dpsam.close()

    print("svcard composite (CAPP) purchase benchmark"
          + (" (smoke run: figures not meaningful)" if args.smoke else ""))
    print(f"  in-memory plain purchase:             {1e6 * plain_cost:8.1f} us each")
    print(f"  in-memory CAPP purchase, one record:  {1e6 * plain_cost * ratio:8.1f} us each")
    print(f"  CAPP / plain (interleaved rounds):    {ratio:8.2f}x  ({lo:.2f}..{hi:.2f}; "
          "goal <= 1.3x)")
    print(f"  persisted: plain {disk_plain:,.0f}/s, CAPP with one record {disk_capp:,.0f}/s "
          f"({disk_plain / disk_capp:.2f}x)")


if __name__ == "__main__":
    main()
