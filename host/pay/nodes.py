"""Several payment-server processes (nodes) on one database behind Debian's nginx, for the tests
and the benchmarks (docs/deploy-nodes.md).

A node is ``python -m svcard.host.pay.nodes SPEC.json``: the payment server with every PSAM of
the deployment named (each node names the same PSAM images; a node opens only those it leases,
see :mod:`svcard.host.pay.server.leases`). :class:`Nginx` writes a configuration whose upstream
is the nodes, under a private prefix folder (its pid, logs and temp folders there: no root
path), and starts ``nginx -p PREFIX -c nginx.conf -g 'daemon off;'`` as a child process,
stopped by its pid. Every POST of the payment server is idempotent (the same draw, debit
response or proof again gets the same answer), so nginx may send a request that met a dead
node, or a node holding no PSAM (503), to the next node (``proxy_next_upstream ...
non_idempotent``).
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
from ..kit.nginx import Nginx, find_nginx, nginx_config  # noqa: F401 - their old home
from ..terminal.reader_specs import SCHEMES, ReaderSpecError, open_reader, shown_spec


@dataclass
class NodeSpec:
    """What a node process is started with (a JSON file, mode 0600: it holds a key)."""

    name: str
    port: int
    db_url: str = field(repr=False)
    psams: list[str]                      # reader specs, the same for every node
    merchant_id: str                      # hex
    shared_key: str = field(repr=False)   # hex
    lease_seconds: float = 10.0
    acquire_timeout: float = 2.0
    hold_timeout: float = 10.0
    concentration_dir: str = ""
    admin_token: str = field(default="", repr=False)
    max_holds: int | None = None          # FIG. 5 holds per merchant and per client address


def write_spec(path: Path, spec: NodeSpec) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(asdict(spec), f)


def serve_node(spec_path: Path) -> None:
    """Run one node in this process until it is stopped (or killed)."""
    import uvicorn

    from .server.app import MerchantAccount, PaymentConfig, PaymentServer

    spec = NodeSpec(**json.loads(spec_path.read_text(encoding="utf-8")))
    merchant = bytes.fromhex(spec.merchant_id)
    config = PaymentConfig(
        {merchant: MerchantAccount(merchant, bytes.fromhex(spec.shared_key))},
        db_url=spec.db_url, acquire_timeout=spec.acquire_timeout,
        hold_timeout=spec.hold_timeout, admin_token=spec.admin_token,
        concentration_dir=spec.concentration_dir, node_name=spec.name,
        lease_seconds=spec.lease_seconds, max_holds_per_merchant=spec.max_holds,
        max_holds_per_client=spec.max_holds)
    server = PaymentServer(config, [OnDemandReader(p) for p in spec.psams])
    uvicorn.run(server.app(), host="127.0.0.1", port=spec.port, log_level="warning",
                access_log=False)


class Node:
    """A node process (started, killed with SIGKILL, started again on its port)."""

    def __init__(self, folder: Path, spec: NodeSpec) -> None:
        self.spec = spec
        self.spec_path = folder / f"{spec.name}.json"
        self.log_path = folder / f"{spec.name}.log"
        write_spec(self.spec_path, spec)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.spec.port}"

    def start(self) -> Node:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "svcard.host.pay.nodes", str(self.spec_path)],
                stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node {self.spec.name} exited "
                                   f"({self.proc.returncode}); see {self.log_path}")
            try:
                if httpx.get(self.url + "/v1/health", timeout=2).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"node {self.spec.name} not ready within {timeout:g} s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is closed, the PSAM image locks go with the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


class OnDemandReader(Reader):
    """The reader a spec names, opened at :meth:`connect` and closed at :meth:`disconnect`: a
    node holds a PSAM image (and its file lock) only while it holds the PSAM's lease."""

    def __init__(self, spec: str, lock_timeout: float = 0.5) -> None:
        self.name = slot_name(spec)   # the lease's slot: in the database and the logs
        self._spec = spec
        self.lock_timeout = lock_timeout
        self._inner: Reader | None = None

    def connect(self) -> bytes:
        if self._inner is None:   # a paused old holder keeps the lock: give up soon
            self._inner = open_reader(self._spec, lock_timeout=self.lock_timeout)
        return self._inner.connect()

    def transmit(self, apdu: bytes) -> bytes:
        if self._inner is None:
            raise CardConnectionError(f"{self.name}: not connected (this node holds no lease)")
        return self._inner.transmit(apdu)

    def disconnect(self) -> None:
        inner, self._inner = self._inner, None
        if inner is not None:
            inner.disconnect()


def slot_name(spec: str) -> str:
    """A PSAM's lease slot: its spec as it may be printed (a jcardsim: spec's PARAMS_HEX may
    carry keys: left out, and a digest of the whole spec added so two such specs differ)."""
    head, rest = "", spec
    while rest.startswith("delayed:"):   # delayed:MS:SPEC
        ms, _, rest = rest.removeprefix("delayed:").partition(":")
        head += f"delayed:{ms}:"
    shown = head + shown_spec(rest)
    if shown == spec:
        return spec
    return f"{shown}#{hashlib.sha256(spec.encode()).hexdigest()[:16]}"


def node_readers(specs: list[str] | tuple[str, ...]) -> list[Reader]:
    """A node's PSAMs (``svcard serve payment --node``) as :class:`OnDemandReader`s, checked
    without opening any (another node may hold one now): a spec svcard cannot read, one
    named twice, too long for the lease table's slot, or a virtual image that is not there is
    a :class:`ReaderSpecError` (the command line: one line, exit 3)."""
    seen: set[str] = set()
    for spec in specs:
        shown = shown_spec(spec)
        scheme, sep, rest = spec.partition(":")
        while scheme == "delayed" and sep:   # delayed:MS:SPEC wraps another spec
            _, sep, rest = rest.partition(":")
            scheme, sep, rest = rest.partition(":")
        if not sep or not rest or scheme not in SCHEMES:
            raise ReaderSpecError(f"--psam {shown!r}: not SCHEME:TARGET with a scheme of "
                                  f"{', '.join(s + ':' for s in SCHEMES)}")
        if len(slot_name(spec)) > 300:   # psam_leases.slot
            raise ReaderSpecError(f"--psam {shown[:60]!r}...: longer than 300 characters")
        if spec in seen:
            raise ReaderSpecError(f"--psam {shown!r} is named twice")
        seen.add(spec)
        if scheme == "virtual" and not Path(rest).is_file():
            raise ReaderSpecError(f"--psam {shown!r}: no PSAM image at {rest}")
    return [OnDemandReader(spec) for spec in specs]


if __name__ == "__main__":
    serve_node(Path(sys.argv[1]))
