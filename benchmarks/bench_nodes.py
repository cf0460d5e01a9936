#!/usr/bin/env python3
"""Payment-server nodes on one PostgreSQL behind nginx: what a purchase costs with 1 node and
with 3 (issue 16, goal "no coordination tax").

    python benchmarks/bench_nodes.py [--seconds 8] [--clients 12] [--psams 6]
                                     [--variants fig6,fig7] [--no-pin] [--smoke]

A private PostgreSQL cluster (tests/pg_env.py: needs root and Debian's postgresql), the nodes
(``python -m svcard.host.pay.nodes``, every PSAM image named by every node, each node serving
the PSAMs it leases), Debian's nginx in front of them, a merchant (``svcard serve merchant``)
and the load generator of ``loadgen.py`` (in-memory cards, journals in tmpfs). For 1 and 3
nodes it reports purchases/s, p50/p99 and, per purchase: the nodes' CPU ms (summed), nginx's
and the merchant's, PostgreSQL's (every backend: the cluster's processes, counted over the
whole case, warm-up included), the database transactions (``pg_stat_database``: commits +
rollbacks, each at least one round trip, usually 3-5 with BEGIN/COMMIT), the rows written, and
lock waits (``pg_locks`` sampled every 10 ms: the share of samples with a waiting lock, the
most waiting at once; ``deadlocks``). On these 2 cores throughput cannot grow with nodes: the
figures that carry over to N machines are the CPU and round trips per purchase.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from loadgen import Measured, Placement, journal_folder, measure, process_cpu, split_cpus

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
SVCARD = str(Path(sys.executable).parent / "svcard")


def pg_counters(url: str) -> dict[str, int]:
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    with psycopg.connect(host=u.query["host"], port=int(str(u.query["port"])), user="postgres",
                         dbname=u.database, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback, tup_inserted + tup_updated + tup_deleted, "
            "deadlocks FROM pg_stat_database WHERE datname = current_database()").fetchone()
        assert row is not None
    return {"xacts": int(row[0]), "writes": int(row[1]), "deadlocks": int(row[2])}


def cluster_cpu(postmaster: int) -> float:
    """CPU seconds of the PostgreSQL cluster: the postmaster and its living children, plus
    what its ended children used (the postmaster's cutime/cstime)."""
    total = process_cpu(postmaster)
    stat = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    total += (int(stat[13]) + int(stat[14])) / os.sysconf("SC_CLK_TCK")
    for child in Path(f"/proc/{postmaster}/task").iterdir():
        for pid in (Path(child) / "children").read_text().split():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += process_cpu(int(pid))
    return total


class LockSampler:
    """``pg_locks`` sampled while the load runs: how often a lock was waited for."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples = self.waiting = self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psycopg
        from sqlalchemy.engine import make_url

        u = make_url(self.url)
        with psycopg.connect(host=u.query["host"], port=int(str(u.query["port"])),
                             user="postgres", dbname=u.database, autocommit=True) as conn:
            while not self._stop.wait(0.01):
                row = conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted "
                                   "AND database = (SELECT oid FROM pg_database WHERE "
                                   "datname = current_database())").fetchone()
                n = int(row[0]) if row else 0
                self.samples += 1
                self.waiting += 1 if n else 0
                self.most = max(self.most, n)

    def __enter__(self) -> LockSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)


def run_case(folder: Path, cluster: Any, nodes: int, psams: int, variant: str, seconds: float,
             clients: int, procs: int, placement: Placement) -> tuple[Measured, dict[str, Any]]:
    from bench_payment import worker

    from svcard.host.kit.serving import free_port
    from svcard.host.kit.serving import wait_http as wait_up
    from svcard.host.pay.client_terminal import ClientTerminal
    from svcard.host.pay.nodes import Nginx, Node, NodeSpec
    from svcard.host.pay.stack import psam_images

    case = Path(tempfile.mkdtemp(dir=folder))
    db_url = cluster.new_database()
    images = [f"virtual:{p}" for p in psam_images(case, psams)]
    key = os.urandom(32)
    merchant_id = "4D45524348303031"
    running = [Node(case, NodeSpec(f"node{i + 1}", free_port(), db_url, images, merchant_id,
                                   key.hex(), lease_seconds=10.0, acquire_timeout=2.0,
                                   max_holds=max(psams, clients))) for i in range(nodes)]
    nginx: Nginx | None = None
    merchant = None
    try:
        for n in running:
            n.start()
        for n in running:
            n.wait_ready()
            if placement.servers is not None:
                os.sched_setaffinity(n.pid, placement.servers)
        deadline = time.monotonic() + 60   # every PSAM leased (the nodes rebalance)
        while _held(running) < psams:
            if time.monotonic() > deadline:
                raise TimeoutError("the PSAMs were not all leased within 60 s")
            time.sleep(0.1)
        nginx = Nginx(case / "nginx", [f"127.0.0.1:{n.spec.port}" for n in running]).start()
        terminal = ClientTerminal.generate()
        terminal.save(case / "terminal.pem")
        merchant_port = free_port()
        toml = (ROOT / "fixtures" / "merchant-demo.toml").read_text().replace(
            "http://127.0.0.1:8080", nginx.url).replace(
            "http://127.0.0.1:8081", f"http://127.0.0.1:{merchant_port}").replace(
            'db = "sqlite:///merchant.db"', f'db = "sqlite:///{case / "merchant.db"}"').replace(
            "max_open_orders = 10000", "max_open_orders = 1000000").replace(
            "max_open_per_client = 100 ", "max_open_per_client = 1000000 ").replace(
            "[client_terminals]", f'[client_terminals]\n"{terminal.terminal_id.hex()}" = '
                                  f'"{terminal.public_key.hex()}"')
        toml = toml.replace(
            'shared_key = "398359B0148B801CC14A90EED705FEFDD33495DAE1391AF60C8FDC6EE3C92DF6"',
            f'shared_key = "{key.hex()}"')
        (case / "merchant.toml").write_text(toml)
        import subprocess
        merchant = subprocess.Popen(
            [SVCARD, "serve", "merchant", "--config", str(case / "merchant.toml"), "--port",
             str(merchant_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=placement.server_preexec())
        wait_up(f"http://127.0.0.1:{merchant_port}/v1/catalogue")
        assert nginx.proc is not None
        servers = {n.spec.name: n.pid for n in running}
        servers.update({"nginx": nginx.proc.pid, "merchant": merchant.pid})
        for i, pid in enumerate(_children(nginx.proc.pid)):   # its worker
            servers[f"nginx-worker{i + 1}"] = pid
        checkout = f"http://127.0.0.1:{merchant_port}/v1/checkout/song?variant={variant}"
        per = max(1, clients // procs)
        pg0, cpu0 = pg_counters(db_url), cluster_cpu(cluster.proc.pid)
        with journal_folder() as journals, LockSampler(db_url) as locks:
            m = measure(worker, [(1000 + i * per, per, checkout, seconds, journals,
                                  str(case / "terminal.pem")) for i in range(procs)],
                        servers, placement, seconds)
        pg1, cpu1 = pg_counters(db_url), cluster_cpu(cluster.proc.pid)
        extra = {"pg_cpu": cpu1 - cpu0, **{k: pg1[k] - pg0[k] for k in pg0},
                 "lock_share": locks.waiting / max(1, locks.samples), "lock_most": locks.most}
        return m, extra
    finally:
        if merchant is not None:
            merchant.terminate()
            merchant.wait(30)
        if nginx is not None:
            nginx.stop()
        for n in running:
            n.stop()


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def _held(nodes: list[Any]) -> int:
    import httpx

    total = 0
    for n in nodes:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            total += int(httpx.get(n.url + "/v1/health", timeout=2).json().get("psams", 0))
    return total


def line(nodes: int, variant: str, m: Measured, extra: dict[str, Any]) -> str:
    r = m.summary
    done = r["done"] or 1
    node_cpu = sum(v for k, v in m.server_cpu.items() if k.startswith("node"))
    return (f"  {nodes} node(s) {variant}: {r['rate']:7.1f} purchases/s  p50 {r['p50']:6.1f} ms"
            f"  p99 {r['p99']:6.1f} ms  ({r['refused']:.0f} refused)\n"
            f"      CPU ms/purchase: nodes {node_cpu / done * 1000:.2f} (" + ", ".join(
                f"{k} {v / done * 1000:.2f}" for k, v in m.server_cpu.items())
            + f"), PostgreSQL {extra['pg_cpu'] / done * 1000:.2f} (whole case)\n"
            f"      DB per purchase: {extra['xacts'] / done:.2f} transactions, "
            f"{extra['writes'] / done:.2f} rows written (whole case, lease renewals included);"
            f" lock waits in {extra['lock_share']:.1%} of samples, at most "
            f"{extra['lock_most']} at once; {extra['deadlocks']} deadlocks")


def main() -> int:
    from pg_env import start_cluster

    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=12, help="paying cards in parallel")
    parser.add_argument("--psams", type=int, default=6, help="PSAMs shared by the nodes")
    parser.add_argument("--procs", type=int, default=0)
    parser.add_argument("--variants", default="fig6,fig7")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a short run, for CI")
    args = parser.parse_args()
    seconds = 1.0 if args.smoke else args.seconds
    variants = ("fig7",) if args.smoke else tuple(args.variants.split(","))
    clients = 4 if args.smoke else args.clients
    psams = 3 if args.smoke else args.psams
    placement = split_cpus(not args.no_pin)
    procs = args.procs or len(placement.generator or ()) or 2
    print("svcard payment nodes benchmark" + (" (smoke run: figures not meaningful)"
                                              if args.smoke else ""))
    print(f"  {placement.note}; {clients} cards in {procs} generator process(es); {psams} "
          f"PSAMs leased among the nodes; one PostgreSQL (fsync on); nginx in front",
          flush=True)
    cluster = start_cluster()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = {}
            for variant in variants:
                for nodes in (1, 3):
                    m, extra = run_case(Path(tmp), cluster, nodes, psams, variant, seconds,
                                        clients, procs, placement)
                    print(line(nodes, variant, m, extra), flush=True)
                    done = m.summary["done"] or 1
                    results[(variant, nodes)] = sum(
                        v for k, v in m.server_cpu.items() if k.startswith("node")) / done
                one, three = results[(variant, 1)], results[(variant, 3)]
                print(f"  {variant}: nodes' CPU per purchase, 3 nodes / 1 node = "
                      f"{three / one if one else float('nan'):.2f} (goal <= 1.15)")
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
