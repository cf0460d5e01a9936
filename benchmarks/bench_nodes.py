#!/usr/bin/env python3
"""Payment-server nodes on one PostgreSQL behind nginx: what a purchase costs with 1 node and
with 3 (issue 16, goal "no coordination tax").

    python benchmarks/bench_nodes.py [--seconds 8] [--warmup 4] [--clients-per-node 4]
                                     [--psams-per-node 2] [--clients N --psams M]
                                     [--variants fig6,fig7] [--placement split|nodes-alone|none]
                                     [--rate-per-node R] [--no-pin] [--repeat N]
                                     [--profile DIR] [--smoke]

A private PostgreSQL cluster (tests/pg_env.py: needs root and Debian's postgresql), the nodes
(``python -m svcard.host.pay.nodes``, every PSAM image named by every node, each node serving
the PSAMs it leases), Debian's nginx in front of them, a merchant (``svcard serve merchant``)
and the load generator of ``loadgen.py`` (in-memory cards, journals in tmpfs).

The comparison. By default each node gets the same load: 1 node with ``--clients-per-node`` K
cards and ``--psams-per-node`` P PSAMs against 3 nodes with 3K cards and 3P PSAMs, so a node
batches (group commit, event loop) as much in both cases while the CPU keeps up. When the
servers' CPU is full, the 3 nodes share the same CPU time, each answers a third as fast, and
does less per wake-up; ``--rate-per-node R`` paces the cards so that each node is offered R
purchases/s in both cases (below what the CPU can serve, the fairest comparison here).
``--clients N`` (with ``--psams``, default 6) is the older fixed-total mode: the same N cards
spread over 1 or 3 nodes. Every
case runs ``--warmup`` seconds of load (not counted; every node serves purchases, fills its
connection pool and statement caches) that runs on without a pause into the measured window.

For 1 and 3 nodes it reports purchases/s, p50/p99 and, per purchase over the window: each
process's CPU ms (nodes summed, nginx, the merchant, PostgreSQL: every backend, the meters'
own backends left out), split into user and system time with voluntary and involuntary context
switches (a node switched out by the 2 others on its CPU shows as involuntary switches and
system time); fsyncs (perf: the nodes' split into database and PSAM journals, PostgreSQL's
WAL syncs); the database transactions (``pg_stat_database``: commits + rollbacks; these
counters reach the view up to a second late), the backends' answers (``sendto`` calls of the
PostgreSQL processes: one per round trip), rows written, and lock waits (``pg_locks`` sampled
every 10 ms: the share of samples with a waiting lock, the most at once; ``deadlocks``). Then
the goal line (nodes' CPU per purchase, 3 nodes / 1 node) and an estimate of what N nodes
would give on N machines from the 1-node figures. On these 2 cores throughput cannot grow
with nodes: the figures that carry over to N machines are the CPU and round trips per purchase.

Placement (``--placement``, on 2 or more CPUs): ``split`` (the default) puts every server
(nodes, nginx, merchant, PostgreSQL) on the first half of the CPUs and the generator on the
rest, as the other HTTP benchmarks do; ``nodes-alone`` puts only the nodes there and
everything else (nginx, merchant, PostgreSQL, generator) on the rest; ``none`` pins nothing
(as ``--no-pin``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from loadgen import (
    Measured,
    Placement,
    SyscallRecorder,
    fsync_method,
    journal_folder,
    measure,
    process_cpu,
    split_cpus,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
SVCARD = str(Path(sys.executable).parent / "svcard")


def pg_connect(url: str) -> Any:
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return psycopg.connect(host=str(u.query["host"]), port=int(str(u.query["port"])),
                           user="postgres", dbname=u.database, autocommit=True)


def pg_counters(conn: Any) -> dict[str, int]:
    """The database's transactions, rows written and deadlocks, and the cluster's WAL syncs
    (``pg_stat_wal``, PostgreSQL 14 and later; -1 where there is none)."""
    row = conn.execute(
        "SELECT xact_commit + xact_rollback, tup_inserted + tup_updated + tup_deleted, "
        "deadlocks FROM pg_stat_database WHERE datname = current_database()").fetchone()
    assert row is not None
    wal = -1
    with contextlib.suppress(Exception):
        got = conn.execute("SELECT wal_sync FROM pg_stat_wal").fetchone()
        wal = int(got[0]) if got else -1
    return {"xacts": int(row[0]), "writes": int(row[1]), "deadlocks": int(row[2]),
            "wal_sync": wal}


def cluster_pids(postmaster: int) -> list[int]:
    """The postmaster and its living children (the backends, the WAL writer...)."""
    return [postmaster, *_children(postmaster)]


def cluster_cpu(postmaster: int) -> float:
    """CPU seconds of the PostgreSQL cluster: the postmaster and its living children, plus
    what its ended children used (the postmaster's cutime/cstime)."""
    total = process_cpu(postmaster)
    stat = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    total += (int(stat[13]) + int(stat[14])) / os.sysconf("SC_CLK_TCK")
    for pid in _children(postmaster):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += process_cpu(pid)
    return total


class LockSampler:
    """``pg_locks`` sampled while the load runs: how often a lock was waited for."""

    def __init__(self, url: str) -> None:
        self.conn = pg_connect(url)
        row = self.conn.execute("SELECT pg_backend_pid()").fetchone()
        self.backend = int(row[0]) if row else 0
        self.samples = self.waiting = self.most = 0
        self.counting = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            row = self.conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted "
                                    "AND database = (SELECT oid FROM pg_database WHERE "
                                    "datname = current_database())").fetchone()
            n = int(row[0]) if row else 0
            if self.counting:
                self.samples += 1
                self.waiting += 1 if n else 0
                self.most = max(self.most, n)

    def __enter__(self) -> LockSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)
        self.conn.close()


class PgMeter:
    """PostgreSQL over the measured window: its CPU (every process, the meters' own backends
    left out), its counters, and (perf) the fsync/fdatasync and sendto calls of its
    processes."""

    def __init__(self, cluster: Any, url: str, sampler: LockSampler,
                 method: str | None) -> None:
        self.postmaster = cluster.proc.pid
        self.conn = pg_connect(url)
        row = self.conn.execute("SELECT pg_backend_pid()").fetchone()
        self.own = {int(row[0]) if row else 0, sampler.backend}
        self.sampler = sampler
        self.recorder = (SyscallRecorder(cluster_pids(self.postmaster),
                                         ("fsync", "fdatasync", "sendto"))
                         if method == "perf" else None)
        self.at: dict[str, tuple[float, float, dict[str, int]]] = {}

    def _own_cpu(self) -> float:
        total = 0.0
        for pid in self.own:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += process_cpu(pid)
        return total

    def __call__(self, moment: str) -> None:
        self.sampler.counting = moment == "start"
        self.at[moment] = (cluster_cpu(self.postmaster), self._own_cpu(),
                           pg_counters(self.conn))

    def result(self, window: tuple[float, float]) -> dict[str, Any]:
        (c0, o0, k0), (c1, o1, k1) = self.at["start"], self.at["stop"]
        out: dict[str, Any] = {"pg_cpu": (c1 - c0) - (o1 - o0),
                               **{k: k1[k] - k0[k] for k in k0 if k != "wal_sync"},
                               "wal_stat": (k1["wal_sync"] - k0["wal_sync"]
                                            if k0["wal_sync"] >= 0 else None),
                               "pg_fsyncs": None, "pg_answers": None}
        calls = None
        if self.recorder is not None:
            self.recorder.pids = cluster_pids(self.postmaster)  # backends started since
            calls = self.recorder.stop()
        if calls is not None and self.recorder is not None:
            inside = [c for c in calls if window[0] <= c.time <= window[1]
                      and c.pid not in self.own]
            syncs = [c for c in inside if c.name in ("fsync", "fdatasync")]
            out["pg_fsyncs"] = len(syncs)
            out["pg_wal_fsyncs"] = sum(1 for c in syncs
                                       if "/pg_wal/" in (self.recorder.path(c) or ""))
            out["pg_answers"] = sum(1 for c in inside if c.name == "sendto")
        self.conn.close()
        return out


def placements(kind: str) -> tuple[Placement, set[int] | None, str]:
    """The placement for the nodes (and, in ``split``, every server), the CPUs of the other
    servers (nginx, merchant, PostgreSQL), and what to say of it."""
    if kind == "none":
        p = split_cpus(False)
        return p, None, p.note
    p = split_cpus(True)
    if p.servers is None or kind == "split":
        return p, p.servers, p.note + " (nodes, nginx, merchant, PostgreSQL all there)"
    note = (f"pinned: nodes alone on CPU {_cpus(p.servers)}; nginx, merchant, PostgreSQL and "
            f"the load generator on CPU {_cpus(p.generator or set())}")
    return p, p.generator, note


def _cpus(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def _pin(pids: list[int], cpus: set[int] | None) -> None:
    if cpus is not None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.sched_setaffinity(pid, cpus)


def run_case(folder: Path, cluster: Any, nodes: int, psams: int, variant: str, seconds: float,
             clients: int, procs: int, placement: Placement, others: set[int] | None,
             warmup: float, method: str | None, rate: float = 0.0,
             profile: Path | None = None) -> tuple[Measured, dict[str, Any]]:
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
        _pin([n.pid for n in running], placement.servers)
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
             str(merchant_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_up(f"http://127.0.0.1:{merchant_port}/v1/catalogue")
        assert nginx.proc is not None
        servers = {n.spec.name: n.pid for n in running}
        servers.update({"nginx": nginx.proc.pid, "merchant": merchant.pid})
        for i, pid in enumerate(_children(nginx.proc.pid)):   # its worker
            servers[f"nginx-worker{i + 1}"] = pid
        _pin([merchant.pid, *(v for k, v in servers.items() if k.startswith("nginx")),
              *cluster_pids(cluster.proc.pid)], others)
        checkout = f"http://127.0.0.1:{merchant_port}/v1/checkout/song?variant={variant}"
        per = max(1, clients // procs)
        with journal_folder() as journals, LockSampler(db_url) as locks:
            pg = PgMeter(cluster, db_url, locks, method)
            m = measure(worker, [(1000 + i * per, per, checkout, seconds, journals,
                                  str(case / "terminal.pem")) for i in range(procs)],
                        servers, placement, seconds, method=method, warmup=warmup,
                        profile_dir=profile / f"{nodes}nodes-{variant}" if profile else None,
                        on_window=pg, journal_names={
                            n.spec.name: "PSAM journals" for n in running},
                        interval=clients / rate if rate else 0.0)
            extra = pg.result(m.window)
        extra.update(lock_share=locks.waiting / max(1, locks.samples), lock_most=locks.most)
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
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _held(nodes: list[Any]) -> int:
    import httpx

    total = 0
    for n in nodes:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            total += int(httpx.get(n.url + "/v1/health", timeout=2).json().get("psams", 0))
    return total


def node_cpu(m: Measured) -> float:
    """The nodes' CPU ms per purchase, summed over the nodes."""
    return sum(v for k, v in m.server_cpu.items() if k.startswith("node")) / (
        m.summary["done"] or 1) * 1000


def line(nodes: int, variant: str, clients: int, psams: int, m: Measured,
         extra: dict[str, Any]) -> str:
    r = m.summary
    done = r["done"] or 1
    names = [k for k in m.stats if k.startswith("node")]
    both = sum((m.stats[k] for k in names[1:]), m.stats[names[0]])
    nginx_ms = sum(v for k, v in m.server_cpu.items() if k.startswith("nginx")) / done * 1000

    def per(value: Any, fmt: str = ".2f") -> str:
        return "n/a" if value is None else f"{value / done:{fmt}}"

    node_fs = [m.fsync_split.get(k, {}) for k in names]
    fs_db = sum(f.get("database", 0) for f in node_fs)
    fs_j = sum(f.get("journal", 0) for f in node_fs)
    fs_all = sum(c or 0 for k, c in m.fsyncs.items() if k.startswith("node"))
    return (
        f"  {nodes} node(s) {variant}, {clients} cards, {psams} PSAMs: {r['rate']:7.1f} "
        f"purchases/s  p50 {r['p50']:6.1f} ms  p99 {r['p99']:6.1f} ms  ({r['refused']:.0f} "
        f"refused, {m.busy} busy answers waited out; load average {os.getloadavg()[0]:.1f})\n"
        f"      CPU ms/purchase: nodes {node_cpu(m):.2f} (" + ", ".join(
            f"{k} {m.per_txn(v):.2f}" for k, v in m.server_cpu.items() if k.startswith("node"))
        + f"), nginx {nginx_ms:.2f}, merchant {m.per_txn(m.server_cpu['merchant']):.2f}, "
        f"PostgreSQL {extra['pg_cpu'] / done * 1000:.2f}; generator "
        f"{m.per_txn(m.generator_cpu):.2f}\n"
        f"      nodes per purchase: user {both.user / done * 1000:.2f} + system "
        f"{both.system / done * 1000:.2f} CPU ms, context switches {both.voluntary / done:.1f}"
        f" voluntary, {both.involuntary / done:.1f} involuntary\n"
        + m.stats_line("purchase", [k for k in m.stats if k != "nginx"]) + "\n"
        f"      fsyncs/purchase ({m.fsync_method or 'not counted'}): nodes "
        + (f"{fs_all / done:.2f} (database {fs_db / done:.2f}, PSAM journals "
           f"{fs_j / done:.2f})" if m.fsync_split else "n/a")
        + f", merchant {m.fsync_text('merchant')}, PostgreSQL {per(extra['pg_fsyncs'])} "
        f"(WAL files {per(extra.get('pg_wal_fsyncs'))}; pg_stat_wal wal_sync "
        f"{per(extra['wal_stat'])})\n"
        f"      DB per purchase: {extra['xacts'] / done:.2f} transactions, "
        f"{per(extra['pg_answers'])} backend answers (round trips), "
        f"{extra['writes'] / done:.2f} rows written (lease renewals included);"
        f" lock waits in {extra['lock_share']:.1%} of samples, at most "
        f"{extra['lock_most']} at once; {extra['deadlocks']} deadlocks")


def machines_line(m: Measured, extra: dict[str, Any]) -> str:
    """What N nodes would give on N machines, from the 1-node case's CPU per purchase."""
    done = m.summary["done"] or 1
    node = node_cpu(m)
    pg = extra["pg_cpu"] / done * 1000
    nginx = sum(v for k, v in m.server_cpu.items() if k.startswith("nginx")) / done * 1000
    if not node:
        return "  on N machines: no purchase measured"
    per_node = 1000 / node
    limit = min((1000 / pg, "PostgreSQL") if pg else (float("inf"), ""),
                (1000 / nginx, "nginx") if nginx else (float("inf"), ""))
    return (f"  on N machines: one node on a CPU of its own would serve about {per_node:.0f} "
            f"purchases/s (1000 / {node:.2f} node CPU ms), so N nodes about N x {per_node:.0f}"
            f" until {limit[1]} fills a CPU at {limit[0]:.0f}/s per core (N about "
            f"{limit[0] / per_node:.1f} per {limit[1]} core). Assumed: the 1-node CPU per "
            f"purchase holds on each machine (3-node figures above say whether it does); "
            f"PostgreSQL, nginx and the merchant on machines of their own; the network adds "
            f"latency, not CPU")


def main() -> int:
    from pg_env import start_cluster

    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=4.0,
                        help="seconds of load before each measured window (not counted)")
    parser.add_argument("--clients-per-node", type=int, default=4,
                        help="cards per node: 1 node K cards against 3 nodes 3K (default)")
    parser.add_argument("--psams-per-node", type=int, default=2,
                        help="PSAMs per node in the equal-load mode")
    parser.add_argument("--clients", type=int, default=0,
                        help="fixed-total mode: this many cards for 1 node and for 3")
    parser.add_argument("--psams", type=int, default=0,
                        help="fixed-total mode: PSAMs shared by the nodes (default 6)")
    parser.add_argument("--procs", type=int, default=0)
    parser.add_argument("--variants", default="fig6,fig7")
    parser.add_argument("--placement", choices=("split", "nodes-alone", "none"),
                        default="split")
    parser.add_argument("--no-pin", action="store_true", help="as --placement none")
    parser.add_argument("--rate-per-node", type=float, default=0.0,
                        help="offer this many purchases/s per node (paced cards) instead of "
                             "as many as the nodes answer")
    parser.add_argument("--profile", type=Path,
                        help="py-spy each server (nodes, merchant, nginx) into this folder")
    parser.add_argument("--repeat", type=int, default=1,
                        help="pairs (1 node, then 3) per variant; the median ratio is printed")
    parser.add_argument("--smoke", action="store_true", help="a short run, for CI")
    args = parser.parse_args()
    seconds = 1.0 if args.smoke else args.seconds
    warmup = min(args.warmup, 0.5) if args.smoke else args.warmup
    variants = ("fig7",) if args.smoke else tuple(args.variants.split(","))
    fixed = bool(args.clients or args.psams)
    if args.smoke:
        fixed, total_clients, total_psams = True, 4, 3
    else:
        total_clients, total_psams = args.clients or 12, args.psams or 6

    def load(nodes: int) -> tuple[int, int]:
        if fixed:
            return total_clients, total_psams
        return args.clients_per_node * nodes, args.psams_per_node * nodes

    placement, others, note = placements("none" if args.no_pin else args.placement)
    procs = args.procs or len(placement.generator or ()) or 2
    method = fsync_method()
    mode = (f"fixed total: {total_clients} cards, {total_psams} PSAMs for 1 node and for 3"
            if fixed else f"equal load per node: {args.clients_per_node} cards and "
            f"{args.psams_per_node} PSAMs per node")
    print("svcard payment nodes benchmark" + (" (smoke run: figures not meaningful)"
                                              if args.smoke else ""))
    if args.rate_per_node:
        mode += f"; offered {args.rate_per_node:g} purchases/s per node (paced cards)"
    print(f"  {note}; {mode}; {procs} generator process(es); {warmup:g} s warm-up then "
          f"{seconds:g} s measured; one PostgreSQL (fsync on); nginx in front; fsyncs counted "
          f"by {method or 'nothing'}; load average before: {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs", flush=True)
    cluster = start_cluster()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for variant in variants:
                ratios, ones = [], []
                for _ in range(max(1, args.repeat)):   # 1 node then 3, paired, alternated
                    pair = {}
                    for nodes in (1, 3):
                        clients, psams = load(nodes)
                        m, extra = run_case(Path(tmp), cluster, nodes, psams, variant,
                                            seconds, clients, procs, placement, others,
                                            warmup, method, args.rate_per_node * nodes,
                                            args.profile)
                        print(line(nodes, variant, clients, psams, m, extra), flush=True)
                        pair[nodes] = node_cpu(m)
                        if nodes == 1:
                            ones.append((pair[1], m, extra))
                    ratios.append(pair[3] / pair[1] if pair[1] else float("nan"))
                    print(f"  {variant}: nodes' CPU per purchase, 3 nodes / 1 node = "
                          f"{ratios[-1]:.2f} (goal <= 1.15)", flush=True)
                if len(ratios) > 1:
                    print(f"  {variant}: median of {len(ratios)} pairs 3 nodes / 1 node = "
                          f"{statistics.median(ratios):.2f} (each: " + ", ".join(
                              f"{r:.2f}" for r in ratios) + ")")
                ones.sort(key=lambda one: one[0])
                print(machines_line(*ones[len(ones) // 2][1:]), flush=True)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
