#!/usr/bin/env python3
"""Approvals per second at the wallet's payment gateway (seed 003, embodiment 1), with the
financial system as a process, and what each approval costs.

    python benchmarks/bench_wallet.py [--count 1000] [--clients 1,4,16] [--procs N]
                                      [--no-pin] [--profile DIR] [--smoke]

The financial system and the gateway run as processes (``svcard serve wallet-fin`` and
``wallet-gateway``, each with its own SQLite database). Before the measured window the
benchmark issues virtual cards to members, tops them up by cash, and has each member's wallet
choose a card for ``--count`` purchases (FIG. 4 step b5: each one signed by the mall, the
card's secret checked). In the window the mall asks approval of each purchase
(``POST /v1/approvals`` on its signed link, step b6): the gateway matches the purchase field
by field in one conditional UPDATE, asks the financial system to debit the card under the
purchase's ref, records the answer and approves. ``--clients`` malls' requests are in flight
at once, spread over ``--procs`` generator processes (``loadgen.py``'s: each request on a
keep-alive connection of its small HTTP client).

Printed per case: approvals per second, p50/p99 of the approval request (the mall's view),
and over the same window the gateway's and the financial system's CPU ms and fsyncs per
approval and the generator's CPU ms per approval. After each case the financial system's
debits are counted: one per approval. ``--smoke`` is CI's short run (2 clients, 30
approvals; figures not meaningful).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sqlite3
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from loadgen import (
    GeneratorRun,
    Measured,
    Placement,
    Result,
    fsync_method,
    measure,
    running,
    split_cpus,
    start_server,
)

from svcard.host.kit.serving import free_port, wait_http

SVCARD = str(Path(sys.executable).parent / "svcard")
MALL = "BENCHMALL"
ORIGIN = "http://mall.invalid"
PER_MEMBER = 40          # purchases chosen per member (the gateway allows 50 open)
PRICE = 100              # minor units per purchase


def worker(args: tuple[str, str, list[dict[str, Any]], int], start: Any) -> GeneratorRun:
    """One generator process: ``clients`` threads, each asking approval of purchases from the
    shared list until it is empty; the first purchase of each thread warms it up (not
    counted). Then the generators and the parent meet twice at ``start`` (ready, go)."""
    gateway, key_hex, purchases, clients = args
    from loadgen import Http

    from svcard.host.wallet.links import link_headers

    key = bytes.fromhex(key_hex)
    todo = list(reversed(purchases))
    lock = threading.Lock()
    results: list[Result] = []
    warmed = threading.Barrier(clients + 1)
    go = threading.Event()

    def ask(http: Http, p: dict[str, Any]) -> bool:
        body = json.dumps(p, separators=(",", ":")).encode()
        r = http.post(gateway + "/v1/approvals", content=body,
                      headers=link_headers(key, MALL, "POST", "/v1/approvals", body))
        return r.status_code == 200 and bool(r.json().get("approved"))

    def client() -> None:
        with Http(timeout=60) as http:
            try:
                with lock:
                    first = todo.pop()
                ask(http, first)
            except BaseException:
                warmed.abort()
                raise
            warmed.wait()
            go.wait()
            mine: list[Result] = []
            while True:
                with lock:
                    if not todo:
                        break
                    p = todo.pop()
                began = time.perf_counter()
                try:
                    done = ask(http, p)
                except Exception as exc:    # counted as refused
                    if os.environ.get("SVCARD_BENCH_DEBUG"):
                        print(f"approval: {exc!r}", file=sys.stderr)
                    done = False
                mine.append((time.perf_counter() - began, 1, done))
            with lock:
                results.extend(mine)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    warmed.wait(timeout=180)
    start.wait(timeout=180)   # every generator is ready
    start.wait(timeout=180)   # the parent has begun measuring
    cpu0, wall0 = time.process_time(), time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    return GeneratorRun(results, time.process_time() - cpu0, time.perf_counter() - wall0)


def write_configs(case: Path) -> dict[str, Any]:
    """fin.toml and gateway.toml with fresh keys and free ports."""
    keys = {n: secrets.token_hex(32) for n in ("fin", "web", "mall", "agent")}
    ports = {n: free_port() for n in ("fin", "gateway")}
    url = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
    (case / "fin.toml").write_text(
        f'secret_key = "{secrets.token_hex(32)}"\nmail_dir = "mail"\n'
        f'gateway_url = "{url["gateway"]}"\n'
        f'[[gateway]]\nid = "gateway"\nkey = "{keys["fin"]}"\n'
        f'[[agent]]\nid = "AGENT1"\nkey = "{keys["agent"]}"\n')
    (case / "gateway.toml").write_text(
        f'secret_key = "{secrets.token_hex(32)}"\nfin_url = "{url["fin"]}"\n'
        f'fin_key = "{keys["fin"]}"\n[[web]]\nid = "web"\nkey = "{keys["web"]}"\n'
        f'[[mall]]\nid = "{MALL}"\nkey = "{keys["mall"]}"\norigin = "{ORIGIN}"\n')
    return {"keys": keys, "ports": ports, "url": url}


def prepare(setup: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """Members with a topped-up virtual card each, and ``count`` purchases chosen in their
    wallets: the mall's own records of them (what it asks approval of)."""
    import httpx

    from svcard.host.wallet.gateway.matching import sign_order
    from svcard.host.wallet.links import LinkClient

    keys, url = {n: bytes.fromhex(k) for n, k in setup["keys"].items()}, setup["url"]
    members = -(-count // PER_MEMBER)
    expires = int((time.time() + 3000) * 1000)
    with httpx.Client(timeout=60) as http:
        web = LinkClient(http, url["gateway"], "web", keys["web"])
        agent = LinkClient(http, url["fin"], "AGENT1", keys["agent"])

        def member(i: int) -> list[dict[str, Any]]:
            name = f"bench{i:05d}"
            status, card = web.post("/v1/wallet/issue", {"member": name, "kind": "virtual",
                                                         "ref": secrets.token_hex(8)})
            assert status == 200, card
            status, moved = agent.post("/v1/topups", {
                "ref": "cash-" + secrets.token_hex(8), "card": card["number"],
                "amount": PRICE * PER_MEMBER, "currency": 156})
            assert status == 200 and moved["result"] == "done", moved
            out = []
            for _ in range(min(PER_MEMBER, count - i * PER_MEMBER)):
                p = {"mall": MALL, "order": secrets.token_hex(8), "customer": name,
                     "products": [{"sku": "tea", "qty": 1, "price": PRICE}],
                     "amount": PRICE, "currency": 156, "nonce": secrets.token_hex(16),
                     "expires": expires}
                status, answer = web.post("/v1/wallet/choose", {
                    "member": name, "card": card["number"], "secret": card["secret"],
                    "purchase": sign_order(keys["mall"], p),
                    "return_url": f"{ORIGIN}/shop/?order={p['order']}"})
                assert status == 200, answer
                out.append(p)
            return out

        with ThreadPoolExecutor(8) as pool:
            return [p for chosen in pool.map(member, range(members)) for p in chosen]


def run_case(folder: Path, clients: int, count: int, procs: int, placement: Placement,
             method: str | None, profile: Path | None = None) -> tuple[Measured, int]:
    case = Path(tempfile.mkdtemp(dir=folder))
    setup = write_configs(case)
    servers = [start_server([SVCARD, "serve", f"wallet-{n}", "--config", str(case / f"{n}.toml"),
                             "--db", f"sqlite:///{case / n}.db", "--port",
                             str(setup["ports"][n]), "--log-level", "error"], placement)
               for n in ("fin", "gateway")]
    with running(servers):
        for n in ("fin", "gateway"):
            wait_http(f"{setup['url'][n]}/v1/health", timeout=120)
        purchases = prepare(setup, count + clients)          # one each to warm up
        procs = max(1, min(procs, clients))
        per = -(-clients // procs)
        groups = [per] * (clients // per) + ([clients % per] if clients % per else [])
        shares, at = [], 0
        for g in groups:
            n = len(purchases) * g // clients
            shares.append(purchases[at:at + n])
            at += n
        shares[-1].extend(purchases[at:])
        m = measure(worker, [(setup["url"]["gateway"], setup["keys"]["mall"], s, g)
                             for s, g in zip(shares, groups, strict=True)],
                    {"gateway": servers[1].pid, "fin": servers[0].pid}, placement, 600.0,
                    profile / f"{clients}clients" if profile else None, method)
    db = sqlite3.connect(case / "fin.db")
    try:
        debits = int(db.execute("SELECT count(*) FROM wf_movements WHERE kind='debit' AND "
                                "result='done'").fetchone()[0])
    finally:
        db.close()
    return m, debits


def line(clients: int, m: Measured, debits: int) -> str:
    r = m.summary
    return (f"  {clients:2d} clients: {r['rate']:6.1f} approvals/s  p50 {r['p50']:6.1f} ms  "
            f"p99 {r['p99']:6.1f} ms  ({r['done']:.0f} approved, {r['refused']:.0f} refused; "
            f"{debits} debits at the financial system, warm-up included)\n"
            + "\n".join(m.cost_lines("approval")))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1000, help="approvals per case")
    parser.add_argument("--clients", default="1,4,16", help="requests in flight, per case")
    parser.add_argument("--procs", type=int, default=0,
                        help="generator processes (default: one per generator CPU)")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the servers and the generator to different CPUs")
    parser.add_argument("--profile", type=Path, help="py-spy each server into this folder")
    parser.add_argument("--smoke", action="store_true", help="a short run, for CI")
    args = parser.parse_args()
    cases = (2,) if args.smoke else tuple(int(c) for c in args.clients.split(","))
    count = 30 if args.smoke else args.count
    placement = split_cpus(not args.no_pin)
    procs = args.procs or len(placement.generator or ()) or 2
    method = fsync_method()
    print("svcard wallet benchmark (seed 003, embodiment 1: the mall's approval at the "
          "gateway, debited by the financial system)"
          + (" (smoke run: figures not meaningful)" if args.smoke else ""))
    print(f"  {placement.note}; gateway and financial system as processes, SQLite; "
          f"{count} approvals per case; load average before: {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs; fsyncs counted by "
          f"{method or 'nothing (neither perf nor strace here)'}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for clients in cases:
            m, debits = run_case(Path(tmp), clients, count, procs, placement, method,
                                 args.profile)
            print(line(clients, m, debits), flush=True)
            if m.summary["done"] != count or debits != count + clients:
                print(f"  {m.summary['done']:.0f} of {count} approved, {debits} debits: "
                      "every approval must have its one debit", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
