#!/usr/bin/env python3
"""Retail orders per second through the service provider (seed 001), and what each costs.

    python benchmarks/bench_sp.py [--seconds 8] [--clients 16] [--pools 1,4,16] [--psams 4]
                                  [--variant fig6] [--procs N] [--no-pin] [--count N]
                                  [--profile DIR] [--smoke]

Three servers run as processes with durable SQLite: the SP (``svcard serve sp``, its purse
pool of virtual purse images, each image write fsynced), the merchant (``svcard serve
merchant``) and the merchant's payment server (``svcard serve payment``, ``--psams`` virtual
PSAMs). The generator (``loadgen.py``'s processes and threads, its small HTTP client) runs
``--clients`` type A customers, each signing a retail order (Ed25519) for the merchant's song
and POSTing it to the SP in a loop; an order is done when the SP answers 200 (paid with a pool
purse through the ordinary card payment, billed, goods relayed). For pools of 1, 4 and 16
purses it prints orders per second, p50/p99 latency, and over the same window each server's
CPU ms and fsyncs per order and the generator's CPU ms per order (``/proc``; loadgen.py).

The purses hold enough for the run and the top-up threshold is 0, so no top-up falls in the
measured window (top-ups are the load flow's cost: benchmarks/bench_load.py). ``--count N``
stops each case after about N orders instead of ``--seconds`` (the rate is then over the time
those took); ``--smoke`` is CI's short run (pool of 4, 40 orders; figures not meaningful).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from loadgen import (
    GeneratorRun,
    Http,
    Measured,
    Placement,
    Result,
    fsync_method,
    measure,
    running,
    split_cpus,
    start_server,
)

from svcard.host.kit.serving import wait_http as wait_up

ROOT = Path(__file__).resolve().parent.parent
SVCARD = str(Path(sys.executable).parent / "svcard")
MERCHANT = "MERCH001"
PURSE_EP = 50_000_000          # minor units on each purse: no top-up during a run
CUSTOMER_LIMIT = 10 ** 12


def worker(args: tuple[list[tuple[str, str]], str, float, int], start: Any) -> GeneratorRun:
    """One generator process: its customers (id, private key hex), one thread each, ordering
    in a loop for ``seconds``, or until the process made ``count`` orders (0: no count).
    Each customer orders once first (not counted); then the generators and the parent meet
    twice at ``start`` (ready, go) and the measured window begins."""
    customers, sp_url, seconds, count = args
    from svcard.host.sp.signing import signed_order

    results: list[Result] = []
    lock = threading.Lock()
    warmed = threading.Barrier(len(customers) + 1)
    go = threading.Event()
    end = [0.0]
    left = [count or -1]

    def order(http: Http, who: str, key: bytes) -> bool:
        body, headers = signed_order(key, who, MERCHANT, "song")
        answer = http.post(f"{sp_url}/v1/orders", content=body, headers=headers)
        if answer.status_code != 200 and os.environ.get("SVCARD_BENCH_DEBUG"):
            print(f"{who}: {answer.status_code} {answer.text[:200]}", file=sys.stderr)
        return answer.status_code == 200

    def customer(who: str, key_hex: str) -> None:
        key = bytes.fromhex(key_hex)
        with Http() as http:
            try:
                order(http, who, key)   # warm up: connections, caches
            except BaseException:
                warmed.abort()
                raise
            warmed.wait()
            go.wait()
            mine: list[Result] = []
            while time.monotonic() < end[0]:
                with lock:
                    if left[0] == 0:
                        break
                    left[0] -= 1
                began = time.perf_counter()
                try:
                    done = order(http, who, key)
                except OSError:
                    done = False
                mine.append((time.perf_counter() - began, 1, done))
            with lock:
                results.extend(mine)

    threads = [threading.Thread(target=customer, args=c, daemon=True) for c in customers]
    for t in threads:
        t.start()
    warmed.wait(timeout=120)
    start.wait(timeout=180)   # every generator is ready
    start.wait(timeout=180)   # the parent has begun measuring
    cpu0, wall0 = time.process_time(), time.perf_counter()
    end[0] = time.monotonic() + seconds
    go.set()
    for t in threads:
        t.join()
    return GeneratorRun(results, time.process_time() - cpu0, time.perf_counter() - wall0)


def write_case(case: Path, purses: int, psams: int, clients: int, variant: str,
               ports: dict[str, int]) -> list[list[str]]:
    """The case's configuration and images; the three servers' command lines."""
    from svcard.card.image import save_new_image
    from svcard.card.personalise import image_from_profile
    from svcard.fixtures import fixture_path
    from svcard.host.pay.stack import psam_images

    pay, merchant = (f"http://127.0.0.1:{ports[n]}" for n in ("payment", "merchant"))
    (case / "merchant.toml").write_text(
        (ROOT / "fixtures" / "merchant-demo.toml").read_text()
        .replace("http://127.0.0.1:8080", pay).replace("http://127.0.0.1:8081", merchant)
        .replace('db = "sqlite:///merchant.db"', f'db = "sqlite:///{case / "merchant.db"}"')
        .replace("max_open_orders = 10000", "max_open_orders = 1000000")
        .replace("max_open_per_client = 100 ", "max_open_per_client = 1000000 "))
    holds = max(psams, clients)
    (case / "payment.toml").write_text(
        f"max_holds_per_merchant = {holds}\nmax_holds_per_client = {holds}\n"
        + (ROOT / "fixtures" / "payment-demo.toml").read_text())
    readers = []
    for i in range(purses):
        image = image_from_profile(fixture_path("iep-demo.toml"),
                                   app_serial=f"{9_500_001 + i:020d}",
                                   balance_limit=100_000_000)
        image["app"]["ep"]["balance"] = PURSE_EP
        path = case / f"purse{i + 1}.json"
        save_new_image(path, image, overwrite=True)
        readers.append(f'"virtual:{path}"')
    (case / "sp.toml").write_text(f"""
db = "sqlite:///{case / 'sp.db'}"
journal_dir = "sp-journals"
default_credit_limit = {CUSTOMER_LIMIT}
[billing]
maximum = 50000
[[merchant]]
name = "{MERCHANT}"
checkout_url = "{merchant}/v1/checkout"
variant = "{variant}"
[[merchant.item]]
sku = "song"
retail = 120
[purses]
readers = [{", ".join(readers)}]
bank_url = "http://127.0.0.1:9/"
account = "sp"
secret = "unused: no top-up in a run"
currency_code = 156
topup_threshold = 0
payment_servers = ["{pay}"]
""")
    payment = [SVCARD, "serve", "payment", "--config", str(case / "payment.toml"),
               "--db", f"sqlite:///{case / 'payments.db'}", "--port", str(ports["payment"])]
    for p in psam_images(case, psams):
        payment += ["--psam", f"virtual:{p}"]
    return [payment,
            [SVCARD, "serve", "merchant", "--config", str(case / "merchant.toml"), "--port",
             str(ports["merchant"])],
            [SVCARD, "serve", "sp", "--config", str(case / "sp.toml"), "--port",
             str(ports["sp"])]]


def customers_of(case: Path, count: int) -> list[tuple[str, str]]:
    """``count`` customers added to the SP's database: (id, private key hex)."""
    from svcard.host.sp import db as D
    from svcard.host.sp.customers import add_customer
    from svcard.host.sp.signing import new_key

    engine = D.make_engine(f"sqlite:///{case / 'sp.db'}")
    out = []
    try:
        for i in range(count):
            private, public = new_key()
            add_customer(engine, f"cust{i:04d}", public, CUSTOMER_LIMIT, 156)
            out.append((f"cust{i:04d}", private.hex()))
    finally:
        engine.dispose()
    return out


def run_case(folder: Path, purses: int, psams: int, variant: str, seconds: float,
             clients: int, procs: int, placement: Placement, method: str | None,
             count: int = 0, profile: Path | None = None) -> Measured:
    from svcard.host.kit.serving import free_port

    case = Path(tempfile.mkdtemp(dir=folder))
    ports = {n: free_port() for n in ("payment", "merchant", "sp")}
    commands = write_case(case, purses, psams, clients, variant, ports)
    customers = customers_of(case, clients)
    servers = [start_server(cmd, placement) for cmd in commands]
    with running(servers):
        wait_up(f"http://127.0.0.1:{ports['payment']}/v1/health", timeout=120)
        wait_up(f"http://127.0.0.1:{ports['merchant']}/v1/catalogue", timeout=120)
        wait_up(f"http://127.0.0.1:{ports['sp']}/v1/health", timeout=120)
        sp_url = f"http://127.0.0.1:{ports['sp']}"
        per = max(1, clients // procs)
        groups = [customers[i:i + per] for i in range(0, clients, per)]
        window = seconds if not count else 600.0     # with a count: until it is reached
        return measure(worker, [(g, sp_url, window, -(-count // len(groups)) if count else 0)
                                for g in groups],
                       {"sp": servers[2].pid, "payment": servers[0].pid,
                        "merchant": servers[1].pid}, placement, window,
                       profile / f"{purses}purses" if profile else None, method)


def line(purses: int, m: Measured) -> str:
    r = m.summary
    return (f"  {purses:2d} purses: {r['rate']:7.1f} orders/s  p50 {r['p50']:6.1f} ms  p99 "
            f"{r['p99']:6.1f} ms  ({r['done']:.0f} orders, {r['refused']:.0f} refused)\n"
            + "\n".join(m.cost_lines("order")))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--count", type=int, default=0,
                        help="stop each case after about this many orders (not --seconds)")
    parser.add_argument("--clients", type=int, default=16, help="customers ordering at once")
    parser.add_argument("--pools", default="1,4,16", help="purse pool sizes")
    parser.add_argument("--psams", type=int, default=4, help="PSAMs at the payment server")
    parser.add_argument("--variant", default="fig6", choices=("fig5", "fig6", "fig8"),
                        help="the variant the SP asks the merchant for")
    parser.add_argument("--procs", type=int, default=0,
                        help="generator processes (default: one per generator CPU)")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the servers and the generator to different CPUs")
    parser.add_argument("--profile", type=Path, help="py-spy each server into this folder")
    parser.add_argument("--smoke", action="store_true", help="a short run, for CI")
    args = parser.parse_args()
    pools = (4,) if args.smoke else tuple(int(p) for p in args.pools.split(","))
    clients = 4 if args.smoke else args.clients
    count = 40 if args.smoke else args.count
    placement = split_cpus(not args.no_pin)
    procs = args.procs or len(placement.generator or ()) or 2
    method = fsync_method()
    print("svcard service provider benchmark" + (" (smoke run: figures not meaningful)"
                                                 if args.smoke else ""))
    print(f"  {placement.note}; {clients} customers in {procs} generator process(es), "
          f"{args.psams} PSAMs, {args.variant}; load average before: "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; fsyncs counted by "
          f"{method or 'nothing (neither perf nor strace here)'}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for purses in pools:
            m = run_case(Path(tmp), purses, args.psams, args.variant, args.seconds, clients,
                         min(procs, clients), placement, method, count, args.profile)
            print(line(purses, m), flush=True)
            if args.smoke and m.summary["done"] == 0:
                print("  no order went through", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
