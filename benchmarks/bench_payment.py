#!/usr/bin/env python3
"""Purchases per second over HTTP on loopback (seed FIG. 4-9), all in one run.

    python benchmarks/bench_payment.py [--seconds 8] [--clients 24] [--smoke]

The payment and merchant servers run as processes (``svcard serve ...``) with durable SQLite
(WAL, synchronous=FULL) and virtual PSAM images (every PSAM write fsynced); load comes from
client processes, each with several threads, each thread paying with its own in-memory card
(the whole client flow: checkout, card, draw, debit, confirmation). It reports purchases per
second, p50 and p99 latency and round trips per purchase for 1, 4 and 16 PSAMs and each variant,
then, with a simulated physical PSAM (30 ms per PSAM APDU), the throughput of FIG. 6/7/8 over
FIG. 5 at the same pool size. Targets: >= 300 purchases/s with 16 PSAMs; early release >= 1.8x
FIG. 5 with slow PSAMs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from loadgen import Result, run_cards, summarize

from svcard.host.kit.serving import wait_http as wait_up
from svcard.host.terminal.journal import Journal
from svcard.reader import Reader

ROOT = Path(__file__).resolve().parent.parent
SVCARD = str(Path(sys.executable).parent / "svcard")


def worker(args: tuple[int, int, str, float, str, str]) -> list[Result]:
    """One client process: ``threads`` cards paying in a loop for ``seconds``, as the
    registered client terminal whose key file is given (FIG. 7 needs one)."""
    first_serial, threads, checkout, seconds, journal_dir, key_file = args
    from svcard.host.pay import client as C
    from svcard.host.pay import client_terminal as CT

    terminal = CT.ClientTerminal.load(Path(key_file))

    def pay(serial: int, reader: Reader, journal: Journal,
            http: httpx.Client) -> tuple[bool, int]:
        return True, C.pay(checkout, reader, journal=journal, http=http,
                           terminal=terminal).round_trips

    return run_cards(first_serial, threads, seconds, journal_dir, pay, balance_limit=100_000,
                     balances={"ep": 100_000})


def run_case(folder: Path, psams: int, variant: str, seconds: float, clients: int,
             procs: int, delay_ms: float = 0) -> dict[str, float]:
    from svcard.host.kit.serving import free_port
    from svcard.host.pay.stack import psam_images

    case = Path(tempfile.mkdtemp(dir=folder))
    pay_port, merchant_port = free_port(), free_port()
    specs = [f"virtual:{p}" for p in psam_images(case, psams)]
    if delay_ms:
        specs = [f"delayed:{delay_ms:g}:{s}" for s in specs]
    from svcard.host.pay.client_terminal import ClientTerminal

    terminal = ClientTerminal.generate()
    terminal.save(case / "terminal.pem")
    # the benchmark's client terminal registered (FIG. 7)
    merchant_toml = (ROOT / "fixtures" / "merchant-demo.toml").read_text().replace(
        "http://127.0.0.1:8080", f"http://127.0.0.1:{pay_port}").replace(
        "http://127.0.0.1:8081", f"http://127.0.0.1:{merchant_port}").replace(
        "[client_terminals]", f'[client_terminals]\n"{terminal.terminal_id.hex()}" = '
                              f'"{terminal.public_key.hex()}"')
    (case / "merchant.toml").write_text(merchant_toml)
    # every client comes from 127.0.0.1: FIG. 5 holds bounded by the pool, not per address
    (case / "payment.toml").write_text(
        f"max_holds_per_merchant = {psams}\nmax_holds_per_client = {psams}\n"
        + (ROOT / "fixtures" / "payment-demo.toml").read_text())
    cmd = [SVCARD, "serve", "payment", "--config", str(case / "payment.toml"),
           "--db", f"sqlite:///{case / 'payments.db'}", "--port", str(pay_port)]
    for s in specs:
        cmd += ["--psam", s]
    servers = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
               subprocess.Popen([SVCARD, "serve", "merchant", "--config",
                                 str(case / "merchant.toml"), "--port", str(merchant_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_up(f"http://127.0.0.1:{pay_port}/v1/health")
        wait_up(f"http://127.0.0.1:{merchant_port}/v1/catalogue")
        checkout = f"http://127.0.0.1:{merchant_port}/v1/checkout/song?variant={variant}"
        per = max(1, clients // procs)
        journals = tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
        started = time.perf_counter()
        with mp.get_context("spawn").Pool(procs) as pool:
            parts = pool.map(worker, [(1000 + i * per, per, checkout, seconds, journals,
                                       str(case / "terminal.pem"))
                                      for i in range(procs)])
        took = time.perf_counter() - started
    finally:
        for p in servers:
            p.terminate()
            p.wait(timeout=30)
    summary = summarize([r for part in parts for r in part], seconds)
    return {**summary, "wall": took}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=24, help="paying cards in parallel")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--smoke", action="store_true", help="a short run, for CI")
    args = parser.parse_args()
    seconds = 1.0 if args.smoke else args.seconds
    pools = (1, 4) if args.smoke else (1, 4, 16)
    variants = ("fig6",) if args.smoke else ("fig5", "fig6", "fig7", "fig8")
    print("svcard payment benchmark" + (" (smoke run: figures not meaningful)" if args.smoke
                                        else ""))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for psams in pools:
            for variant in variants:
                r = run_case(folder, psams, variant, seconds, args.clients, args.procs)
                print(f"  {psams:2d} PSAMs {variant}: {r['rate']:7.1f} purchases/s  p50 "
                      f"{r['p50']:6.1f} ms  p99 {r['p99']:6.1f} ms  {r['trips']:.0f} round "
                      f"trips  ({r['refused']} refused)", flush=True)
        slow_pool = 4
        slow = {}
        for variant in ("fig5", "fig6", "fig7", "fig8"):
            slow[variant] = run_case(folder, slow_pool, variant, max(seconds, 2.0),
                                     args.clients, args.procs, delay_ms=30)["rate"]
        print(f"  simulated physical PSAMs (30 ms per APDU), {slow_pool} PSAMs: " + ", ".join(
            f"{v} {rate:.1f}/s" for v, rate in slow.items()))
        if slow["fig5"]:
            print("  early release over FIG. 5: " + ", ".join(
                f"{v} {slow[v] / slow['fig5']:.2f}x" for v in ("fig6", "fig7", "fig8"))
                + "  (target >= 1.8x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
