"""The load generator the HTTP benchmarks share, and what they measure beside it.

The generator. Each generator process runs many cards at once, one thread per card, each card
an in-memory virtual card (no image file, so no image fsync) running the real client flow
(``svcard.host.pay.client.pay``, ``svcard.host.load.client.load``) in a loop. Two things make
it cheap. Its HTTP client, :class:`Http`, is a small HTTP/1.1 client on plain blocking sockets
with one keep-alive connection per card and server: about 20 us of CPU per request, where
httpx costs ~350 us (``httpx.Client``) to 500-1,200 us (``httpx.AsyncClient``, measured on the
benchmark machine). Its client journal, :class:`BenchJournal`, appends each step's line to a
file in tmpfs (``/dev/shm``) and never fsyncs (the secret fields are dropped, not kept).

What a benchmark reports, beside the rate and latency, is read while the load runs: each
server process's CPU time (``/proc/PID/stat``: user + system, all threads), its fsync and
fdatasync calls (:class:`FsyncCounter`: ``perf stat`` on the syscall tracepoints, which costs
the process nothing, else ``strace -c -f``, which slows it), and the generator's own CPU, all
per completed transaction, so a reader sees which side is the limit. On a machine with 2 or
more CPUs the servers and the generator are pinned to different CPUs (:func:`split_cpus`).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from svcard.card.image import card_from_image
from svcard.card.personalise import image_from_profile
from svcard.fixtures import fixture_path
from svcard.host.terminal.journal import Journal, split_secrets
from svcard.host.terminal.online import MIN_WAIT, RETRY_KEY, retry_after
from svcard.host.terminal.purse import TerminalError
from svcard.reader import Reader, VirtualReader

Result = tuple[float, int, bool]  # seconds, round trips, done
# one transaction: (serial, card, journal, http) -> (done, round trips)
Step = Callable[[int, Reader, Journal, "Http"], tuple[bool, int]]
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Http:
    """A minimal HTTP/1.1 client for one card (one thread): one keep-alive connection per
    server, requests in one ``sendall``, answers read by ``Content-Length`` or chunked. It has
    the ``post``/``get`` the client flows call on an ``httpx.Client`` and answers with
    ``httpx.Response`` objects, so those flows run unchanged. A busy answer (503) to a request
    the flow marks retry-safe is asked again as ``svcard pay`` does (waiting its Retry-After,
    at least ``MIN_WAIT``, else a backoff; for up to ``retry_for`` seconds), and counted in
    :attr:`busy`."""

    def __init__(self, timeout: float = 60.0, retry_for: float = 30.0) -> None:
        self.timeout = timeout
        self.retry_for = retry_for
        self.busy = 0
        self._conns: dict[tuple[str, int], tuple[socket.socket, Any]] = {}

    def _connect(self, host: str, port: int) -> tuple[socket.socket, Any]:
        sock = socket.create_connection((host, port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = (sock, sock.makefile("rb"))
        self._conns[(host, port)] = conn
        return conn

    def _drop(self, key: tuple[str, int]) -> None:
        conn = self._conns.pop(key, None)
        if conn is not None:
            conn[1].close()
            conn[0].close()

    def request(self, method: str, url: str, body: bytes = b"",
                headers: dict[str, str] | None = None, retry: bool = False) -> httpx.Response:
        """One request; ``retry``: a 503 is asked again (see the class)."""
        deadline = time.monotonic() + self.retry_for
        tries = 0
        while True:
            response = self._once(method, url, body, headers)
            left = deadline - time.monotonic()
            if response.status_code != 503 or not retry or left <= 0:
                return response
            self.busy += 1
            asked = retry_after(response)
            tries += 1
            wait = asked if asked is not None else min(4.0, 0.25 * 2 ** (tries - 1))
            time.sleep(min(max(MIN_WAIT, wait), left))

    def _once(self, method: str, url: str, body: bytes,
              headers: dict[str, str] | None) -> httpx.Response:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}",
                f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        key = (host, port)
        for attempt in (0, 1):
            reused = key in self._conns
            sock, rfile = self._conns[key] if reused else self._connect(host, port)
            try:
                sock.sendall(data)
                status_line = rfile.readline(65537)
                if not status_line:
                    raise ConnectionResetError("closed before answering")
            except OSError:
                self._drop(key)
                if reused and attempt == 0:  # an idle keep-alive connection the server closed
                    continue
                raise
            break
        status = int(status_line.split(b" ", 2)[1])
        fields: list[tuple[str, str]] = []
        while True:
            line = rfile.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            fields.append((name.strip(), value.strip()))
        lower = {k.lower(): v.lower() for k, v in fields}
        if "content-length" in lower:
            content = rfile.read(int(lower["content-length"]))
        elif lower.get("transfer-encoding") == "chunked":
            chunks = []
            while size := int(rfile.readline().split(b";")[0], 16):
                chunks.append(rfile.read(size))
                rfile.readline()
            while rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            content = b"".join(chunks)
        elif status in (204, 304) or status < 200 or method == "HEAD":
            content = b""
        else:
            content = rfile.read()
            lower["connection"] = "close"
        if lower.get("connection") == "close":
            self._drop(key)
        return httpx.Response(status, headers=fields, content=content,
                              request=httpx.Request(method, url))

    def post(self, url: str, *, content: bytes | None = None, json: Any = None,
             headers: dict[str, str] | None = None, extensions: Any = None) -> httpx.Response:
        hdrs = dict(headers or {})
        if json is not None:
            content = _json_bytes(json)
            hdrs.setdefault("Content-Type", "application/json")
        return self.request("POST", url, content or b"", hdrs, _retry_safe(extensions))

    def get(self, url: str, *, headers: dict[str, str] | None = None,
            extensions: Any = None) -> httpx.Response:
        return self.request("GET", url, b"", headers, _retry_safe(extensions))

    @contextlib.contextmanager
    def stream(self, method: str, url: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """``httpx.Client.stream`` as the flows call it (the checkout is read capped): the
        answer is read whole here, as every answer of this client is, then handed over."""
        if method == "POST":
            yield self.post(url, **kwargs)
        elif method == "GET":
            yield self.get(url, **kwargs)
        else:
            raise ValueError(f"no {method} in this client")

    def close(self) -> None:
        for key in list(self._conns):
            self._drop(key)

    def __enter__(self) -> Http:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _retry_safe(extensions: Any) -> bool:
    return bool(extensions and extensions.get(RETRY_KEY))


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class BenchJournal(Journal):
    """The client journal of a benchmark card: each step's line (its secret fields dropped)
    appended to its file, in tmpfs when there is one, with no lock and no fsync. Only the
    write path the client flows take is cheap; reading it back works as for any journal."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._file = path.open("ab", buffering=0)

    def write(self, txn_id: str, state: str, **data: Any) -> None:
        public, _ = split_secrets({"txn_id": txn_id, "state": state, **data})
        self._file.write(_json_bytes(public) + b"\n")

    def close(self) -> None:
        self._file.close()


@contextlib.contextmanager
def journal_folder() -> Iterator[str]:
    """A new folder for the client journals, in tmpfs (``/dev/shm``) when there is one, removed
    afterwards (tmpfs is memory)."""
    folder = tempfile.mkdtemp(prefix="svcard-bench-",
                              dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class GeneratorRun:
    results: list[Result]
    cpu: float       # the generator process's CPU seconds over the measured window
    wall: float
    busy: int = 0    # busy answers (503) waited out and asked again


class Start:
    """What the generator processes and the parent meet at: a barrier (passed twice: ready,
    then go) and the warm-up, the seconds of load between go and the measured window (the
    load runs on without a pause into the window, so every server is busy when it begins)."""

    def __init__(self, barrier: Any, warmup: float = 0.0, interval: float = 0.0) -> None:
        self.barrier = barrier
        self.warmup = warmup
        self.interval = interval  # > 0: each card begins a transaction at most this often

    def wait(self, timeout: float | None = None) -> int:
        return int(self.barrier.wait(timeout=timeout))

    def abort(self) -> None:
        self.barrier.abort()


def run_cards(first_serial: int, cards: int, seconds: float, journal_dir: str, step: Step,
              start: Any = None, **profile: Any) -> GeneratorRun:
    """``cards`` in-memory cards (serials from ``first_serial``, the demo profile with
    ``profile`` overrides; keys diversified for each serial), one thread each, running ``step``
    for ``seconds``. Each card does one transaction first (not counted); then the generators
    and the parent meet twice at ``start`` (a barrier or a :class:`Start`; None: no parent),
    ready, then go; after ``start.warmup`` seconds of load (0: none), not counted, the measured
    window begins. Only transactions begun inside the window count. A refusal counts as not
    done."""
    results: list[Result] = []
    busy = [0]
    lock = threading.Lock()
    warmed = threading.Barrier(cards + 1)
    go = threading.Event()
    end = [0.0]
    window = [0.0]
    warmup = float(getattr(start, "warmup", 0.0) or 0.0)
    interval = float(getattr(start, "interval", 0.0) or 0.0)

    def run(serial: int) -> None:
        try:
            card(serial)
        except BaseException:
            warmed.abort()  # the parent hears of it at once, not after the barrier's timeout
            raise

    def card(serial: int) -> None:
        image = image_from_profile(fixture_path("iep-demo.toml"), app_serial=f"{serial:020d}",
                                   **profile)
        reader = VirtualReader(card_from_image(image))
        reader.connect()
        journal = BenchJournal(Path(journal_dir) / f"j{serial}.jsonl")
        with Http() as http:
            with contextlib.suppress(TerminalError):
                step(serial, reader, journal, http)  # warm up: connections, caches
            warmed.wait()
            go.wait()
            mine: list[Result] = []
            waited = 0
            due = time.monotonic()
            while (now := time.monotonic()) < end[0]:
                if interval:  # paced: an open-loop rate, not as fast as the servers answer
                    due += interval
                    if due > now:
                        time.sleep(due - now)
                        now = time.monotonic()
                        if now >= end[0]:
                            break
                    else:
                        due = now
                counted = now >= window[0]
                busy0 = http.busy
                started = time.perf_counter()
                try:
                    done, trips = step(serial, reader, journal, http)
                except (TerminalError, OSError) as exc:  # a refusal; a dropped connection
                    if os.environ.get("SVCARD_BENCH_DEBUG"):
                        print(f"card {serial}: {exc}", file=sys.stderr)
                    done, trips = False, 0
                if counted:
                    mine.append((time.perf_counter() - started, trips, done))
                    waited += http.busy - busy0
            with lock:
                results.extend(mine)
                busy[0] += waited
        journal.close()

    pool = [threading.Thread(target=run, args=(first_serial + i,), daemon=True)
            for i in range(cards)]
    for t in pool:
        t.start()
    try:
        warmed.wait(timeout=120)
    except threading.BrokenBarrierError:
        for t in pool:  # every card stops at the broken barrier
            t.join(timeout=30)
        raise
    if start is not None:
        start.wait(timeout=180)  # every generator is ready
        start.wait(timeout=180)  # the parent has begun measuring
    window[0] = time.monotonic() + warmup
    end[0] = window[0] + seconds
    go.set()
    _sleep_until(window[0])
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for t in pool:
        t.join()
    return GeneratorRun(results, time.process_time() - cpu0, time.perf_counter() - wall0,
                        busy[0])


def _sleep_until(moment: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``moment`` (at once if it has)."""
    while (left := moment - time.monotonic()) > 0:
        time.sleep(left)


def summarize(results: list[Result], seconds: float) -> dict[str, float]:
    """Rate of done transactions, p50/p99 latency (ms), mean round trips, refusals."""
    good = [r for r in results if r[2]]
    lat = sorted(r[0] for r in good) or [0.0]
    return {"rate": len(good) / seconds if seconds else 0.0, "done": len(good),
            "p50": statistics.median(lat) * 1000,
            "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
            "trips": statistics.mean(r[1] for r in good) if good else 0,
            "refused": len(results) - len(good)}


# --- what the servers spend ----------------------------------------------------------------

def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread, living or ended) a process has used."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    rest = stat[stat.rindex(")") + 2:].split()  # the name may hold spaces: cut after it
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


@dataclass(frozen=True)
class ProcStats:
    """What a process has used: user and system CPU seconds (every thread, living or ended)
    and voluntary and involuntary context switches (summed over its living threads: the
    kernel keeps no count of an ended thread's in ``/proc``). A voluntary switch is a thread
    that blocked (I/O, a lock, a wait); an involuntary one was preempted, e.g. by another
    process wanting the same CPU."""

    user: float = 0.0
    system: float = 0.0
    voluntary: int = 0
    involuntary: int = 0

    def __add__(self, other: ProcStats) -> ProcStats:
        return ProcStats(self.user + other.user, self.system + other.system,
                         self.voluntary + other.voluntary, self.involuntary + other.involuntary)

    def __sub__(self, other: ProcStats) -> ProcStats:
        return ProcStats(self.user - other.user, self.system - other.system,
                         self.voluntary - other.voluntary, self.involuntary - other.involuntary)


def proc_stats(pid: int) -> ProcStats:
    """:class:`ProcStats` of a process now, from ``/proc/PID/stat`` and each
    ``/proc/PID/task/TID/status`` (a thread that ends while they are read is left out)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    rest = stat[stat.rindex(")") + 2:].split()
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    involuntary += int(line.split()[1])
    return ProcStats(int(rest[11]) / CLK_TCK, int(rest[12]) / CLK_TCK, voluntary, involuntary)


def cpu_busy() -> dict[int, tuple[int, int]]:
    """Per CPU, (busy, total) clock ticks since boot, from ``/proc/stat`` (busy: everything
    but idle and I/O wait), to see how busy a CPU was with every process on it."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *ticks = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            values = [int(t) for t in ticks[:8]]
            out[int(name[3:])] = (sum(values) - values[3] - values[4], sum(values))
    return out


def busy_share(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
               cpus: set[int] | None) -> float:
    """How busy ``cpus`` (None: all) were between two :func:`cpu_busy` readings, 0..1."""
    chosen = [c for c in after if c in before and (cpus is None or c in cpus)]
    busy = sum(after[c][0] - before[c][0] for c in chosen)
    total = sum(after[c][1] - before[c][1] for c in chosen)
    return busy / total if total else 0.0


def http_parser() -> str:
    """The HTTP parser uvicorn picks in the servers: httptools (C) when installed, else h11
    (pure Python, about 100 us more server CPU per request here)."""
    import importlib.util

    return "httptools" if importlib.util.find_spec("httptools") else "h11 (httptools absent)"


def fsync_method() -> str | None:
    """How fsyncs can be counted here: "perf" (syscall tracepoints, no cost to the process),
    "strace" (``strace -c -f``: every syscall of the process stops it, so slower), or None.
    ``SVCARD_BENCH_FSYNC=perf|strace|none`` chooses."""
    forced = os.environ.get("SVCARD_BENCH_FSYNC")
    if forced:
        return None if forced == "none" else forced
    if shutil.which("perf"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run(["perf", "stat", "-x,", "-e", "syscalls:sys_enter_fsync", "--",
                               "true"], capture_output=True, timeout=30).returncode == 0:
                return "perf"
    if shutil.which("strace"):
        return "strace"
    return None


class FsyncCounter:
    """fsync + fdatasync calls made by the process ``pid`` (all its threads, also those it
    starts later) from now until :meth:`stop`, counted by ``method`` (see
    :func:`fsync_method`)."""

    def __init__(self, pid: int, method: str | None) -> None:
        self.method = method
        self.out = Path(tempfile.mkstemp(prefix="svcard-fsync-")[1])
        self.proc: subprocess.Popen[bytes] | None = None
        if method == "perf":
            cmd = ["perf", "stat", "-x,", "-o", str(self.out), "-e",
                   "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync", "-p", str(pid)]
        elif method == "strace":
            cmd = ["strace", "-c", "-f", "-e", "trace=fsync,fdatasync", "-o", str(self.out),
                   "-p", str(pid)]
        else:
            return
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3 if method == "strace" else 0.1)  # attached before the load starts

    def stop(self) -> int | None:
        """Stop counting: the count, or None if it could not be counted."""
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None
        text = self.out.read_text(errors="replace")
        self.out.unlink(missing_ok=True)
        return parse_fsync_count(text, self.method or "")


def parse_fsync_count(text: str, method: str) -> int | None:
    """The fsync + fdatasync count in ``perf stat -x,`` or ``strace -c`` output."""
    total, seen = 0, False
    for line in text.splitlines():
        if method == "perf":
            cells = line.split(",")
            if len(cells) > 2 and cells[2].startswith("syscalls:sys_enter_f"):
                if not cells[0].strip().isdigit():
                    return None  # <not counted> / <not supported>
                total, seen = total + int(cells[0]), True
        else:
            cells = line.split()
            if cells and cells[-1] in ("fsync", "fdatasync") and len(cells) >= 5:
                total, seen = total + int(cells[3]), True
    return total if seen or method == "strace" else None


@dataclass(frozen=True)
class Syscall:
    """One traced system call: process, thread, when (``time.monotonic()`` seconds), the
    tracepoint's name (``fsync``, ``fdatasync``, ``sendto``) and its file descriptor."""

    pid: int
    tid: int
    time: float
    name: str
    fd: int


def parse_perf_script(text: str) -> list[Syscall]:
    """The calls in ``perf script -F pid,tid,time,event,trace`` output of
    ``syscalls:sys_enter_*`` tracepoints (other lines are left out)."""
    calls = []
    for line in text.splitlines():
        got = _PERF_LINE.match(line)
        if got is not None:
            pid, tid, moment, name, fd = got.groups()
            calls.append(Syscall(int(pid), int(tid), float(moment), name, int(fd, 16)))
    return calls


# "  PID/TID  SECONDS.MICROS:   syscalls:sys_enter_NAME: fd: 0x00000007[, ...]" (perf pads
# the event name with spaces to a common width)
_PERF_LINE = re.compile(r"^\s*(\d+)/(\d+)\s+(\d+\.\d+):\s+syscalls:sys_enter_(\w+):"
                        r"\s+fd:\s+(0x[0-9a-fA-F]+)")


def fd_paths(pid: int) -> dict[int, str]:
    """What each open file descriptor of ``pid`` names now (``/proc/PID/fd``)."""
    out = {}
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
        for link in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                out[int(link.name)] = os.readlink(link)
    return out


FSYNC_KINDS = ("database", "journal", "image", "folder", "other")


def fsync_kind(path: str | None) -> str:
    """What an fsynced file is, by its name: "database" (SQLite's file, its WAL or rollback
    journal), "journal" (a card image's append-only ``.journal``: a PSAM's or an HSM's),
    "image" (a card image or the temp file it is rewritten through), "folder" (a directory,
    synced after a rename), "other" (a descriptor closed before it could be named)."""
    if path is None:
        return "other"
    name = path.rsplit("/", 1)[-1]
    if name.endswith(".journal"):
        return "journal"
    if name.endswith((".db", "-wal", "-journal", "-shm", ".sqlite", ".sqlite3")):
        return "database"
    if name.endswith((".json", ".tmp")):
        return "image"
    if path.startswith("/") and os.path.isdir(path):
        return "folder"
    return "other"


class SyscallRecorder:
    """``perf record`` of some system calls of some processes (and of the threads and
    children they start later), each call with its time on ``time.monotonic()``'s clock, so
    that only a window's calls are counted, and with its file descriptor, named from
    ``/proc/PID/fd`` when the recording starts and when it stops (a descriptor opened and
    closed between them, like a temp file's, stays unnamed). The traced processes pay only
    the tracepoint's cost (a few microseconds a call)."""

    EVENTS = ("fsync", "fdatasync")

    def __init__(self, pids: Sequence[int], events: Sequence[str] = EVENTS,
                 timeout: float = 30.0) -> None:
        self.pids = list(pids)
        self.folder = Path(tempfile.mkdtemp(prefix="svcard-perf-"))
        self.data = self.folder / "perf.data"
        self.fds = {pid: fd_paths(pid) for pid in self.pids}
        ctl, ack = self.folder / "ctl", self.folder / "ack"
        os.mkfifo(ctl)
        os.mkfifo(ack)
        # started disabled, then enabled through its control FIFO: its "ack" says it is
        # attached and counting (a fixed sleep is too short on a loaded machine)
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            ["perf", "record", "-q", "-D", "-1", "--control", f"fifo:{ctl},{ack}", "-k",
             "CLOCK_MONOTONIC", "-o", str(self.data), "-e",
             ",".join(f"syscalls:sys_enter_{e}" for e in events), "-p",
             ",".join(str(p) for p in self.pids)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ctl_fd, ack_fd = os.open(ctl, os.O_RDWR), os.open(ack, os.O_RDWR)  # never blocks
        try:
            os.write(ctl_fd, b"enable\n")
            ready, _, _ = select.select([ack_fd], [], [], timeout)
            self.attached = bool(ready) and os.read(ack_fd, 64).startswith(b"ack")
        finally:
            os.close(ctl_fd)
            os.close(ack_fd)

    def stop(self) -> list[Syscall] | None:
        """Stop recording: every call recorded, or None if the recording failed."""
        for pid in self.pids:  # named at the end: those opened after the start
            self.fds[pid] = {**self.fds.get(pid, {}), **fd_paths(pid)}
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        try:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
            script = subprocess.run(["perf", "script", "-i", str(self.data), "-F",
                                     "pid,tid,time,event,trace"], capture_output=True,
                                    timeout=300)
        except (OSError, subprocess.SubprocessError):
            proc.kill()
            return None
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
        if (not self.attached or proc.returncode not in (0, -signal.SIGINT, 130)
                or script.returncode != 0):
            return None
        return parse_perf_script(script.stdout.decode(errors="replace"))

    def path(self, call: Syscall) -> str | None:
        return self.fds.get(call.pid, {}).get(call.fd)


def split_fsyncs(calls: Sequence[Syscall], recorder: SyscallRecorder, pids: dict[str, int],
                 window: tuple[float, float]) -> dict[str, dict[str, int]]:
    """Per server (name -> pid), its fsync and fdatasync calls in ``window`` by
    :func:`fsync_kind` of the file (kinds with no call left out)."""
    names = {pid: name for name, pid in pids.items()}
    out: dict[str, dict[str, int]] = {name: {} for name in pids}
    for call in calls:
        if call.name not in ("fsync", "fdatasync") or not window[0] <= call.time <= window[1]:
            continue
        name = names.get(call.pid)
        if name is None:
            continue
        kind = fsync_kind(recorder.path(call))
        out[name][kind] = out[name].get(kind, 0) + 1
    return out


# --- where the processes run ---------------------------------------------------------------

@dataclass
class Placement:
    servers: set[int] | None
    generator: set[int] | None
    note: str

    def server_preexec(self) -> Callable[[], None] | None:
        cpus = self.servers
        if cpus is None:
            return None
        return lambda: os.sched_setaffinity(0, cpus)


def split_cpus(pin: bool = True) -> Placement:
    """On 2 or more CPUs (and ``pin``): the servers on the first half, the generator on the
    rest (2 CPUs: servers on one, generator on the other)."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        why = "not asked" if not pin else f"{len(cpus)} CPU"
        return Placement(None, None, f"not pinned ({why}): servers and generator share "
                                     f"{len(cpus)} CPU(s)")
    half = len(cpus) // 2
    servers, generator = set(cpus[:half]), set(cpus[half:])
    return Placement(servers, generator, f"pinned: servers on CPU {_cpus(servers)}, load "
                                         f"generator on CPU {_cpus(generator)}")


def _cpus(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def start_server(cmd: Sequence[str], placement: Placement) -> subprocess.Popen[bytes]:
    return subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=placement.server_preexec())


# --- one measured run ----------------------------------------------------------------------

@dataclass
class Measured:
    summary: dict[str, float]
    wall: float
    server_cpu: dict[str, float]            # CPU seconds over the window, per server
    fsyncs: dict[str, int | None]
    fsync_method: str | None
    generator_cpu: float
    generator_procs: int
    placement: Placement
    busy: int = 0
    cpu_share: tuple[float, float] = (0.0, 0.0)  # how busy the servers' and generator's CPUs were
    profiles: dict[str, Path] = field(default_factory=dict)
    # per server, its fsyncs in the window by kind of file (perf only; else empty)
    fsync_split: dict[str, dict[str, int]] = field(default_factory=dict)
    stats: dict[str, ProcStats] = field(default_factory=dict)  # per server, over the window
    window: tuple[float, float] = (0.0, 0.0)  # the measured window, time.monotonic() seconds
    journal_names: dict[str, str] = field(default_factory=dict)  # server -> "PSAM journals"

    def per_txn(self, seconds: float) -> float:
        done = self.summary["done"]
        return seconds / done * 1000 if done else float("nan")

    def fsync_text(self, name: str) -> str:
        """A server's fsyncs per transaction, split by file when they were recorded:
        ``1.79 (database 0.79, PSAM journals 1.00)``."""
        count = self.fsyncs.get(name)
        if count is None:
            return "n/a"
        done = self.summary["done"] or 1
        split = self.fsync_split.get(name)
        if not split:
            return f"{count / done:.2f}"
        labels = {"database": "database", "journal": self.journal_names.get(name, "journals"),
                  "image": "image rewrites", "folder": "folders",
                  "other": "unnamed (closed) files"}
        parts = [f"{labels[k]} {split[k] / done:.2f}" for k in FSYNC_KINDS if split.get(k)]
        return f"{count / done:.2f} ({', '.join(parts) or 'none'})"

    def stats_line(self, unit: str, names: Sequence[str] | None = None) -> str:
        """Per server: user and system CPU ms, voluntary and involuntary context switches,
        all per ``unit``."""
        done = self.summary["done"] or 1
        parts = []
        for name in names or list(self.stats):
            st = self.stats.get(name)
            if st is None:
                continue
            parts.append(f"{name} {st.user / done * 1000:.2f}+{st.system / done * 1000:.2f} ms"
                         f" {st.voluntary / done:.1f}v/{st.involuntary / done:.1f}i")
        return (f"      per {unit}, user+system CPU and context switches (voluntary/"
                f"involuntary): " + ", ".join(parts))

    def cost_lines(self, unit: str) -> list[str]:
        """Four lines: CPU ms and fsyncs per ``unit`` for each server, the generator's CPU,
        how busy each side's CPUs were, which side is the limit, and the CPU split into user
        and system time with the context switches."""
        cpu = ", ".join(f"{n} {self.per_txn(s):.2f} ({s / self.wall:.0%} of a CPU)"
                        for n, s in self.server_cpu.items())
        total = sum(self.server_cpu.values())
        fs = ", ".join(f"{n} {self.fsync_text(n)}" for n in self.fsyncs)
        gen_cpus = len(self.placement.generator or ()) or self.generator_procs
        srv_cpus = len(self.placement.servers or ()) or os.cpu_count() or 1
        srv_busy = total / self.wall / srv_cpus
        gen_busy = self.generator_cpu / self.wall / gen_cpus
        srv_all, gen_all = self.cpu_share
        limit = ("the servers" if srv_busy > gen_busy else "the load generator")
        if self.placement.servers is None:
            limit += " (not pinned: both share the CPUs)"
        elif max(srv_busy, gen_busy) >= 0.85:
            pass
        elif max(srv_all, gen_all) >= 0.85:
            where = ("both CPUs" if min(srv_all, gen_all) >= 0.85 else
                     "the servers' CPU" if srv_all > gen_all else "the generator's CPU")
            limit = f"CPU taken by other processes ({where} busy)"
        else:
            limit = "neither CPU (latency-bound: PSAM, fsync or lock waits)"
        lines = [
            f"      CPU ms/{unit}: {cpu}; servers {self.per_txn(total):.2f}",
            f"      fsyncs/{unit} ({self.fsync_method or 'not counted'}): {fs}; generator "
            f"{self.per_txn(self.generator_cpu):.2f} CPU ms/{unit} ({self.generator_procs} "
            f"proc)",
            f"      CPU busy: servers' {srv_busy:.0%} by the servers ({srv_all:.0%} by all "
            f"processes), generator's {gen_busy:.0%} ({gen_all:.0%}) -> limit: {limit}"]
        if self.stats:
            lines.append(self.stats_line(unit))
        return lines


def _generator_main(worker: Callable[..., GeneratorRun], args: Any, start: Any,
                    out: Any, cpus: set[int] | None) -> None:
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    try:
        out.put(worker(args, start))
    except BaseException as exc:  # the parent says what broke
        out.put(exc)
        with contextlib.suppress(Exception):
            start.abort()
        raise


def measure(worker: Callable[..., GeneratorRun], worker_args: list[Any],
            servers: dict[str, int], placement: Placement, seconds: float,
            profile_dir: Path | None = None, method: str | None = None, warmup: float = 0.0,
            on_window: Callable[[str], None] | None = None,
            journal_names: dict[str, str] | None = None, interval: float = 0.0) -> Measured:
    """Run one generator process per item of ``worker_args`` (``worker(args, start)`` returns
    its :class:`GeneratorRun`; it waits on ``start`` before its measured window) and measure
    the ``servers`` (name -> pid) over that window. ``warmup``: seconds of load, not counted,
    before the window (the load runs on into it). ``interval`` > 0: each card begins a
    transaction at most every ``interval`` seconds (an offered rate).
    ``on_window("start"|"stop")`` is called at the window's start and end (a caller's own
    meters). With ``method`` "perf" each server's
    fsyncs are recorded call by call and split by the kind of file (:func:`fsync_kind`;
    ``journal_names`` names a server's card journals, e.g. "PSAM journals")."""
    ctx = mp.get_context("spawn")
    start = Start(ctx.Barrier(len(worker_args) + 1), warmup, interval)
    out = ctx.Queue()
    procs = [ctx.Process(target=_generator_main, args=(worker, a, start, out,
                                                       placement.generator), daemon=True)
             for a in worker_args]
    for p in procs:
        p.start()
    recorder: SyscallRecorder | None = None
    counters: dict[str, FsyncCounter] = {}
    try:
        start.wait(timeout=180)  # every generator warmed up and ready
        if method == "perf":
            recorder = SyscallRecorder(list(servers.values()))
        else:
            counters = {n: FsyncCounter(pid, method) for n, pid in servers.items()}
        start.wait(timeout=180)  # go
    except threading.BrokenBarrierError:
        if recorder is not None:
            recorder.stop()
        got = out.get(timeout=30)
        raise RuntimeError(f"a load generator failed before the run: {got!r}") from None
    begin = time.monotonic() + warmup
    _sleep_until(begin)
    spies = _profilers(servers, profile_dir)
    stats0 = {n: proc_stats(pid) for n, pid in servers.items()}
    all0 = cpu_busy()
    if on_window is not None:
        on_window("start")
    wall0 = time.perf_counter()
    runs = []
    for _ in procs:
        got = out.get(timeout=seconds + warmup + 300)
        if isinstance(got, BaseException):
            if recorder is not None:
                recorder.stop()
            raise RuntimeError(f"a load generator failed: {got!r}")
        runs.append(got)
    wall = time.perf_counter() - wall0
    finish = time.monotonic()
    stats = {n: proc_stats(pid) - stats0[n] for n, pid in servers.items()}
    all1 = cpu_busy()
    if on_window is not None:
        on_window("stop")
    share = (busy_share(all0, all1, placement.servers), busy_share(all0, all1,
                                                                   placement.generator))
    split: dict[str, dict[str, int]] = {}
    if recorder is not None:
        calls = recorder.stop()
        if calls is None:
            fsyncs: dict[str, int | None] = {n: None for n in servers}
        else:
            split = split_fsyncs(calls, recorder, servers, (begin, finish))
            fsyncs = {n: sum(kinds.values()) for n, kinds in split.items()}
    else:
        fsyncs = {n: c.stop() for n, c in counters.items()}
    profiles = _stop_profilers(spies)
    for p in procs:
        p.join(timeout=30)
    results = [r for run in runs for r in run.results]
    summary = summarize(results, wall)
    cpu = {n: st.user + st.system for n, st in stats.items()}
    return Measured(summary, wall, cpu, fsyncs, method, sum(r.cpu for r in runs), len(runs),
                    placement, sum(r.busy for r in runs), share, profiles, split, stats,
                    (begin, finish), journal_names or {})


def _profilers(servers: dict[str, int], folder: Path | None,
               ) -> dict[str, tuple[subprocess.Popen[bytes], Path]]:
    """py-spy sampling each server while the load runs (``--profile``): collapsed stacks of
    the thread holding the GIL (``--gil``: where the Python CPU goes, not the waits)."""
    spy = Path(sys.executable).parent / "py-spy"
    if folder is None or not spy.exists():
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, pid in servers.items():
        path = folder / f"{name}-{pid}.txt"
        out[name] = (subprocess.Popen([str(spy), "record", "--nonblocking", "--gil", "-r", "200",
                                       "-f", "raw", "-o", str(path), "-p", str(pid)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                     path)
    return out


def _stop_profilers(spies: dict[str, tuple[subprocess.Popen[bytes], Path]],
                    ) -> dict[str, Path]:
    for proc, _ in spies.values():
        proc.send_signal(signal.SIGINT)
    for proc, _ in spies.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    return {n: path for n, (_, path) in spies.items()}


@contextlib.contextmanager
def running(servers: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    """Stop the server processes (SIGTERM, then SIGKILL) however the block ends."""
    try:
        yield
    finally:
        for p in servers:
            p.terminate()
        for p in servers:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
