#!/usr/bin/env python3
"""Persisted purchase cost as a PSAM's open batch grows: does purchase 100,000 cost what
purchase 1 costs?

    python benchmarks/bench_psam_batch.py                 # 100,000 purchases into one batch
    python benchmarks/bench_psam_batch.py --count 200     # the CI smoke run (figures noisy)
    python benchmarks/bench_psam_batch.py --dir /var/tmp  # where the images go (a real disk)

A purse card and a PSAM, both card images on disk opened with ``open_card`` (every write
fsynced), and ``svcard.host.terminal.purse.purchase`` in a loop through virtual readers: the
same flow as ``svcard terminal purchase``. Every purchase lands in the PSAM's one open batch.
A purse's offline counter stops at 65,535, so a fresh purse card takes over every 50,000
purchases (outside the timed windows). The cost per 1,000 purchases is printed for the window
that ends at 1,000, 10,000 and 100,000 purchases (those within ``--count``), then the batch
close (the MAC over every record, the closed batch written once). Since other processes'
disk writes change the cost of an fsync over minutes, the full batch is also compared with a
fresh PSAM's, one purchase into each in turn (the same drift hits both). Target: purchase
100,000 costs at most 1.2x what purchase 1 costs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from svcard.card.image import open_card, save_new_image
from svcard.card.personalise import image_from_profile
from svcard.fixtures import fixture_path
from svcard.host.terminal import apdus
from svcard.host.terminal import purse as T
from svcard.protocols import purse as P
from svcard.reader import VirtualReader

WHEN = dt.datetime(2027, 3, 14, 15, 9, 26)
CARD_SPAN = 50_000      # purchases per purse card (its offline counter stops at 65,535)
MILESTONES = (1_000, 10_000, 100_000)


def windows(count: int) -> list[tuple[int, int]]:
    """(first, last) purchase numbers of each timed window: 1,000 purchases (fewer in a short
    run) ending at each milestone within ``count``, and at ``count``."""
    size = min(1_000, count // 2)
    ends = [size, *(m for m in MILESTONES if size < m <= count)]
    if ends[-1] != count:
        ends.append(count)
    return [(end - size + 1, end) for end in ends]


class Bench:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.cards = 0
        self.made = 0   # purchases with the purse cards so far
        self.others: list[VirtualReader] = []
        psam_path = folder / "psam.json"
        save_new_image(psam_path, image_from_profile(fixture_path("psam-demo.toml")))
        self.psam_card = open_card(psam_path)
        self.psam = VirtualReader(self.psam_card)
        self.psam.connect()
        self.card_image = image_from_profile(fixture_path("iep-demo.toml"))
        self.card_image["app"]["ep"]["balance"] = CARD_SPAN
        self.card = self._new_card()

    def _new_card(self) -> VirtualReader:
        self.cards += 1
        path = self.folder / f"purse-{self.cards}.json"
        save_new_image(path, self.card_image)
        reader = VirtualReader(open_card(path))
        reader.connect()
        return reader

    def purchase(self, psam: VirtualReader | None = None) -> None:
        T.purchase(self.card, psam or self.psam, 1, when=WHEN)
        self.made += 1

    def swap_if_due(self) -> None:
        """A fresh purse card when the one in use is used up (outside any timing)."""
        if self.made and self.made % CARD_SPAN == 0:
            assert self.card.card is not None
            self.card.card.close()
            self.card = self._new_card()

    def fresh_psam(self) -> VirtualReader:
        """A second PSAM, its batch empty, for the interleaved comparison."""
        path = self.folder / "psam-fresh.json"
        save_new_image(path, image_from_profile(fixture_path("psam-demo.toml")))
        reader = VirtualReader(open_card(path))
        reader.connect()
        self.others.append(reader)
        return reader

    def close_batch(self) -> tuple[float, int]:
        """Close the batch: seconds taken and the record count it answered."""
        t0 = time.perf_counter()
        T.call(self.psam, apdus.select(P.DEFAULT_PSAM_AID), "SELECT PSAM")
        answer = T.call(self.psam, bytes([0x80, 0x7E, 0x00, 0x00]), "CLOSE BATCH")
        took = time.perf_counter() - t0
        return took, int(P.BatchHeader.parse(answer[:P.BatchHeader.sizeof()]).record_count)

    def sizes(self) -> str:
        files = sorted(p for p in self.folder.iterdir() if p.name.startswith("psam.json")
                       and not p.name.endswith(".lock"))
        return ", ".join(f"{p.name} {p.stat().st_size / 1024:,.0f} KiB" for p in files)

    def close(self) -> None:
        for reader in (self.card, self.psam, *self.others):
            if reader.card is not None:
                reader.card.close()


class Counters:
    """fsync/fdatasync calls (the os functions wrapped) and bytes handed to write() (Linux:
    ``wchar`` of /proc/self/io), so growth shows apart from the disk's noise."""

    def __init__(self) -> None:
        self.syncs = 0
        for name in ("fsync", "fdatasync"):
            real = getattr(os, name, None)
            if real is not None:
                setattr(os, name, self._counted(real))

    def _counted(self, real: Callable[[int], None]) -> Callable[[int], None]:
        def call(fd: int) -> None:
            self.syncs += 1
            real(fd)
        return call

    @staticmethod
    def written() -> int:
        try:
            for line in Path("/proc/self/io").read_text().splitlines():
                if line.startswith("wchar:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0


def interleaved(bench: Bench, rounds: int) -> tuple[float, float, float]:
    """Purchases into the full batch and into a fresh PSAM's, one each in turn, so that the
    machine's drift (other processes' disk writes) hits both alike: the median, min and max
    of the cost ratio full/fresh over groups of 50 pairs."""
    fresh = bench.fresh_psam()
    ratios: list[float] = []
    full_t = fresh_t = 0.0
    for n in range(1, rounds + 1):
        for psam in (bench.psam, fresh):
            bench.swap_if_due()
            t0 = time.perf_counter()
            bench.purchase(psam)
            took = time.perf_counter() - t0
            if psam is fresh:
                fresh_t += took
            else:
                full_t += took
        if n % 50 == 0 or n == rounds:
            ratios.append(full_t / fresh_t)
            full_t = fresh_t = 0.0
    return statistics.median(ratios), min(ratios), max(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="purchases into the batch")
    parser.add_argument("--dir", type=Path, default=None,
                        help="folder for the images (default: a temporary folder)")
    args = parser.parse_args()
    if args.count < 2:
        parser.error("--count: at least 2 purchases")
    timed = windows(args.count)
    counters = Counters()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        bench = Bench(Path(tmp))
        try:
            print(f"PSAM batch benchmark: {args.count:,} persisted purchases into one open "
                  f"batch (images in {tmp}, every write fsynced)")
            medians, cpus = [], []
            number = 1
            for first, last in timed:
                while number < first:  # untimed purchases up to the window
                    bench.swap_if_due()
                    bench.purchase()
                    number += 1
                walls: list[float] = []
                cpu = 0.0
                syncs, written = counters.syncs, counters.written()
                while number <= last:
                    bench.swap_if_due()
                    w0, c0 = time.perf_counter(), time.process_time()
                    bench.purchase()
                    walls.append(time.perf_counter() - w0)
                    cpu += time.process_time() - c0
                    number += 1
                n = len(walls)
                median = statistics.median(walls)
                medians.append(median)
                cpus.append(cpu / n)
                print(f"  purchases {first:>7,}..{last:>7,}: {sum(walls) / n * 1000:7.2f} s per "
                      f"1,000 (each: median {median * 1000:5.2f} ms, CPU {cpu / n * 1000:5.2f} "
                      f"ms; {(counters.syncs - syncs) / n:4.1f} fsyncs, "
                      f"{(counters.written() - written) / n / 1024:7.1f} KiB written)")
            ratio, low, high = interleaved(bench, min(1_000, args.count // 2))
            print(f"  interleaved, one purchase each in turn into this batch "
                  f"(from {args.count:,} records) and into a fresh PSAM's: cost ratio {ratio:.2f}x "
                  f"(median of per-50 ratios; {low:.2f}..{high:.2f})")
            print(f"  files before the close: {bench.sizes()}")
            took, records = bench.close_batch()
            print(f"  batch close ({records:,} records): {took * 1000:,.0f} ms; "
                  f"after it: {bench.sizes()}")
            print(f"  cost at {timed[-1][1]:,} / cost at the start: median "
                  f"{medians[-1] / medians[0]:.2f}x, CPU {cpus[-1] / cpus[0]:.2f}x in windows "
                  f"run minutes apart (the disk's load changes meanwhile); interleaved "
                  f"{ratio:.2f}x (target <= 1.2x)")
        finally:
            bench.close()


if __name__ == "__main__":
    main()
