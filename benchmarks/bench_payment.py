#!/usr/bin/env python3
"""Purchases per second over HTTP on loopback (seed FIG. 4-9), and what each one costs.

    python benchmarks/bench_payment.py [--seconds 8] [--clients 24] [--procs N] [--no-pin]
                                       [--warmup S] [--repeat N] [--no-slow]
                                       [--profile DIR] [--smoke]

The payment and merchant servers run as processes (``svcard serve ...``) with durable SQLite
(WAL, synchronous=FULL) and virtual PSAM images (every PSAM write fsynced). The load comes from
the generator of ``loadgen.py``: ``--clients`` in-memory cards (virtual cards: no image file,
no image fsync) in ``--procs`` processes, each card running the whole client flow
(``svcard.host.pay.client.pay``: checkout, card, draw, debit, confirmation, FIG. 7/8 proof) in
a loop over keep-alive connections, its client journal in tmpfs and never fsynced.

For 1, 4 and 16 PSAMs and each variant it reports purchases per second, p50 and p99 latency,
round trips per purchase, and, over the same window, each server process's CPU ms and fsyncs
per purchase and the generator's CPU ms per purchase, with how busy each side's CPUs were (on
2 or more CPUs the servers and the generator are pinned apart; the output says how). Then,
with a simulated physical PSAM (30 ms per PSAM APDU), the throughput of FIG. 6/7/8 over FIG. 5
at the same pool size. Targets: >= 300 purchases/s with 16 PSAMs; payment server CPU <= 2 ms
per purchase for FIG. 7/8, <= 3 ms for FIG. 5/6; early release >= 1.8x FIG. 5 with slow PSAMs.
``--profile DIR`` samples each server with py-spy while it runs (collapsed stacks in DIR).
The payment server's fsyncs are split (perf) into the database's and the PSAM journals' (the
emulated PSAMs' own appends, which a physical PSAM makes in its EEPROM, never a host fsync).
``--warmup S`` runs S seconds of load before each window; ``--repeat N`` runs each case N
times and prints the median and the spread; ``--no-slow`` skips the slow-PSAM cases.
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def worker(args: tuple[int, int, str, float, str, str], start: Any) -> GeneratorRun:
    """One generator process: ``cards`` cards paying in a loop for ``seconds``, as the
    registered client terminal whose key file is given (FIG. 7 needs one)."""
    first_serial, cards, checkout, seconds, journal_dir, key_file = args
    from svcard.host.pay import client as C
    from svcard.host.pay import client_terminal as CT

    terminal = CT.ClientTerminal.load(Path(key_file))

    def pay(serial: int, reader: Reader, journal: Journal, http: Http) -> tuple[bool, int]:
        return True, C.pay(checkout, reader, journal=journal, http=cast(httpx.Client, http),
                           terminal=terminal).round_trips

    return run_cards(first_serial, cards, seconds, journal_dir, pay, start,
                     balance_limit=100_000_000, balances={"ep": 100_000_000})


def run_case(folder: Path, psams: int, variant: str, seconds: float, clients: int,
             procs: int, placement: Placement, method: str | None, delay_ms: float = 0,
             profile: Path | None = None, warmup: float = 0.0) -> Measured:
    from svcard.host.kit.serving import free_port
    from svcard.host.pay.client_terminal import ClientTerminal
    from svcard.host.pay.stack import psam_images

    case = Path(tempfile.mkdtemp(dir=folder))
    pay_port, merchant_port = free_port(), free_port()
    specs = [f"virtual:{p}" for p in psam_images(case, psams)]
    if delay_ms:
        specs = [f"delayed:{delay_ms:g}:{s}" for s in specs]
    terminal = ClientTerminal.generate()
    terminal.save(case / "terminal.pem")
    # the benchmark's client terminal registered (FIG. 7); the orders in the case's folder (the
    # demo's relative path would be one database for every case and run); every card comes
    # from 127.0.0.1, so no limit per client address (a refused payment leaves its order open)
    merchant_toml = (ROOT / "fixtures" / "merchant-demo.toml").read_text().replace(
        "http://127.0.0.1:8080", f"http://127.0.0.1:{pay_port}").replace(
        "http://127.0.0.1:8081", f"http://127.0.0.1:{merchant_port}").replace(
        'db = "sqlite:///merchant.db"', f'db = "sqlite:///{case / "merchant.db"}"').replace(
        "max_open_orders = 10000", "max_open_orders = 1000000").replace(
        "max_open_per_client = 100 ", "max_open_per_client = 1000000 ").replace(
        "[client_terminals]", f'[client_terminals]\n"{terminal.terminal_id.hex()}" = '
                              f'"{terminal.public_key.hex()}"')
    (case / "merchant.toml").write_text(merchant_toml)
    # every card comes from 127.0.0.1 and pays one merchant: FIG. 5 holds bounded by the cards,
    # so a draw waits for a free PSAM (503 after acquire_timeout, asked again) instead of a 429
    holds = max(psams, clients)
    (case / "payment.toml").write_text(
        f"max_holds_per_merchant = {holds}\nmax_holds_per_client = {holds}\n"
        + (ROOT / "fixtures" / "payment-demo.toml").read_text())
    cmd = [SVCARD, "serve", "payment", "--config", str(case / "payment.toml"),
           "--db", f"sqlite:///{case / 'payments.db'}", "--port", str(pay_port)]
    for s in specs:
        cmd += ["--psam", s]
    servers = [start_server(cmd, placement),
               start_server([SVCARD, "serve", "merchant", "--config",
                             str(case / "merchant.toml"), "--port", str(merchant_port)],
                            placement)]
    with running(servers):
        wait_up(f"http://127.0.0.1:{pay_port}/v1/health")
        wait_up(f"http://127.0.0.1:{merchant_port}/v1/catalogue")
        checkout = f"http://127.0.0.1:{merchant_port}/v1/checkout/song?variant={variant}"
        per = max(1, clients // procs)
        with journal_folder() as journals:
            return measure(worker, [(1000 + i * per, per, checkout, seconds, journals,
                                     str(case / "terminal.pem")) for i in range(procs)],
                           {"payment": servers[0].pid, "merchant": servers[1].pid}, placement,
                           seconds, profile / f"{psams}psam-{variant}" if profile else None,
                           method, warmup=warmup, journal_names={"payment": "PSAM journals"})


def line(psams: int, variant: str, m: Measured) -> str:
    r = m.summary
    return (f"  {psams:2d} PSAMs {variant}: {r['rate']:7.1f} purchases/s  p50 {r['p50']:6.1f} ms"
            f"  p99 {r['p99']:6.1f} ms  {r['trips']:.0f} round trips  ({r['refused']:.0f} "
            f"refused, {m.busy} busy answers waited out)\n" + "\n".join(m.cost_lines("purchase")))


def spread_line(runs: list[Measured]) -> str:
    """The median and the range over repeated runs of one case: purchases/s, the payment
    server's CPU ms and fsyncs per purchase."""
    def stat(values: list[float], fmt: str) -> str:
        low, mid, high = min(values), statistics.median(values), max(values)
        return (f"{mid:{fmt}} ({low:{fmt}}-{high:{fmt}}, spread "
                f"{(high - low) / mid if mid else 0:.0%})")

    rates = [m.summary["rate"] for m in runs]
    cpu = [m.per_txn(m.server_cpu["payment"]) for m in runs]
    text = (f"      median of {len(runs)} runs: {stat(rates, '.1f')} purchases/s, payment "
            f"{stat(cpu, '.2f')} CPU ms/purchase")
    counts = [m.fsyncs.get("payment") for m in runs]
    fsyncs = [c / (m.summary["done"] or 1) for c, m in zip(counts, runs, strict=True)
              if c is not None]
    if len(fsyncs) == len(runs):
        text += f", {stat(fsyncs, '.2f')} fsyncs/purchase"
    return text


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=24, help="paying cards in parallel")
    parser.add_argument("--procs", type=int, default=0,
                        help="generator processes (default: one per generator CPU)")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the servers and the generator to different CPUs")
    parser.add_argument("--profile", type=Path, help="py-spy each server into this folder")
    parser.add_argument("--pools", default="1,4,16", help="PSAM pool sizes")
    parser.add_argument("--variants", default="fig5,fig6,fig7,fig8")
    parser.add_argument("--warmup", type=float, default=0.0,
                        help="seconds of load before each measured window (not counted)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each case N times; print the median and the spread")
    parser.add_argument("--no-slow", action="store_true",
                        help="skip the simulated physical PSAM cases")
    parser.add_argument("--smoke", action="store_true", help="a short run, for CI")
    args = parser.parse_args()
    seconds = 1.0 if args.smoke else args.seconds
    # the smoke run (CI, under a minute): FIG. 7 on 4 PSAMs, then FIG. 5 and 8 on slow PSAMs
    pools = (4,) if args.smoke else tuple(int(p) for p in args.pools.split(","))
    variants = ("fig7",) if args.smoke else tuple(args.variants.split(","))
    clients = 8 if args.smoke else args.clients
    placement = split_cpus(not args.no_pin)
    procs = args.procs or len(placement.generator or ()) or 2
    method = fsync_method()
    print("svcard payment benchmark" + (" (smoke run: figures not meaningful)" if args.smoke
                                        else ""))
    print(f"  {placement.note}; {clients} cards in {procs} generator process(es), in-memory "
          f"cards, client journals in tmpfs, never fsynced; load average before: "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; fsyncs counted by "
          f"{method or 'nothing (neither perf nor strace here)'}; servers' HTTP parser: "
          f"{http_parser()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for psams in pools:
            for variant in variants:
                runs = []
                for _ in range(max(1, args.repeat)):
                    m = run_case(folder, psams, variant, seconds, clients, procs, placement,
                                 method, profile=args.profile, warmup=args.warmup)
                    print(line(psams, variant, m) + f"\n      (load average after: "
                          f"{os.getloadavg()[0]:.1f})", flush=True)
                    runs.append(m)
                if len(runs) > 1:
                    print(spread_line(runs), flush=True)
        if args.no_slow:
            return 0
        slow_pool = 4
        slow = {}
        for variant in ("fig5", "fig8") if args.smoke else ("fig5", "fig6", "fig7", "fig8"):
            m = run_case(folder, slow_pool, variant, seconds if args.smoke else
                         max(seconds, 2.0), clients, procs, placement, method, delay_ms=30)
            slow[variant] = m.summary["rate"]
        print(f"  simulated physical PSAMs (30 ms per APDU), {slow_pool} PSAMs: " + ", ".join(
            f"{v} {rate:.1f}/s" for v, rate in slow.items()))
        if slow["fig5"]:
            print("  early release over FIG. 5: " + ", ".join(
                f"{v} {slow[v] / slow['fig5']:.2f}x" for v in slow if v != "fig5")
                + "  (target >= 1.8x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
