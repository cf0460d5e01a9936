"""A pcscd of the test session's own, with the vpcd driver on private ports.

pcscd runs one per machine (its socket is fixed), so the session's pcscd is the only one: a
pcscd already running is reported, not reused. The daemon is a child of the test process,
started in the foreground, polled for readiness with a deadline and stopped by its own pid.
With ``SVCARD_REQUIRE_PCSC=1`` (set by ``.ci/run``) a missing piece fails instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
READER_0 = "Virtual PCD 00 00"
READER_1 = "Virtual PCD 00 01"


def unavailable(reason: str) -> None:
    if os.environ.get("SVCARD_REQUIRE_PCSC") == "1":
        pytest.fail(f"PC/SC stack required but unavailable: {reason}")
    pytest.skip(reason)


def wait_for(predicate, what: str, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base > 65000:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("0.0.0.0", base))
                b.bind(("0.0.0.0", base + 1))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port pair for vpcd")


def pcscd_running() -> bool:
    return subprocess.run(["pgrep", "-x", "pcscd"], capture_output=True).returncode == 0


@dataclass
class Pcscd:
    folder: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        conf = self.folder / "reader.conf.d"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "vpcd").write_text(
            f'FRIENDLYNAME "Virtual PCD"\nDEVICENAME   /dev/null:{self.port}\n'
            f"LIBPATH      {VPCD_DRIVER}\nCHANNELID    {self.port}\n")
        self.log = self.folder / "pcscd.log"

    def start(self) -> None:
        from svcard.reader.pcsc import list_readers

        out = self.log.open("ab")
        self.proc = subprocess.Popen(["pcscd", "--foreground", "--config",
                                      str(self.folder / "reader.conf.d")],
                                     stdout=out, stderr=subprocess.STDOUT)

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"pcscd exited: {self.log.read_text()[-2000:]}")
            try:
                names = [r.name for r in list_readers()]
            except Exception:
                return False
            return READER_0 in names and READER_1 in names

        wait_for(ready, "pcscd and its two vpcd readers")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        wait_for(lambda: not Path("/run/pcscd/pcscd.comm").exists() or not pcscd_running(),
                 "pcscd to go away")

    def restart(self) -> None:
        self.stop()
        self.start()


class Served:
    """``svcard card serve IMAGE... --vpcd 127.0.0.1:PORT`` as a child process."""

    def __init__(self, images: list[Path], port: int) -> None:
        exe = Path(sys.executable).parent / "svcard"
        cmd = [str(exe) if exe.exists() else "svcard", "card", "serve",
               *map(str, images), "--vpcd", f"127.0.0.1:{port}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.count = len(images)

    def wait_present(self, readers: tuple[str, ...] = (READER_0,)) -> None:
        from svcard.reader.pcsc import list_readers

        def present() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"card serve exited: {self.proc.stderr.read().decode()}"
                                     if self.proc.stderr else "card serve exited")
            states = {r.name: r.card_present for r in list_readers()}
            return all(states.get(r) for r in readers)

        wait_for(present, f"a card in {', '.join(readers)}")

    def readers(self) -> list[str]:
        return [f"Virtual PCD 00 {i:02d}" for i in range(self.count)]

    def wait_gone(self) -> None:
        """Until PC/SC no longer shows this server's cards (vpcd notices a dead card only at
        its next presence poll, so a state read before that is stale)."""
        from svcard.reader.pcsc import list_readers

        def gone() -> bool:
            try:
                states = {r.name: r.card_present for r in list_readers()}
            except Exception:
                return True  # no pcscd: no card either
            return not any(states.get(r) for r in self.readers())

        wait_for(gone, "the served cards to leave their readers")

    def interrupt(self) -> int:
        """Ctrl-C, and the exit code."""
        self.proc.send_signal(2)
        code = self.proc.wait(timeout=15)
        self.wait_gone()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self.wait_gone()


def start_session_pcscd(folder: Path) -> Pcscd:
    if shutil.which("pcscd") is None:
        unavailable("pcscd is not installed (apt-get install pcscd)")
    if not VPCD_DRIVER.exists():
        unavailable("the vpcd driver is not installed (apt-get install vsmartcard-vpcd)")
    try:
        import smartcard  # noqa: F401
    except ImportError:
        unavailable("pyscard is not installed")
    if pcscd_running():
        unavailable("another pcscd is running; the tests need their own (stop it first)")
    daemon = Pcscd(folder, free_port_pair())
    daemon.start()
    return daemon
