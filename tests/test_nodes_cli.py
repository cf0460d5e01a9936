"""``svcard serve payment --node NAME [--lease-seconds S]`` (or ``node_name``/``lease_seconds``
in the TOML): two node processes started with the real command line on one PostgreSQL, each
leasing one of the two PSAMs, a card paying through each; and a bad node setting is one line
naming the file or the option (exit 3), before any database is made."""

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

from svcard.card.storage import read_image
from svcard.fixtures import fixture_path
from svcard.host.demo.system import card_image
from svcard.host.kit.serving import ServerThread, free_port
from svcard.host.pay import client as C
from svcard.host.pay.config import payment_config
from svcard.host.pay.merchant.server import MerchantConfig, MerchantServer
from svcard.host.pay.server import leases as L
from svcard.host.pay.server.db import make_engine, payments
from svcard.host.pay.server.psam_pool import identify
from svcard.host.pay.stack import DEMO_MERCHANT_ID, psam_images
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader

SVCARD = str(Path(sys.executable).parent / "svcard")
EXIT_INPUT = 3


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    yield c
    c.stop()


def _config(folder: Path, name: str, extra: str = "") -> Path:
    """payment-demo.toml with ``extra`` settings at the top (before the first table)."""
    path = folder / name
    path.write_text(extra + "\n" + fixture_path("payment-demo.toml").read_text())
    return path


def _serve(folder: Path, config: Path, *args: str) -> tuple[int, str]:
    """``svcard serve payment`` in this process (a refusal comes before any server starts):
    its exit code and output."""
    from click.testing import CliRunner

    from svcard.host.cli.main import main

    result = CliRunner().invoke(main, ["serve", "payment", "--config", str(config), *args],
                                prog_name="svcard")
    return result.exit_code, result.output


def _one_line(result: tuple[int, str], *needles: str) -> None:
    code, output = result
    assert code == EXIT_INPUT, (code, output)
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("svcard: "), output
    assert "Traceback" not in output and "internal error" not in output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_bad_node_settings_are_one_line(tmp_path: Path) -> None:
    (psam,) = psam_images(tmp_path, 1)
    db = tmp_path / "payments.db"
    base = ["--psam", f"virtual:{psam}", "--db", f"sqlite:///{db}", "--port", "1"]
    plain = _config(tmp_path, "plain.toml")
    for value in ("", "a#b", "x" * 61, "node 1"):
        _one_line(_serve(tmp_path, plain, *base, "--node", value), "--node")
    for value in ("0.5", "nan", "inf", "ten", "3601"):
        _one_line(_serve(tmp_path, plain, *base, "--node", "n1", "--lease-seconds", value),
                  "--lease-seconds", value)
    _one_line(_serve(tmp_path, plain, *base, "--lease-seconds", "5"), "--lease-seconds",
              "only for a node")
    for bad, field in (('node_name = "a#1"', "node_name"), ("lease_seconds = 0", "lease_seconds"),
                       ('lease_seconds = "5"', "lease_seconds")):
        path = _config(tmp_path, "bad.toml", bad)
        _one_line(_serve(tmp_path, path, *base), str(path), field)
    # a node checks its PSAM specs without opening them: a missing image, one named twice
    _one_line(_serve(tmp_path, plain, "--psam", f"virtual:{tmp_path / 'none.json'}",
                     "--db", f"sqlite:///{db}", "--port", "1", "--node", "n1"),
              "none.json")
    _one_line(_serve(tmp_path, plain, *base, *base[:2], "--node", "n1"), "named twice")
    _one_line(_serve(tmp_path, plain, "--psam", "nope:x", "--db", f"sqlite:///{db}",
                     "--port", "1", "--node", "n1"), "nope:x")
    assert not db.exists()


def test_node_settings_from_the_file_and_the_options(tmp_path: Path) -> None:
    from svcard.host.pay.config import node_options

    path = _config(tmp_path, "node.toml", 'node_name = "n1"\nlease_seconds = 4.5')
    config = payment_config(path)
    assert (config.node_name, config.lease_seconds) == ("n1", 4.5)
    config = node_options(config, "n2", "3")
    assert (config.node_name, config.lease_seconds) == ("n2", 3.0)
    plain = payment_config(_config(tmp_path, "plain.toml"))
    assert (plain.node_name, plain.lease_seconds) == ("", 10.0)


def _health(url: str) -> dict[str, object]:
    try:
        answer = httpx.get(url + "/v1/health", timeout=2)
        return dict(answer.json())
    except (httpx.HTTPError, ValueError):
        return {}


def _wait(check: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():   # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_two_nodes_from_the_command_line_share_one_postgresql(cluster: Cluster,
                                                              tmp_path: Path) -> None:
    """Node n1 is named in its TOML, node n2 by --node; each gets one of the two PSAMs (opened
    only while leased), and a card pays through each (FIG. 6 and FIG. 8)."""
    db_url = cluster.new_database()
    psams = psam_images(tmp_path, 2)
    with open_reader(f"virtual:{psams[0]}") as reader:
        terminal_id = identify(reader).terminal_id
    demo = payment_config(fixture_path("payment-demo.toml"))
    key = demo.merchants[DEMO_MERCHANT_ID].shared_key
    configs = [_config(tmp_path, "n1.toml", 'node_name = "n1"\nlease_seconds = 3'),
               _config(tmp_path, "n2.toml")]
    ports = [free_port(), free_port()]
    procs: list[subprocess.Popen[bytes]] = []
    merchants: list[tuple[ServerThread, MerchantServer]] = []
    try:
        for i, config in enumerate(configs):
            cmd = [SVCARD, "serve", "payment", "--config", str(config), "--db", db_url,
                   "--port", str(ports[i])]
            for p in psams:
                cmd += ["--psam", f"virtual:{p}"]
            if i == 1:
                cmd += ["--node", "n2", "--lease-seconds", "3"]
            with open(tmp_path / f"n{i + 1}.log", "wb") as log:
                procs.append(subprocess.Popen(cmd, cwd=tmp_path, stdout=log,
                                              stderr=subprocess.STDOUT))
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for proc, url in zip(procs, urls, strict=True):
            _wait(lambda proc=proc, url=url: proc.poll() is None and _health(url).get(
                "psams") == 1, f"{url} to lease one PSAM")
        for i, url in enumerate(urls):
            port = free_port()
            server = MerchantServer(MerchantConfig(
                DEMO_MERCHANT_ID, key, url, terminal_id, public_url=f"http://127.0.0.1:{port}",
                variants=frozenset(("fig6", "fig8")),
                db_url=f"sqlite:///{tmp_path / f'merchant{i}.db'}"))
            merchants.append((ServerThread(server.app(), port=port).start(), server))
        card = card_image(tmp_path, ep=10_000)
        with httpx.Client(timeout=60) as http, open_reader(f"virtual:{card}") as reader:
            for (thread, _), variant in zip(merchants, ("fig6", "fig8"), strict=True):
                C.pay(f"{thread.url}/v1/checkout/song?variant={variant}", reader,
                      journal=Journal(tmp_path / "journal.jsonl"), http=http)
        engine = make_engine(db_url)
        with engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(select(payments)
                                                           .order_by(payments.c.id))]
            leases = {r.slot: r.node for r in conn.execute(select(L.psam_leases))}
        engine.dispose()
        assert [r["state"] for r in rows] == ["confirmed", "confirmed"]
        assert [r["node"].split("#")[0] for r in rows] == ["n1", "n2"]
        assert rows[0]["psam_id"] != rows[1]["psam_id"]   # each node its own PSAM
        assert sorted(n.split("#")[0] for n in leases.values()) == ["n1", "n2"]
        debited = 10_000 - read_image(card)["app"]["ep"]["balance"]
        assert debited == sum(r["amount"] for r in rows) > 0
    finally:
        for thread, server in merchants:
            thread.stop()
            server.close()
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
