"""Wrong input at the command line is one line naming what is wrong and a documented exit code,
never a traceback (issue 10, points 1 and 3): --port out of range, database URLs that cannot
be used, a card image with a wrong-typed field, a wrong type in a server configuration, a PSAM
pool whose members share a serial or differ in terminal id, an internal error (exit 70, where
to report it), Ctrl-C (exit 130); and ``svcard card new --set`` (two PSAMs from one profile).

Every case runs the real ``svcard`` in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from svcard.card.image import save_new_image
from svcard.card.personalise import image_from_profile
from svcard.card.storage import read_image
from svcard.fixtures import fixture_path
from svcard.host.kit.command_line import (
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
)

SVCARD = str(Path(sys.executable).parent / "svcard")
SECRET = "s3cr3t-pw-xyzzy"   # a database password that must never be printed


def run(*args: str, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SVCARD, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_line(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """The command failed with ``code`` and one ``svcard: ...`` line naming ``needles``."""
    err = result.stderr
    assert result.returncode == code, (result.returncode, err, result.stdout)
    assert "Traceback" not in err and "Traceback" not in result.stdout, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("svcard: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def usage_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == EXIT_USAGE, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def psam(folder: Path, name: str, **overrides: str) -> Path:
    path = folder / name
    save_new_image(path, image_from_profile(fixture_path("psam-demo.toml"), **overrides))
    return path


# --- point 3: --port ----------------------------------------------------------------------
@pytest.mark.parametrize("server", ["payment", "merchant", "load", "bank"])
def test_a_port_out_of_range_is_a_usage_error(server: str, tmp_path: Path) -> None:
    config = fixture_path(f"{server}-demo.toml")
    args = ["serve", server, "--config", str(config), "--db", f"sqlite:///{tmp_path}/s.db",
            "--port", "80000"]
    if server == "payment":
        args += ["--psam", f"virtual:{psam(tmp_path, 'psam.json')}"]
    if server == "load":
        hsm = tmp_path / "hsm.json"
        save_new_image(hsm, image_from_profile(fixture_path("hsm-demo.toml")))
        args += ["--hsm", f"virtual:{hsm}"]
    usage_error(run(*args, cwd=tmp_path), "--port", "80000", "65535")
    assert not (tmp_path / "s.db").exists()  # refused before anything was opened


# --- point 3: databases -------------------------------------------------------------------
def test_a_database_path_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a folder")
    url = f"sqlite:///{tmp_path}/afile/bank.db"
    line = one_line(run("bank", "account", "create", "alice", "--db", url, cwd=tmp_path),
                    EXIT_INPUT, url, "cannot create the database")
    assert "Not a directory" in line
    missing = f"sqlite:///{tmp_path}/no/such/folder/bank.db"
    one_line(run("bank", "account", "create", "alice", "--db", missing, cwd=tmp_path),
             EXIT_INPUT, missing, "no folder")
    # a server's own database: the same line, before the server starts
    one_line(run("serve", "merchant", "--config", str(fixture_path("merchant-demo.toml")),
                 "--db", url, cwd=tmp_path), EXIT_INPUT, url, "cannot create the database")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_database_in_a_folder_without_write_permission(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    url = f"sqlite:///{locked}/bank.db"
    one_line(run("bank", "account", "create", "alice", "--db", url, cwd=tmp_path),
             EXIT_INPUT, url, "Permission denied")


def test_postgresql_without_the_postgres_extra(tmp_path: Path) -> None:
    # psycopg made unimportable for the child, as in an install without svcard[postgres]
    shim = tmp_path / "shim" / "psycopg"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'psycopg'\", name='psycopg')\n")
    url = f"postgresql+psycopg://svcard:{SECRET}@127.0.0.1/svcard"
    env = {"PYTHONPATH": os.pathsep.join(
        p for p in (str(tmp_path / "shim"), os.environ.get("PYTHONPATH")) if p)}
    for args in (["bank", "account", "create", "alice", "--db", url],
                 ["audit", "--payment-db", url]):
        line = one_line(run(*args, cwd=tmp_path, env=env), EXIT_INPUT,
                        "psycopg is not installed", "svcard[postgres]",
                        "postgresql+psycopg://svcard:***@127.0.0.1/svcard")
        assert SECRET not in line


@pytest.mark.parametrize(("url", "command", "problem"), [
    ("garbage", ["bank", "account", "create", "alice"], "not a database URL"),
    ("sqlite//missing-colon.db", ["bank", "account", "list"], "not a database URL"),
    ("nosuchdb://x/y", ["audit", "--load-db"], "not a database svcard can use"),
    (f"postgresql+pg8000://svcard:{SECRET}@127.0.0.1/x", ["bank", "account", "create", "a"],
     "pg8000 is not installed"),
    (f"weird:://svcard:{SECRET}@@/", ["audit", "--clearing-db"], "not a database URL"),
])
def test_a_garbage_database_url(url: str, command: list[str], problem: str,
                                tmp_path: Path) -> None:
    args = [*command, url] if command[0] == "audit" else [*command, "--db", url]
    line = one_line(run(*args, cwd=tmp_path), EXIT_INPUT, problem)
    assert SECRET not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_database_server_that_cannot_be_reached(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://svcard:{SECRET}@127.0.0.1:1/svcard"  # nothing listens on 1
    line = one_line(run("bank", "account", "list", "--db", url, cwd=tmp_path), EXIT_INPUT,
                    "postgresql+psycopg://svcard:***@127.0.0.1:1/svcard", "cannot open")
    assert SECRET not in line


# --- point 3: card images and configuration files -----------------------------------------
@pytest.mark.parametrize(("change", "field"), [
    (lambda app: app["ep"].__setitem__("balance", "12"), "app.ep.balance"),
    (lambda app: app.__setitem__("currency_exponent", "2"), "app.currency_exponent"),
    (lambda app: app.__setitem__("ep", 3), "app.ep"),
    (lambda app: app.__setitem__("log", [5]), "app.log[0]"),
    (lambda app: app.__setitem__("public_data", "00"), "app.public_data"),
    (lambda app: app.pop("ed"), "app.ed"),
])
def test_card_show_names_a_wrong_typed_field(change: object, field: str, tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    save_new_image(path, image_from_profile(fixture_path("iep-demo.toml")))
    image = read_image(path)
    change(image["app"])  # type: ignore[operator]
    save = path.with_name("bad.json")
    save.write_text(json.dumps(image))
    line = one_line(run("card", "show", str(save), cwd=tmp_path), EXIT_INPUT,
                    f"{save}: {field}:")
    key = image["app"]["tac_key"]
    assert key not in line  # an image holds keys: a message never quotes a value


def test_card_show_of_a_psam_with_a_wrong_typed_counter(tmp_path: Path) -> None:
    path = psam(tmp_path, "psam.json")
    image = read_image(path)
    image["app"]["next_ttn"] = "x"
    path.write_text(json.dumps(image))
    one_line(run("card", "show", str(path), cwd=tmp_path), EXIT_INPUT,
             f"{path}: app.next_ttn: expected a whole number")


def test_a_wrong_value_type_in_a_server_config(tmp_path: Path) -> None:
    config = tmp_path / "payment.toml"
    config.write_text(fixture_path("payment-demo.toml").read_text().replace(
        "acquire_timeout = 2.0", 'acquire_timeout = "soon"'))
    one_line(run("serve", "payment", "--config", str(config), "--psam",
                 f"virtual:{psam(tmp_path, 'psam.json')}", "--db",
                 f"sqlite:///{tmp_path}/p.db", cwd=tmp_path), EXIT_INPUT,
             str(config.name), "acquire_timeout")
    assert not (tmp_path / "p.db").exists()


# --- point 1: PSAMs of one pool -------------------------------------------------------------
def test_card_new_set_makes_two_psams_of_one_pool(tmp_path: Path) -> None:
    profile = str(fixture_path("psam-demo.toml"))
    for n in (1, 2):
        made = run("card", "new", profile, "--out", f"psam{n}.json", "--set",
                   f"psam_serial={n:020d}", "--set", "terminal_id=000000000042", "--set",
                   "next_ttn=7", cwd=tmp_path)
        assert made.returncode == 0, made.stderr
    apps = [read_image(tmp_path / f"psam{n}.json")["app"] for n in (1, 2)]
    assert [a["psam_serial"] for a in apps] == [f"{n:020d}" for n in (1, 2)]
    assert {a["terminal_id"] for a in apps} == {"000000000042"}
    assert {a["next_ttn"] for a in apps} == {7}
    # a dotted key replaces one field of a table, the table's other fields stay
    made = run("card", "new", str(fixture_path("iep-demo.toml")), "--out", "card.json",
               "--set", "balances.ep=5000", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert read_image(tmp_path / "card.json")["app"]["ep"]["balance"] == 5000
    # not KEY=VALUE: usage; a value the profile refuses: exit 3 naming the field
    usage_error(run("card", "new", profile, "--out", "x.json", "--set", "psam_serial",
                    cwd=tmp_path), "--set", "KEY=VALUE")
    one_line(run("card", "new", profile, "--out", "x.json", "--set", "psam_serial=12",
                 cwd=tmp_path), EXIT_INPUT, "psam_serial")
    assert not (tmp_path / "x.json").exists()


def _serve_payment(tmp_path: Path, *images: Path) -> subprocess.CompletedProcess[str]:
    args = ["serve", "payment", "--config", str(fixture_path("payment-demo.toml")),
            "--db", f"sqlite:///{tmp_path}/payments.db", "--port", "1"]  # never reached
    for image in images:
        args += ["--psam", f"virtual:{image}"]
    return run(*args, cwd=tmp_path)


def test_a_pool_of_psams_sharing_a_serial(tmp_path: Path) -> None:
    a, b = psam(tmp_path, "a.json"), psam(tmp_path, "b.json")
    one_line(_serve_payment(tmp_path, a, b), EXIT_INPUT, f"virtual:{a}", f"virtual:{b}",
             "same serial", "00000000000000000001")
    # the same image twice: the same line (not a lock timeout)
    one_line(_serve_payment(tmp_path, a, a), EXIT_INPUT, "same serial")


def test_a_pool_of_psams_with_two_terminal_ids(tmp_path: Path) -> None:
    a = psam(tmp_path, "a.json")
    b = psam(tmp_path, "b.json", psam_serial="00000000000000000002",
             terminal_id="000000000002")
    one_line(_serve_payment(tmp_path, a, b), EXIT_INPUT, f"virtual:{a}", f"virtual:{b}",
             "terminal id", "000000000001", "000000000002")


# --- every command: internal errors and Ctrl-C ----------------------------------------------
BOOM = """
import sys, time
import click
from svcard.host.cli.main import main

@main.command("boom")
def boom() -> None:
    raise RuntimeError("the frobnicator is out of order")

@main.command("ctrl-c")
def ctrl_c() -> None:
    raise KeyboardInterrupt

@main.command("sql")
@click.argument("url")
def sql(url: str) -> None:
    from sqlalchemy import MetaData, text
    from svcard.host.kit.db import make_engine
    engine = make_engine(url, MetaData())
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS t (k VARCHAR(8) PRIMARY KEY)"))
        for _ in range(2):
            conn.execute(text("INSERT INTO t VALUES (:k)"), {"k": "hunter2-secret"})

@main.command("wait")
def wait() -> None:
    print("ready", flush=True)
    time.sleep(60)

main()
"""


def _python(*args: str, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BOOM, *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_an_internal_error_is_one_line_saying_where_to_report_it() -> None:
    line = one_line(_python("boom"), EXIT_INTERNAL,
                    "internal error: RuntimeError: the frobnicator is out of order",
                    "please report it", "https://github.com/svcard/svcard/issues")
    assert line.startswith("svcard: internal error:")
    debug = _python("boom", env={"SVCARD_DEBUG": "1"})
    assert debug.returncode == EXIT_INTERNAL
    assert "Traceback" in debug.stderr and "the frobnicator" in debug.stderr


def test_a_database_statement_error_never_shows_the_sql_or_its_values(tmp_path: Path) -> None:
    """Review 6: an unhandled statement error prints the driver's first line only."""
    line = one_line(_python("sql", f"sqlite:///{tmp_path / 'x.db'}"), EXIT_INTERNAL,
                    "internal error: database: IntegrityError: UNIQUE constraint failed: t.k",
                    "please report it")
    assert "hunter2" not in line and "INSERT" not in line and "SQL" not in line


def test_every_engine_hides_sql_parameters(tmp_path: Path) -> None:
    from sqlalchemy import MetaData, text
    from sqlalchemy.exc import StatementError

    from svcard.host.kit.db import make_engine, open_existing

    url = f"sqlite:///{tmp_path / 'x.db'}"
    engine = make_engine(url, MetaData())
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (k VARCHAR(8) PRIMARY KEY)"))
            conn.execute(text("INSERT INTO t VALUES ('a')"))
        with pytest.raises(StatementError) as caught, engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (:k)"), {"k": "a"})
        assert "'a'" not in str(caught.value) and "hidden" in str(caught.value)
    finally:
        engine.dispose()
    reader = open_existing(url, ("t",))
    try:
        with pytest.raises(StatementError) as caught, reader.connect() as conn:
            conn.execute(text("SELECT nosuch FROM t WHERE k = :k"), {"k": "hunter2"})
        assert "hunter2" not in str(caught.value)
    finally:
        reader.dispose()


@pytest.mark.parametrize("args, field, limit", [
    (["create", "a" * 33], "ACCOUNT_ID", 32),
    (["fund", "a" * 33, "1u"], "ACCOUNT_ID", 32),
    (["create", ""], "ACCOUNT_ID", 32),
    (["create", "alice", "--holder", "h" * 101], "--holder", 100),
    (["create", "alice", "--secret", "s" * 129], "--secret", 128),
])
def test_bank_account_fields_are_bounded(args: list[str], field: str, limit: int,
                                         tmp_path: Path) -> None:
    """Review 6: what the bank's table cannot hold is a usage error, before any database."""
    usage_error(run("bank", "account", *args, "--db", f"sqlite:///{tmp_path / 'bank.db'}",
                    cwd=tmp_path), field, f"1 to {limit} characters")
    assert not (tmp_path / "bank.db").exists()


def test_ctrl_c_is_exit_130_with_one_line() -> None:
    one_line(_python("ctrl-c"), EXIT_INTERRUPTED, "interrupted")


def test_sigint_to_a_running_command_is_exit_130() -> None:
    proc = subprocess.Popen([sys.executable, "-c", BOOM, "wait"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        line = proc.stdout.readline()  # blocks until the command is running
        assert line.strip() == "ready" and time.monotonic() < deadline
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err and "Aborted" not in err
    assert [ln for ln in err.splitlines() if ln.strip()] == ["svcard: interrupted"]
