"""The benchmarks' meters that say where the cost is (issue 16): fsyncs split by the file they
make durable, user/system CPU and context switches per process, the warm-up that runs on
into the measured window, the spread of repeated runs, and the nodes benchmark's placements
and its "on N machines" estimate."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str) -> ModuleType:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


LG = _load("loadgen")

SCRIPT = """\
   4242/4242  48304.865143:     syscalls:sys_enter_fdatasync: fd: 0x00000007
   4242/4250  48304.865364:         syscalls:sys_enter_fsync: fd: 0x0000000c
   4242/4250  48304.865411:        syscalls:sys_enter_sendto: fd: 0x00000006, buff: 0x56, len: 0x42
some warning perf printed
   4300/4300  48305.000001:         syscalls:sys_enter_fsync: fd: 0x00000003
"""


def test_perf_script_lines_are_parsed_whatever_the_padding() -> None:
    calls = LG.parse_perf_script(SCRIPT)
    assert [(c.pid, c.tid, c.name, c.fd) for c in calls] == [
        (4242, 4242, "fdatasync", 7), (4242, 4250, "fsync", 12), (4242, 4250, "sendto", 6),
        (4300, 4300, "fsync", 3)]
    assert calls[0].time == pytest.approx(48304.865143)


def test_fsynced_files_are_told_apart(tmp_path: Path) -> None:
    kind = LG.fsync_kind
    assert kind("/x/case/psams/psam-1.json.journal") == "journal"
    assert kind("/x/payments.db") == kind("/x/payments.db-wal") == "database"
    assert kind("/x/payments.db-journal") == "database"  # SQLite's, not a card's .journal
    assert kind("/x/psam-1.json") == kind("/x/.psam-1.json.77.tmp") == "image"
    assert kind(str(tmp_path)) == "folder"
    assert kind(None) == kind("socket:[1234]") == "other"


class _Named:
    def __init__(self, fds: dict[int, dict[int, str]]) -> None:
        self.fds = fds

    def path(self, call: Any) -> str | None:
        return self.fds.get(call.pid, {}).get(call.fd)


def test_fsyncs_are_split_per_server_inside_the_window_only() -> None:
    S = LG.Syscall
    calls = [S(10, 10, 1.0, "fdatasync", 3), S(10, 11, 2.0, "fdatasync", 3),
             S(10, 11, 2.5, "fsync", 4), S(10, 12, 2.6, "fsync", 9),
             S(20, 20, 2.0, "fsync", 5), S(20, 20, 2.1, "sendto", 5),
             S(30, 30, 2.0, "fsync", 5), S(10, 10, 9.0, "fsync", 4)]
    named = _Named({10: {3: "/c/psam-1.json.journal", 4: "/c/payments.db-wal"},
                    20: {5: "/c/merchant.db"}})
    split = LG.split_fsyncs(calls, named, {"payment": 10, "merchant": 20}, (1.5, 3.0))
    assert split == {"payment": {"journal": 1, "database": 1, "other": 1},
                     "merchant": {"database": 1}}


def _measured(**kw: Any) -> Any:
    base: dict[str, Any] = dict(
        summary={"done": 100, "rate": 50.0, "p50": 1.0, "p99": 2.0, "trips": 2, "refused": 0},
        wall=2.0, server_cpu={"payment": 0.2, "merchant": 0.1},
        fsyncs={"payment": 179, "merchant": 40}, fsync_method="perf", generator_cpu=0.1,
        generator_procs=1, placement=LG.Placement({0}, {1}, "pinned"),
        fsync_split={"payment": {"database": 79, "journal": 100},
                     "merchant": {"database": 40}},
        stats={"payment": LG.ProcStats(0.15, 0.05, 1200, 300)},
        journal_names={"payment": "PSAM journals"})
    base.update(kw)
    return LG.Measured(**base)


def test_the_report_says_whose_fsyncs_they_are() -> None:
    m = _measured()
    assert m.fsync_text("payment") == "1.79 (database 0.79, PSAM journals 1.00)"
    assert m.fsync_text("merchant") == "0.40 (database 0.40)"
    lines = m.cost_lines("purchase")
    assert "payment 1.79 (database 0.79, PSAM journals 1.00)" in lines[1]
    assert "payment 1.50+0.50 ms 12.0v/3.0i" in lines[3]
    # counted without a split (strace): the bare figure, as before
    bare = _measured(fsync_split={}, fsyncs={"payment": 179, "merchant": None})
    assert bare.fsync_text("payment") == "1.79" and bare.fsync_text("merchant") == "n/a"


CHILD = """
import os, sys, time
folder, go = sys.argv[1], sys.argv[2]
journal = os.open(os.path.join(folder, "psam-1.json.journal"), os.O_RDWR | os.O_CREAT)
db = os.open(os.path.join(folder, "payments.db"), os.O_RDWR | os.O_CREAT)
deadline = time.monotonic() + 30
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.01)
for _ in range(3):
    os.fdatasync(journal)
os.fsync(db)
tmp = os.open(os.path.join(folder, ".psam-1.json.1.tmp"), os.O_RDWR | os.O_CREAT)
os.fsync(tmp)
os.close(tmp)
print("done", flush=True)
time.sleep(30)
"""


def test_a_recorded_process_has_its_fsyncs_named(tmp_path: Path) -> None:
    if LG.fsync_method() != "perf":
        pytest.skip("perf cannot trace syscalls here")
    go = tmp_path / "go"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(go)],
                             stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "payments.db").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        recorder = LG.SyscallRecorder([child.pid])
        begin = time.monotonic()
        go.write_bytes(b"x")
        assert child.stdout is not None and child.stdout.readline() == "done\n"
        calls = recorder.stop()
        assert calls is not None
        split = LG.split_fsyncs(calls, recorder, {"payment": child.pid},
                                (begin, time.monotonic()))
        # the temp file was closed before it could be named: "other", not lost
        assert split == {"payment": {"journal": 3, "database": 1, "other": 1}}
    finally:
        child.kill()
        child.wait()


def test_proc_stats_sum_every_thread() -> None:
    before = LG.proc_stats(os.getpid())
    napped = threading.Barrier(3)
    leave = threading.Event()

    def nap() -> None:
        for _ in range(50):
            time.sleep(0.001)  # each sleep blocks: a voluntary switch
        napped.wait(timeout=60)
        leave.wait(timeout=60)  # alive while read: an ended thread's switches leave /proc

    threads = [threading.Thread(target=nap) for _ in range(2)]
    for t in threads:
        t.start()
    cpu0 = time.process_time()
    while time.process_time() - cpu0 < 0.2:
        pass
    napped.wait(timeout=60)
    used = LG.proc_stats(os.getpid()) - before
    leave.set()
    for t in threads:
        t.join()
    assert used.user + used.system >= 0.15
    assert used.voluntary >= 100   # both threads' sleeps, not only the main thread's
    total = used + LG.ProcStats(1.0, 1.0, 1, 1)
    assert total.voluntary == used.voluntary + 1 and total.user == used.user + 1.0


def test_the_warm_up_runs_into_the_window_uncounted(tmp_path: Path) -> None:
    starts: list[float] = []
    lock = threading.Lock()

    def step(serial: int, reader: Any, journal: Any, http: Any) -> tuple[bool, int]:
        with lock:
            starts.append(time.monotonic())
        time.sleep(0.01)
        return True, 2

    began = time.monotonic()
    run = LG.run_cards(10, 2, 0.3, str(tmp_path), step, LG.Start(threading.Barrier(1), 0.4))
    warm = [t for t in starts[2:] if t < began + 0.4 - 0.05]
    assert len(warm) >= 10   # the load ran through the warm-up ...
    assert 0 < len(run.results) <= len(starts) - 2 - len(warm)  # ... and none of it counted
    assert 0.3 <= run.wall < 0.6  # the window alone, not the warm-up


def test_repeated_runs_give_the_median_and_the_spread() -> None:
    BP = _load("bench_payment")
    runs = [_measured(server_cpu={"payment": cpu, "merchant": 0.1},
                      summary={"done": 100, "rate": rate, "p50": 1.0, "p99": 2.0, "trips": 2,
                               "refused": 0})
            for cpu, rate in ((0.2, 50.0), (0.25, 40.0), (0.22, 45.0))]
    text = BP.spread_line(runs)
    assert "median of 3 runs: 45.0 (40.0-50.0, spread 22%) purchases/s" in text
    assert "payment 2.20 (2.00-2.50, spread 23%) CPU ms/purchase" in text
    assert "1.79 (1.79-1.79, spread 0%) fsyncs/purchase" in text


def test_nodes_placements_and_the_n_machines_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    BN = _load("bench_nodes")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    placement, others, note = BN.placements("nodes-alone")
    assert (placement.servers, placement.generator, others) == ({0}, {1}, {1})
    assert "nodes alone on CPU 0" in note
    placement, others, _ = BN.placements("split")
    assert (placement.servers, others) == ({0}, {0})
    placement, others, _ = BN.placements("none")
    assert placement.servers is None and others is None
    m = _measured(server_cpu={"node1": 0.25, "nginx": 0.02, "nginx-worker1": 0.03,
                              "merchant": 0.1})
    assert BN.node_cpu(m) == pytest.approx(2.5)
    text = BN.machines_line(m, {"pg_cpu": 0.1})
    assert "about 400 purchases/s (1000 / 2.50 node CPU ms)" in text
    assert "until PostgreSQL fills a CPU at 1000/s per core (N about 2.5" in text


def test_paced_cards_offer_a_rate_not_as_fast_as_answered(tmp_path: Path) -> None:
    def step(serial: int, reader: Any, journal: Any, http: Any) -> tuple[bool, int]:
        return True, 1   # answers at once: unpaced, a card would do thousands

    run = LG.run_cards(10, 2, 0.5, str(tmp_path), step,
                       LG.Start(threading.Barrier(1), 0.0, interval=0.05))
    assert 14 <= len(run.results) <= 22   # 2 cards x 0.5 s / 0.05 s = 20
