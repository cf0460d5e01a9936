"""A private PostgreSQL cluster for the test session: initdb in a temporary folder, the server
a child process running as user postgres on a Unix socket only, polled for readiness with a
deadline, stopped by its pid. With ``SVCARD_REQUIRE_PG=1`` (set by ``.ci/run``) a missing piece
fails instead of skipping."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from pcsc_env import wait_for


def unavailable(reason: str) -> None:
    if os.environ.get("SVCARD_REQUIRE_PG") == "1":
        pytest.fail(f"PostgreSQL required but unavailable: {reason}")
    pytest.skip(reason)


@dataclass
class Cluster:
    folder: Path
    proc: subprocess.Popen[bytes]
    port: int

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.folder}&port={self.port}"

    def new_database(self) -> str:
        import psycopg

        name = "svcard_" + uuid.uuid4().hex[:12]
        with psycopg.connect(host=str(self.folder), port=self.port, user="postgres",
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: fast shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def start_cluster() -> Cluster:
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bins:
        unavailable("PostgreSQL server is not installed (apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("psycopg is not installed")
    if os.geteuid() != 0:
        unavailable("the private cluster is started as user postgres, which needs root")
    bindir = Path(bins[-1])
    folder = Path(tempfile.mkdtemp(prefix="svcard-pg-", dir="/tmp"))
    shutil.chown(folder, "postgres")
    data = folder / "data"
    subprocess.run([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   user="postgres", check=True, capture_output=True, timeout=120)
    port = 15432 + os.getpid() % 1000
    proc = subprocess.Popen(
        [str(bindir / "postgres"), "-D", str(data), "-k", str(folder), "-p", str(port),
         "-c", "listen_addresses=", "-c", "fsync=on"],
        user="postgres", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cluster = Cluster(folder, proc, port)

    def ready() -> bool:
        import psycopg

        if proc.poll() is not None:
            raise AssertionError("postgres exited at start")
        try:
            psycopg.connect(host=str(folder), port=port, user="postgres", dbname="postgres",
                            connect_timeout=1).close()
            return True
        except psycopg.OperationalError:
            return False

    wait_for(ready, "the private PostgreSQL cluster", timeout=60)
    return cluster
