"""Several load-server processes (nodes) on one database behind Debian's nginx, for the tests
(docs/deploy-nodes.md, "Load nodes").

A node is ``python -m svcard.host.load.nodes SPEC.json``: the load server with every HSM of the
deployment named (each node names the same HSM images; a node opens only those it leases, see
:mod:`svcard.host.load.server.leases`). nginx (:class:`~svcard.host.kit.nginx.Nginx`) spreads
the bank's and the clients' requests over the nodes: every POST of the load server is
idempotent (the same request, result or probe result again gets the same answer), so a request
that met a dead node or a node holding no HSM (503) may go to the next node.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from ...reader import CardConnectionError, Reader
from ..kit.nginx import Nginx
from ..terminal.reader_specs import open_reader, shown_spec

__all__ = ["LoadNode", "LoadNodeSpec", "Nginx", "OnDemandReader", "serve_node", "slot_name"]


@dataclass
class LoadNodeSpec:
    """What a load node process is started with (a JSON file, mode 0600: it holds a key)."""

    name: str
    port: int
    db_url: str = field(repr=False)
    hsms: list[str]                        # reader specs, the same for every node
    bank_id: str                           # hex
    shared_key: str = field(repr=False)    # hex
    terminal_id: str                       # hex
    lease_seconds: float = 10.0
    acquire_timeout: float = 2.0


def serve_node(spec_path: Path) -> None:
    """Run one load node in this process until it is stopped (or killed)."""
    import uvicorn

    from .server.app import BankAccount, LoadConfig, LoadServer

    spec = LoadNodeSpec(**json.loads(spec_path.read_text(encoding="utf-8")))
    bank = bytes.fromhex(spec.bank_id)
    config = LoadConfig({bank: BankAccount(bank, bytes.fromhex(spec.shared_key))},
                        bytes.fromhex(spec.terminal_id), db_url=spec.db_url,
                        acquire_timeout=spec.acquire_timeout, node_name=spec.name,
                        lease_seconds=spec.lease_seconds)
    server = LoadServer(config, [OnDemandReader(h) for h in spec.hsms])
    uvicorn.run(server.app(), host="127.0.0.1", port=spec.port, log_level="warning",
                access_log=False)


class LoadNode:
    """A load node process: started, SIGKILLed, SIGSTOPped and continued, started again."""

    def __init__(self, folder: Path, spec: LoadNodeSpec) -> None:
        self.spec = spec
        self.spec_path = folder / f"{spec.name}.json"
        self.log_path = folder / f"{spec.name}.log"
        fd = os.open(self.spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(spec), f)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.spec.port}"

    def start(self) -> LoadNode:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "svcard.host.load.nodes", str(self.spec_path)],
                stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"load node {self.spec.name} exited "
                                   f"({self.proc.returncode}); see {self.log_path}")
            try:
                if httpx.get(self.url + "/v1/health", timeout=2).status_code < 600:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"load node {self.spec.name} not ready within {timeout:g} s")

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is closed; the HSM image locks go with the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)   # a stopped process dies as well
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


class OnDemandReader(Reader):
    """The reader a spec names, opened at :meth:`connect` and closed at :meth:`disconnect`: a
    node holds an HSM image (and its file lock) only while it leases the HSM."""

    def __init__(self, spec: str, lock_timeout: float = 0.5) -> None:
        self.name = slot_name(spec)   # the lease's slot: in the database and the logs
        self._spec = spec
        self.lock_timeout = lock_timeout
        self._inner: Reader | None = None

    def connect(self) -> bytes:
        if self._inner is None:   # a paused former holder keeps the lock: give up soon
            self._inner = open_reader(self._spec, lock_timeout=self.lock_timeout)
        return self._inner.connect()

    def transmit(self, apdu: bytes) -> bytes:
        if self._inner is None:
            raise CardConnectionError(f"{self.name}: not connected (no lease of this HSM)")
        return self._inner.transmit(apdu)

    def disconnect(self) -> None:
        inner, self._inner = self._inner, None
        if inner is not None:
            inner.disconnect()


def slot_name(spec: str) -> str:
    """An HSM's lease slot: the spec as it may be printed (a ``jcardsim:`` spec's parameters
    may hold keys: they are left out, and a digest of the whole spec tells such specs apart)."""
    prefix, inner = "", spec
    while inner.startswith("delayed:"):   # delayed:MS:SPEC
        ms, _, inner = inner[len("delayed:"):].partition(":")
        prefix += f"delayed:{ms}:"
    printable = prefix + shown_spec(inner)
    if printable == spec:
        return spec
    return f"{printable}#{hashlib.sha256(spec.encode()).hexdigest()[:16]}"


if __name__ == "__main__":
    serve_node(Path(sys.argv[1]))
