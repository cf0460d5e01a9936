"""The load generator the HTTP benchmarks share: threads, each with its own in-memory purse
card and journal, running one client flow in a loop, and the summary of what they measured."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from svcard.card.image import card_from_image
from svcard.card.personalise import image_from_profile
from svcard.fixtures import fixture_path
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.purse import TerminalError
from svcard.reader import Reader, VirtualReader

Result = tuple[float, int, bool]  # seconds, round trips, done
# one transaction: (serial, card, journal, http) -> (done, round trips)
Step = Callable[[int, Reader, Journal, httpx.Client], tuple[bool, int]]


def run_cards(first_serial: int, threads: int, seconds: float, journal_dir: str, step: Step,
              **profile: object) -> list[Result]:
    """``threads`` cards (serials from ``first_serial``, the demo profile with ``profile``
    overrides; keys diversified for each serial) running ``step`` for ``seconds``. A refusal
    counts as not done."""
    results: list[Result] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def run(serial: int) -> None:
        image = image_from_profile(fixture_path("iep-demo.toml"), app_serial=f"{serial:020d}",
                                   **profile)
        reader = VirtualReader(card_from_image(image))
        reader.connect()
        journal = Journal(Path(journal_dir) / f"j{serial}.jsonl")
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < end:
                started = time.perf_counter()
                try:
                    done, trips = step(serial, reader, journal, http)
                except TerminalError:
                    done, trips = False, 0
                with lock:
                    results.append((time.perf_counter() - started, trips, done))

    pool = [threading.Thread(target=run, args=(first_serial + i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return results


def summarize(results: list[Result], seconds: float) -> dict[str, float]:
    """Rate of done transactions, p50/p99 latency (ms), mean round trips, refusals."""
    good = [r for r in results if r[2]]
    lat = sorted(r[0] for r in good) or [0.0]
    return {"rate": len(good) / seconds, "done": len(good),
            "p50": statistics.median(lat) * 1000,
            "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
            "trips": statistics.mean(r[1] for r in good) if good else 0,
            "refused": len(results) - len(good)}
