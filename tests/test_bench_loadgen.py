"""The HTTP benchmarks' load generator and meters (benchmarks/loadgen.py): its small HTTP
client, its journal without fsync, the CPU and fsync counts, the CPU split, the run loop."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("svcard_bench_loadgen",
                                                  ROOT / "benchmarks" / "loadgen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


LG = _load()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections: ClassVar[list[object]] = []

    def setup(self) -> None:
        super().setup()
        _Handler.connections.append(self.connection)

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, body: bytes, status: int = 200, close: bool = False,
                say_close: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        if status != 204:
            self.send_header("Content-Length", str(len(body)))
        if close and say_close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = close

    def do_GET(self) -> None:
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/close":
            self._answer(b"bye", close=True)
        elif self.path == "/quiet-close":  # closes after answering, without saying so
            self._answer(b"later", close=True, say_close=False)
        elif self.path == "/empty":
            self._answer(b"", status=204)
        else:
            self._answer(f"path {self.path}".encode())

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        echo = {"type": self.headers.get("Content-Type"), "body": body.decode()}
        self._answer(json.dumps(echo).encode(), status=201)


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.connections = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_http_keeps_one_connection_and_reads_every_framing(server: str) -> None:
    with LG.Http() as http:
        first = http.get(f"{server}/a?x=1")
        assert (first.status_code, first.content) == (200, b"path /a?x=1")
        assert str(first.url) == f"{server}/a?x=1"
        assert http.get(f"{server}/chunked").content == b"hello chunked world"
        assert http.get(f"{server}/empty").status_code == 204
        posted = http.post(f"{server}/p", content=b"\x00\x01",
                           headers={"Content-Type": "application/octet-stream"})
        assert posted.status_code == 201
        assert posted.json() == {"type": "application/octet-stream", "body": "\x00\x01"}
        assert http.post(f"{server}/j", json={"a": 1}).json() == {
            "type": "application/json", "body": '{"a":1}'}
    assert len(_Handler.connections) == 1  # keep-alive: every request on one connection


def test_http_reconnects_after_a_close(server: str) -> None:
    with LG.Http() as http:
        assert http.get(f"{server}/close").content == b"bye"   # said Connection: close
        assert http.get(f"{server}/quiet-close").content == b"later"
        time.sleep(0.05)  # the server has closed that connection without a word
        assert http.get(f"{server}/after").content == b"path /after"
    assert len(_Handler.connections) == 3


def test_bench_journal_never_fsyncs_and_keeps_no_secret(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fsync(fd: int) -> None:
        raise AssertionError("the benchmark journal fsynced")

    monkeypatch.setattr(os, "fsync", no_fsync)
    journal = LG.BenchJournal(tmp_path / "j.jsonl")
    journal.write("t1", "draw", params={"tsk": "00" * 16, "amount": 5}, secret="pw")
    journal.write("t1", "done")
    journal.close()
    text = (tmp_path / "j.jsonl").read_text()
    assert "tsk" not in text and "pw" not in text
    assert [json.loads(line)["state"] for line in text.splitlines()] == ["draw", "done"]
    assert not (tmp_path / "j.jsonl.secrets").exists()


PERF = """# started on Sun Nov 22 20:00:00 2026

7,,syscalls:sys_enter_fsync,37302863,100.00,,
2,,syscalls:sys_enter_fdatasync,37302863,100.00,,
"""
STRACE = """% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 90.00    0.090000        1000        90           fdatasync
 10.00    0.010000        1000        10         1 fsync
------ ----------- ----------- --------- --------- ----------------
100.00    0.100000        1000       100         1 total
"""


def test_fsync_counts_are_parsed() -> None:
    assert LG.parse_fsync_count(PERF, "perf") == 9
    assert LG.parse_fsync_count(PERF.replace("7,,", "<not counted>,,"), "perf") is None
    assert LG.parse_fsync_count("", "perf") is None
    assert LG.parse_fsync_count(STRACE, "strace") == 100
    assert LG.parse_fsync_count("", "strace") == 0  # strace lists no syscall never made


CHILD = """
import os, sys, time
go = sys.argv[1]
deadline = time.monotonic() + 30
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.01)
fd = os.open(go, os.O_RDWR)
for _ in range(7):
    os.fsync(fd)
for _ in range(2):
    os.fdatasync(fd)
"""


def test_fsync_counter_counts_a_process(tmp_path: Path) -> None:
    method = LG.fsync_method()
    if method is None:
        pytest.skip("neither perf nor strace here")
    go = tmp_path / "go"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(go)])
    try:
        counter = LG.FsyncCounter(child.pid, method)
        go.write_bytes(b"x")
        child.wait(timeout=30)
        assert counter.stop() == 9
    finally:
        child.kill()


def test_process_cpu_follows_the_process() -> None:
    before, cpu0 = LG.process_cpu(os.getpid()), time.process_time()
    while time.process_time() - cpu0 < 0.3:
        pass
    used = LG.process_cpu(os.getpid()) - before
    assert 0.2 <= used <= 1.0


def test_cpus_are_split_between_servers_and_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    p = LG.split_cpus()
    assert (p.servers, p.generator) == ({0, 1}, {2, 3})
    assert "servers on CPU 0,1" in p.note and p.server_preexec() is not None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert (LG.split_cpus().servers, LG.split_cpus().generator) == ({0}, {1})
    assert LG.split_cpus(pin=False).servers is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    p = LG.split_cpus()
    assert p.servers is None and "not pinned" in p.note and p.server_preexec() is None


def test_run_cards_counts_only_the_measured_window(tmp_path: Path) -> None:
    calls: list[int] = []
    lock = threading.Lock()

    def step(serial: int, reader: Any, journal: Any, http: Any) -> tuple[bool, int]:
        with lock:
            calls.append(serial)
        time.sleep(0.005)
        return serial % 2 == 0, 3

    run = LG.run_cards(10, 3, 0.3, str(tmp_path), step)
    assert sorted(set(calls)) == [10, 11, 12]
    assert len(run.results) == len(calls) - 3  # each card's first transaction is a warm-up
    summary = LG.summarize(run.results, run.wall)
    assert summary["done"] + summary["refused"] == len(run.results)
    assert summary["refused"] > 0 and summary["trips"] == 3
    assert run.wall >= 0.3 and run.cpu >= 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_run_cards_stops_at_once_when_a_card_breaks(tmp_path: Path) -> None:
    def step(serial: int, reader: Any, journal: Any, http: Any) -> tuple[bool, int]:
        if serial == 11:
            raise RuntimeError("the bench itself is broken")
        return True, 1

    started = time.monotonic()
    with pytest.raises(threading.BrokenBarrierError):
        LG.run_cards(10, 3, 0.2, str(tmp_path), step)
    assert time.monotonic() - started < 30  # not the barrier's 120 s timeout
