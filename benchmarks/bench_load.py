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
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from loadgen import Result, run_cards, summarize

from svcard.host.kit.serving import wait_http as wait_up
from svcard.host.terminal.journal import Journal
from svcard.reader import Reader

ROOT = Path(__file__).resolve().parent.parent
SVCARD = str(Path(sys.executable).parent / "svcard")


def worker(args: tuple[int, int, str, str, float, str]) -> list[Result]:
    """One client process: ``threads`` cards loading 0.01 in a loop for ``seconds``."""
    first, threads, bank_url, secret, seconds, journal_dir = args
    from svcard.host.load import client as LC

    def load(serial: int, reader: Reader, journal: Journal,
             http: httpx.Client) -> tuple[bool, int]:
        out = LC.load(bank_url, reader, account=f"a{serial}", secret=secret, amount=1,
                      journal=journal, http=http)
        return out.outcome == "loaded", out.round_trips

    return run_cards(first, threads, seconds, journal_dir, load, balance_limit=0xFFFFFFFF)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=16, help="cards loading in parallel")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--smoke", action="store_true", help="a short run, for CI")
    args = parser.parse_args()
    seconds = 1.5 if args.smoke else args.seconds
    clients = 4 if args.smoke else args.clients
    from svcard.host.kit.serving import free_port
    from svcard.host.load.bank.db import BankDb
    from svcard.host.load.bank.db import make_engine as bank_engine
    from svcard.host.load.stack import hsm_image

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
    summary = summarize([r for part in parts for r in part], seconds)
    rate = summary["rate"]
    print(f"{args.procs * per} cards loading for {seconds:g} s: {summary['done']:.0f} loads, "
          f"{summary['refused']:.0f} refused")
    print(f"loads/s {rate:.1f} (target >= 200: {'met' if rate >= 200 else 'NOT met'}); "
          f"p50 {summary['p50']:.1f} ms, p99 {summary['p99']:.1f} ms; "
          f"round trips {summary['trips']:.1f}")
    if not summary["done"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
