#!/usr/bin/env python3
"""Trading sessions (seed 004): purchases per second inside one session, verified by the
merchant agent, on one core.

    python benchmarks/bench_trade.py            # the figures
    python benchmarks/bench_trade.py --smoke    # a short run for CI (figures not meaningful)

A purchase reveals the next PayWord link; the merchant checks it by hashing it once down to the
link it holds (``Verifier.take``): no signature per purchase. Goal: >= 10,000 purchases/s. Also
shown: the same with the customer's signed order (``sign(order)^c``) verified on every
purchase (one Ed25519 verification each), the customer's cost to make a purchase (its link and
its signed order), the one-off commitment check at session start, the latency of a session's
set-up through the three servers on loopback and of one purchase over HTTP.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from svcard.host.trade import customer as C
from svcard.host.trade import signing as S
from svcard.host.trade.payword import Commitment, Verifier, Wallet, order_payload
from svcard.host.trade.stack import start_trade

GOAL = 10_000
NOW = 1_800_000_000_000


def session(length: int) -> tuple[Wallet, bytes, Verifier, float]:
    private, public = S.new_key()
    wallet = Wallet.new(length)
    c = Commitment("am1.1", "shop", wallet.root, length, 1, "EUR", NOW + 3_600_000)
    body = c.body()
    sig = S.sign(private, S.COMMITMENT, body)
    t = time.perf_counter()
    verifier = Verifier.open(body, sig, public, "am1.1", "shop", NOW)
    return wallet, private, verifier, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a short run for CI")
    ap.add_argument("--purchases", type=int, default=None)
    args = ap.parse_args()
    n = args.purchases or (2_000 if args.smoke else 200_000)

    wallet, private, verifier, commit_s = session(n)
    t = time.perf_counter()
    payments = [wallet.pay(1) for _ in range(n)]
    make_links = time.perf_counter() - t
    t = time.perf_counter()
    for index, link in payments:
        verifier.take(index, link)
    hashes_only = n / (time.perf_counter() - t)
    assert verifier.index == n

    m = max(200, n // 20)
    wallet, private, verifier, _ = session(m)
    t = time.perf_counter()
    orders = []
    for _ in range(m):
        index, link = wallet.pay(1)
        body = S.canonical(order_payload("am1.1", index, "article", 1))
        orders.append((index, link, body, S.sign(private, S.ORDER, body)))
    customer = m / (time.perf_counter() - t)
    public = S.public_of(private)
    t = time.perf_counter()
    for index, link, body, sig in orders:
        if not S.verify(public, S.ORDER, body, sig):
            raise SystemExit("an order did not verify")
        verifier.take(index, link)
    with_orders = m / (time.perf_counter() - t)

    print(f"purchases verified by the merchant (hash only): {hashes_only:12,.0f}/s "
          f"(goal >= {GOAL:,}/s; {n:,} purchases, one core)")
    print(f"  with each signed order verified too:          {with_orders:12,.0f}/s")
    print(f"customer: link + signed order per purchase:     {customer:12,.0f}/s")
    print(f"customer: chain of {n:,} links made in {make_links * 1000:.1f} ms; "
          f"commitment checked in {commit_s * 1e6:.0f} us")
    sessions = 5 if args.smoke else 50
    with tempfile.TemporaryDirectory() as folder:
        stack = start_trade(Path(folder))
        try:
            who = stack.customer("bench", 10**9)
            with httpx.Client(timeout=60) as http:
                setup, over_http = [], []
                for _ in range(sessions):
                    t = time.perf_counter()
                    s = stack.open(http, who, 1_00)
                    setup.append(time.perf_counter() - t)
                s = stack.open(http, who, 10_00)      # 1582 links of 1 JPY
                for _ in range(sessions * 4):
                    t = time.perf_counter()
                    C.buy(http, s, "song", 1)
                    over_http.append(time.perf_counter() - t)
        finally:
            stack.close()
    print(f"session set-up (initiation through 3 servers + commitment), SQLite, loopback: "
          f"median {statistics.median(setup) * 1000:.1f} ms over {sessions}")
    print(f"one purchase over HTTP to the merchant agent (SQLite):  "
          f"median {statistics.median(over_http) * 1000:.2f} ms")
    if not args.smoke and hashes_only < GOAL:
        raise SystemExit(f"below the goal of {GOAL:,}/s")


if __name__ == "__main__":
    main()
