#!/usr/bin/env python3
"""Loads per second over HTTP on loopback (seed FIG. 17-18), and what each one costs.

    python benchmarks/bench_load.py [--seconds 8] [--clients 16] [--procs N] [--no-pin]
                                    [--profile DIR] [--smoke]

The bank and load servers run as processes (``svcard serve bank|load``) with durable SQLite
(WAL, synchronous=FULL) and a virtual HSM. The load comes from the generator of
``loadgen.py``: ``--clients`` in-memory cards (no image file, no image fsync) in ``--procs``
processes, each loading its card in a loop with the real client flow
(``svcard.host.load.client.load``: card reads, bank start, INITIALIZE FOR LOAD, load request,
CREDIT FOR LOAD, result, confirmation to the bank) over keep-alive connections, its client
journal in tmpfs and never fsynced. Reports loads per second, p50 and p99 latency, round trips
per load and, over the same window, the bank's and the load server's CPU ms and fsyncs per
load and the generator's CPU ms per load (on 2 or more CPUs the servers and the generator are
pinned apart; the output says how; the load server's fsyncs split, with perf, into the
database's and the HSM journal's). Targets: >= 200 loads/s; <= 5 ms of CPU per load over
bank + load server together.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

import httpx
from loadgen import (
    GeneratorRun,
    Http,
    Measured,
    Placement,
    fsync_method,
    http_parser,
    journal_folder,
    measure,
    run_cards,
    running,
    split_cpus,
    start_server,
)

from svcard.host.kit.serving import wait_http as wait_up
from svcard.host.terminal.journal import Journal
from svcard.reader import Reader

ROOT = Path(__file__).resolve().parent.parent
SVCARD = str(Path(sys.executable).parent / "svcard")


def worker(args: tuple[int, int, str, str, float, str], start: Any) -> GeneratorRun:
    """One generator process: ``cards`` cards loading 0.01 in a loop for ``seconds``."""
    first, cards, bank_url, secret, seconds, journal_dir = args
    from svcard.host.load import client as LC

    def load(serial: int, reader: Reader, journal: Journal, http: Http) -> tuple[bool, int]:
        out = LC.load(bank_url, reader, account=f"a{serial}", secret=secret, amount=1,
                      journal=journal, http=cast(httpx.Client, http))
        return out.outcome == "loaded", out.round_trips

    return run_cards(first, cards, seconds, journal_dir, load, start,
                     balance_limit=0xFFFFFFFF)


def run_loads(case: Path, clients: int, procs: int, seconds: float, placement: Placement,
              method: str | None, profile: Path | None) -> Measured:
    """Start the load server and the bank in ``case`` (a folder), load for ``seconds``."""
    from svcard.host.kit.serving import free_port
    from svcard.host.load.bank.db import BankDb
    from svcard.host.load.bank.db import make_engine as bank_engine
    from svcard.host.load.stack import hsm_image

    bank_port, load_port = free_port(), free_port()
    bank_toml = (ROOT / "fixtures" / "bank-demo.toml").read_text().replace(
        "http://127.0.0.1:8084", f"http://127.0.0.1:{load_port}").replace(
        "http://127.0.0.1:8083", f"http://127.0.0.1:{bank_port}")
    (case / "bank.toml").write_text(bank_toml)
    bank_db = f"sqlite:///{case / 'bank.db'}"
    per = max(1, clients // procs)
    db = BankDb(bank_engine(bank_db))
    for i in range(procs * per):
        db.create_account(f"a{1000 + i}", "bench", 156, 10**12, "pw")
    servers = [
        start_server([SVCARD, "serve", "load", "--config",
                      str(ROOT / "fixtures" / "load-demo.toml"), "--hsm",
                      f"virtual:{hsm_image(case)}", "--db", f"sqlite:///{case / 'loads.db'}",
                      "--port", str(load_port)], placement),
        start_server([SVCARD, "serve", "bank", "--config", str(case / "bank.toml"), "--db",
                      bank_db, "--port", str(bank_port)], placement)]
    with running(servers):
        wait_up(f"http://127.0.0.1:{load_port}/v1/health")
        wait_up(f"http://127.0.0.1:{bank_port}/v1/health")
        bank_url = f"http://127.0.0.1:{bank_port}/v1/load"
        with journal_folder() as journals:
            return measure(worker, [(1000 + i * per, per, bank_url, "pw", seconds, journals)
                                    for i in range(procs)],
                           {"load": servers[0].pid, "bank": servers[1].pid}, placement,
                           seconds, profile, method, journal_names={"load": "HSM journal"})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=16, help="cards loading in parallel")
    parser.add_argument("--procs", type=int, default=0,
                        help="generator processes (default: one per generator CPU)")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the servers and the generator to different CPUs")
    parser.add_argument("--profile", type=Path, help="py-spy each server into this folder")
    parser.add_argument("--smoke", action="store_true", help="a short run, for CI")
    args = parser.parse_args()
    seconds = 1.5 if args.smoke else args.seconds
    clients = 4 if args.smoke else args.clients
    placement = split_cpus(not args.no_pin)
    procs = args.procs or len(placement.generator or ()) or 2
    method = fsync_method()
    load_average = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        m = run_loads(Path(tmp), clients, procs, seconds, placement, method, args.profile)
    summary = m.summary
    rate = summary["rate"]
    server_ms = m.per_txn(sum(m.server_cpu.values()))
    print("svcard load benchmark" + (" (smoke run: figures not meaningful)" if args.smoke
                                     else ""))
    per = max(1, clients // procs)
    print(f"  {placement.note}; {procs * per} cards in {procs} generator process(es), "
          f"in-memory cards, client journals in tmpfs, never fsynced; "
          f"load average before: {load_average:.1f} on {os.cpu_count()} CPUs; servers' "
          f"HTTP parser: {http_parser()}")
    print(f"  {summary['done']:.0f} loads in {m.wall:.1f} s, {summary['refused']:.0f} refused, "
          f"{m.busy} busy answers waited out")
    print(f"  loads/s {rate:.1f} (target >= 200: {'met' if rate >= 200 else 'NOT met'}); "
          f"p50 {summary['p50']:.1f} ms, p99 {summary['p99']:.1f} ms; "
          f"round trips {summary['trips']:.1f}")
    print("\n".join(m.cost_lines("load")))
    print(f"  server CPU per load, bank + load server: {server_ms:.2f} ms (target <= 5: "
          f"{'met' if server_ms <= 5 else 'NOT met'})")
    if not summary["done"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
