"""``svcard serve load --node NAME [--lease-seconds S]`` (or ``node_name``/``lease_seconds`` in
the load TOML): before, the command line opened (and locked) every ``--hsm`` image at once, so a
second node on the same images could not start, and ``--node`` did not exist. Now two load
nodes started with the real command line on one PostgreSQL each lease one of two HSMs, and a
bad node setting is one line naming the option or the file (exit 3), before any database."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pg_env import Cluster, start_cluster
from sqlalchemy import select

from svcard.fixtures import fixture_path
from svcard.host.kit.serving import free_port
from svcard.host.load.server import leases as L
from svcard.host.load.server.db import make_engine
from svcard.host.load.stack import hsm_image

SVCARD = str(Path(sys.executable).parent / "svcard")
EXIT_INPUT = 3


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    yield c
    c.stop()


def _config(folder: Path, name: str, extra: str = "") -> Path:
    path = folder / name
    path.write_text(extra + "\n" + fixture_path("load-demo.toml").read_text())
    return path


def _serve(config: Path, *args: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from svcard.host.cli.main import main

    result = CliRunner().invoke(main, ["serve", "load", "--config", str(config), *args],
                                prog_name="svcard")
    return result.exit_code, result.output


def _one_line(result: tuple[int, str], *needles: str) -> None:
    code, output = result
    assert code == EXIT_INPUT, (code, output)
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("svcard: "), output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_bad_load_node_settings_are_one_line(tmp_path: Path) -> None:
    hsm = hsm_image(tmp_path)
    db = tmp_path / "loads.db"
    base = ["--hsm", f"virtual:{hsm}", "--db", f"sqlite:///{db}", "--port", "1"]
    plain = _config(tmp_path, "plain.toml")
    for value in ("", "a#b", "x" * 61):
        _one_line(_serve(plain, *base, "--node", value), "--node")
    for value in ("0.5", "nan", "3601"):
        _one_line(_serve(plain, *base, "--node", "n1", "--lease-seconds", value),
                  "--lease-seconds", value)
    _one_line(_serve(plain, *base, "--lease-seconds", "5"), "only for a node")
    # a node checks its HSM specs without opening them
    _one_line(_serve(plain, "--hsm", f"virtual:{tmp_path / 'none.json'}", "--db",
                     f"sqlite:///{db}", "--port", "1", "--node", "n1"), "--hsm", "none.json")
    _one_line(_serve(plain, *base, *base[:2], "--node", "n1"), "named twice")
    assert not db.exists()


def _health(url: str) -> dict[str, object]:
    try:
        return dict(httpx.get(url + "/v1/health", timeout=2).json())
    except (httpx.HTTPError, ValueError):
        return {}


def test_two_load_nodes_from_the_command_line_share_one_postgresql(cluster: Cluster,
                                                                   tmp_path: Path) -> None:
    """Node l1 is named in its TOML, node l2 by --node; both are given both HSM images, each
    opens only the one it leases (before: the second process could not open the images the
    first had locked)."""
    db_url = cluster.new_database()
    hsms = [hsm_image(tmp_path, f"hsm{i}.json") for i in (1, 2)]
    configs = [_config(tmp_path, "l1.toml", 'node_name = "l1"\nlease_seconds = 3'),
               _config(tmp_path, "l2.toml")]
    ports = [free_port(), free_port()]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, config in enumerate(configs):
            cmd = [SVCARD, "serve", "load", "--config", str(config), "--db", db_url,
                   "--port", str(ports[i])]
            for h in hsms:
                cmd += ["--hsm", f"virtual:{h}"]
            if i == 1:
                cmd += ["--node", "l2", "--lease-seconds", "3"]
            with open(tmp_path / f"l{i + 1}.log", "wb") as log:
                procs.append(subprocess.Popen(cmd, cwd=tmp_path, stdout=log,
                                              stderr=subprocess.STDOUT))
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        deadline = time.monotonic() + 60
        while not all(proc.poll() is None and _health(url).get("hsms_leased") == 1
                      for proc, url in zip(procs, urls, strict=True)):
            assert all(p.poll() is None for p in procs), [
                (tmp_path / f"l{i + 1}.log").read_text()[-2000:] for i in range(2)]
            assert time.monotonic() < deadline, "each node to lease one HSM"
            time.sleep(0.05)
        engine = make_engine(db_url)
        with engine.connect() as conn:
            holders = sorted(str(r.node).split("#")[0] for r in conn.execute(
                select(L.hsm_leases)))
        engine.dispose()
        assert holders == ["l1", "l2"]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
