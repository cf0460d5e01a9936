#!/usr/bin/env python3
"""Loads per second over HTTP on loopback (seed FIG. 17-18).

    python benchmarks/bench_load.py [--seconds 8] [--clients 16] [--procs 2] [--smoke]

The bank and load servers run as processes (``svcard serve bank|load``) with durable SQLite
(WAL, synchronous=FULL) and a virtual HSM; load comes from client processes, each with several
threads, each thread loading its own in-memory card in a loop (the whole client flow: card
reads, bank start, INITIALIZE FOR LOAD, load request, CREDIT FOR LOAD, result, confirmation to
the bank; the client journal fsynced at every step, in /dev/shm when there is one). Reports
loads per second, p50 and p99 latency and round trips per load. Target: >= 200 loads/s.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from svcard.host.serving import wait_http as wait_up

ROOT = Path(__file__).resolve().parent.parent
SVCARD = str(Path(sys.executable).parent / "svcard")


def worker(args: tuple[int, int, str, str, float, str]) -> list[tuple[float, int, bool]]:
    first, threads, bank_url, secret, seconds, journal_dir = args
    from svcard.card.image import card_from_image
    from svcard.card.personalise import image_from_profile
    from svcard.fixtures import fixture_path
    from svcard.host import load_client as LC
    from svcard.host.client import PaymentRefused
    from svcard.host.journal import Journal
    from svcard.reader import VirtualReader

    results: list[tuple[float, int, bool]] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def run(serial: int) -> None:
        image = image_from_profile(fixture_path("iep-demo.toml"), app_serial=f"{serial:020d}",
                                   balance_limit=0xFFFFFFFF)
        reader = VirtualReader(card_from_image(image))
        reader.connect()
        journal = Journal(Path(journal_dir) / f"j{serial}.jsonl")
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < end:
                started = time.perf_counter()
                try:
                    out = LC.load(bank_url, reader, account=f"a{serial}", secret=secret,
                                  amount=1, journal=journal, http=http)
                    ok, trips = out.outcome == "loaded", out.round_trips
                except PaymentRefused:
                    ok, trips = False, 0
                with lock:
                    results.append((time.perf_counter() - started, trips, ok))

    pool = [threading.Thread(target=run, args=(first + i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=16, help="cards loading in parallel")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--smoke", action="store_true", help="a short run, for CI")
    args = parser.parse_args()
    seconds = 1.5 if args.smoke else args.seconds
    clients = 4 if args.smoke else args.clients
    from svcard.host.bankdb import BankDb
    from svcard.host.bankdb import make_engine as bank_engine
    from svcard.host.serving import free_port
    from svcard.host.stack import hsm_image

    case = Path(tempfile.mkdtemp())
    bank_port, load_port = free_port(), free_port()
    bank_toml = (ROOT / "fixtures" / "bank-demo.toml").read_text().replace(
        "http://127.0.0.1:8084", f"http://127.0.0.1:{load_port}").replace(
        "http://127.0.0.1:8083", f"http://127.0.0.1:{bank_port}")
    (case / "bank.toml").write_text(bank_toml)
    bank_db = f"sqlite:///{case / 'bank.db'}"
    per = max(1, clients // args.procs)
    db = BankDb(bank_engine(bank_db))
    for i in range(args.procs * per):
        db.create_account(f"a{1000 + i}", "bench", 156, 10**12, "pw")
    servers = [
        subprocess.Popen([SVCARD, "serve", "load", "--config",
                          str(ROOT / "fixtures" / "load-demo.toml"), "--hsm",
                          f"virtual:{hsm_image(case)}", "--db",
                          f"sqlite:///{case / 'loads.db'}", "--port", str(load_port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([SVCARD, "serve", "bank", "--config", str(case / "bank.toml"), "--db",
                          bank_db, "--port", str(bank_port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_up(f"http://127.0.0.1:{load_port}/v1/health")
        wait_up(f"http://127.0.0.1:{bank_port}/v1/health")
        journals = tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
        bank_url = f"http://127.0.0.1:{bank_port}/v1/load"
        with mp.get_context("spawn").Pool(args.procs) as pool:
            parts = pool.map(worker, [(1000 + i * per, per, bank_url, "pw", seconds, journals)
                                      for i in range(args.procs)])
    finally:
        for p in servers:
            p.terminate()
            p.wait(timeout=30)
    results = [r for part in parts for r in part]
    good = [r for r in results if r[2]]
    lat = sorted(r[0] for r in good) or [0.0]
    rate = len(good) / seconds
    print(f"{args.procs * per} cards loading for {seconds:g} s: {len(good)} loads, "
          f"{len(results) - len(good)} refused")
    print(f"loads/s {rate:.1f} (target >= 200: {'met' if rate >= 200 else 'NOT met'}); "
          f"p50 {statistics.median(lat) * 1000:.1f} ms, "
          f"p99 {lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000:.1f} ms; "
          f"round trips {statistics.mean(r[1] for r in good) if good else 0:.1f}")
    if not good:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
