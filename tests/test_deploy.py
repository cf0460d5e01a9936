"""deploy/: the systemd units pass ``systemd-analyze verify`` (with the PC/SC drop-in where the
chips are PC/SC), their command lines name real ``svcard serve`` subcommands and options, and
each unit's ExecStart, run as systemd would run it (its EnvironmentFile, its WorkingDirectory,
the example configuration with test secrets), starts a server that answers; the compose file
describes the four servers and PostgreSQL with real commands (its PostgreSQL init script is run
in tests/test_schema_version.py, which has a PostgreSQL cluster)."""

from __future__ import annotations

import configparser
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import click
import httpx
import pytest
import yaml
from pcsc_env import wait_for
from sqlalchemy import create_engine, select

from svcard.card.image import save_new_image
from svcard.card.personalise import image_from_profile
from svcard.fixtures import fixture_path
from svcard.host.cli.main import main as svcard_main
from svcard.host.kit import schema as S
from svcard.host.kit.serving import free_port
from svcard.host.load.bank.db import SCHEMA as BANK_SCHEMA
from svcard.host.load.server.db import SCHEMA as LOAD_SCHEMA
from svcard.host.pay.merchant.db import SCHEMA as MERCHANT_SCHEMA
from svcard.host.pay.server.db import SCHEMA as PAYMENT_SCHEMA

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNITS = DEPLOY / "systemd"
ETC = DEPLOY / "etc"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
SVCARD = str(Path(sys.executable).parent / "svcard")
INSTALLED = "/opt/svcard/bin/svcard"
SERVERS = ("payment", "merchant", "load", "bank")
PCSC = ("payment", "load")      # the servers whose chips may sit in PC/SC readers
PROBE = {"payment": "/v1/health", "merchant": "/v1/catalogue", "load": "/v1/health",
         "bank": "/v1/health"}

# the version each server stamps on a database it creates
SCHEMA_VERSIONS = {schema.component: schema.version for schema in (
    BANK_SCHEMA, LOAD_SCHEMA, MERCHANT_SCHEMA, PAYMENT_SCHEMA)}


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / f"svcard-{name}.service")
    return parser


def serve_command(name: str) -> click.Command:
    serve = svcard_main.commands["serve"]
    assert isinstance(serve, click.Group)
    command = serve.commands.get(name)
    assert command is not None, f"svcard serve has no {name!r}"
    return command


def check_options(name: str, argv: list[str]) -> None:
    """Every ``--option`` of ``argv`` (after ``serve NAME``) is one of that command's."""
    known = {opt for p in serve_command(name).params for opt in p.opts}
    used = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
    assert used and set(used) <= known, f"{name}: unknown options {set(used) - known}"


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as systemd's EnvironmentFile= and compose's env_file read them."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def expand(exec_start: str, env: dict[str, str]) -> list[str]:
    """systemd's ExecStart expansion: ``$NAME`` alone splits into words, ``${NAME}`` is one."""
    argv: list[str] = []
    for word in shlex.split(exec_start):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            argv += env.get(whole.group(1), "").split()
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                               lambda m: env.get(m.group(1), ""), word))
    return argv


# --- systemd --------------------------------------------------------------------------------

def test_every_server_has_a_unit() -> None:
    assert sorted(p.stem for p in UNITS.glob("*.service")) == sorted(
        f"svcard-{s}" for s in SERVERS)
    dropin = (UNITS / "pcscd.conf").read_text()
    assert "Wants=pcscd.socket" in dropin and "After=pcscd.socket" in dropin
    for name in PCSC:
        assert "pcscd.conf" in (UNITS / f"svcard-{name}.service").read_text()


@pytest.mark.parametrize("name", SERVERS)
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, name: str) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # verify wants ExecStart's program to exist: the installed path becomes this venv's svcard
    text = (UNITS / f"svcard-{name}.service").read_text()
    assert f"ExecStart={INSTALLED} serve {name} " in text
    (tmp_path / f"svcard-{name}.service").write_text(text.replace(INSTALLED, SVCARD))
    if name in PCSC:
        dropins = tmp_path / f"svcard-{name}.service.d"
        dropins.mkdir()
        shutil.copy(UNITS / "pcscd.conf", dropins / "pcscd.conf")
    # by name from a unit path of our own, so the drop-in is read as systemd would read it
    done = subprocess.run([analyze, "verify", "--man=no", f"svcard-{name}.service"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"})
    print(done.stdout, done.stderr)
    assert done.returncode == 0
    assert done.stdout.strip() == "" and done.stderr.strip() == ""   # not even a warning


@pytest.mark.parametrize("name", SERVERS)
def test_unit_settings(name: str) -> None:
    service = unit(name)["Service"]
    assert service["User"] == "svcard" and service["EnvironmentFile"] == f"/etc/svcard/{name}.env"
    assert service["StateDirectory"].split()[0] == f"svcard/{name}"
    assert service["WorkingDirectory"] == f"/var/lib/svcard/{name}"
    assert service["Restart"] == "on-failure" and "3" in service["RestartPreventExitStatus"]
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
                      "PrivateDevices", "RestrictAddressFamilies", "SystemCallFilter"):
        assert service.get(hardening), hardening
    env = env_file(ETC / f"{name}.env")
    argv = expand(service["ExecStart"], env)
    assert argv[:3] == [INSTALLED, "serve", name]
    check_options(name, argv[3:])
    assert argv[argv.index("--host") + 1] == "127.0.0.1"      # a TLS proxy goes in front
    assert argv[argv.index("--config") + 1] == f"/etc/svcard/{name}.toml"
    assert (ETC / f"{name}.toml").is_file()


def chips(name: str, argv: list[str]) -> None:
    """Make the card images the unit's reader options name (virtual:FILE) from the demo
    profiles: one pool terminal id, distinct PSAM serials."""
    option = {"payment": "--psam", "load": "--hsm"}.get(name)
    files = [Path(argv[i + 1].removeprefix("virtual:")) for i, a in enumerate(argv)
             if a == option]
    assert option is None or files, f"{name}: no reader in its EnvironmentFile"
    for i, path in enumerate(files):
        if name == "payment":
            image = image_from_profile(fixture_path("psam-demo.toml"),
                                       psam_serial=f"{i + 1:020d}")
        else:
            image = image_from_profile(fixture_path("hsm-demo.toml"))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_new_image(path, image, overwrite=True)


def unit_process(tmp_path: Path, name: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    """Start what systemd would run for ``name``: ExecStart expanded with the EnvironmentFile
    (its secrets filled with test values), in the WorkingDirectory, on the example
    configuration; /etc/svcard and /var/lib/svcard moved under ``tmp_path``."""
    etc, state = tmp_path / name / "etc", tmp_path / name / "state"
    etc.mkdir(parents=True)
    moved = {"/etc/svcard/": f"{etc}/", "/var/lib/svcard/": f"{state}/"}

    def move(value: str) -> str:
        for old, new in moved.items():
            value = value.replace(old, new)
        return value

    (etc / f"{name}.toml").write_text(move((ETC / f"{name}.toml").read_text()))
    env = {key: move(value) or secrets.token_hex(32) if key != "SVCARD_OPTIONS" else value
           for key, value in env_file(ETC / f"{name}.env").items()}
    service = unit(name)["Service"]
    port = free_port()
    argv = [SVCARD if a == INSTALLED else move(a) for a in expand(service["ExecStart"], env)]
    argv[argv.index("--port") + 1] = str(port)
    for folder in service["StateDirectory"].split():
        (state / folder.removeprefix("svcard/")).mkdir(parents=True, exist_ok=True)
    chips(name, argv)
    with open(tmp_path / f"{name}.log", "wb") as log:   # the child keeps its own copy
        proc = subprocess.Popen(argv, cwd=move(service["WorkingDirectory"] + "/"),
                                env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    return proc, port, state / name


def test_unit_commands_start_the_servers(tmp_path: Path) -> None:
    """Each unit's command, as systemd would run it, starts a server that answers; its
    database is made in its state folder with the schema stamp; SIGTERM stops it. The four
    start at once (each start is a new Python process)."""
    started = {name: unit_process(tmp_path, name) for name in SERVERS}
    try:
        for name, (proc, port, folder) in started.items():
            def answers(name: str = name, proc: subprocess.Popen[bytes] = proc,
                        port: int = port) -> bool:
                if proc.poll() is not None:
                    out = (tmp_path / f"{name}.log").read_text(errors="replace")
                    raise AssertionError(f"svcard serve {name} exited {proc.returncode}: {out}")
                try:
                    return httpx.get(f"http://127.0.0.1:{port}{PROBE[name]}", timeout=2
                                     ).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(answers, f"svcard serve {name} from its unit", timeout=60)
            databases = list(folder.glob("*.db"))
            assert len(databases) == 1, databases
            engine = create_engine(f"sqlite:///{databases[0]}")
            with engine.connect() as conn:
                assert conn.execute(select(S.stamps.c.component, S.stamps.c.version)
                                    ).all() == [(name, SCHEMA_VERSIONS[name])]
            engine.dispose()
        for proc, _port, _folder in started.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _port, _folder in started.values():
            proc.wait(timeout=60)
    finally:
        for proc, _port, _folder in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# --- compose --------------------------------------------------------------------------------

def compose() -> dict[str, object]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


def services() -> dict[str, dict[str, object]]:
    found = compose()["services"]
    assert isinstance(found, dict)
    return found


def test_compose_describes_the_four_servers_and_postgres() -> None:
    assert set(services()) == {*SERVERS, "postgres", "cards"}
    assert "postgres" in str(services()["postgres"]["image"])
    built = (COMPOSE.parent / "Containerfile").read_text()
    assert "USER svcard" in built and "[postgres]" in built


@pytest.mark.parametrize("name", SERVERS)
def test_compose_service_runs_a_real_serve_command(name: str) -> None:
    service = services()[name]
    command = service["command"]
    assert isinstance(command, list) and all(isinstance(a, str) for a in command)
    assert command[:3] == ["svcard", "serve", name]
    check_options(name, command[3:])
    # the configuration is the example one, mounted where --config says
    config = command[command.index("--config") + 1]
    volumes = service["volumes"]
    assert isinstance(volumes, list)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in volumes}
    assert (COMPOSE.parent / mounts[config]).resolve() == ETC / f"{name}.toml"
    env_files = service["env_file"]
    assert isinstance(env_files, list)
    assert [(COMPOSE.parent / f).resolve() for f in env_files] == [ETC / f"{name}.env"]
    # PostgreSQL, its password from PGPASSWORD and never in the URL; published on loopback
    url = command[command.index("--db") + 1]
    assert re.fullmatch(rf"postgresql\+psycopg://svcard@postgres/{name}", url)
    environment = service["environment"]
    assert isinstance(environment, dict) and "SVCARD_DB_PASSWORD" in environment["PGPASSWORD"]
    ports = service["ports"]
    assert isinstance(ports, list) and all(p.startswith("127.0.0.1:") for p in ports)
    readers = {"payment": "--psam", "load": "--hsm"}
    if name in readers:
        assert command[command.index(readers[name]) + 1].startswith("virtual:/var/lib/svcard/")
        depends = service["depends_on"]
        assert isinstance(depends, dict) and "cards" in depends


def test_compose_cards_job_names_real_profiles() -> None:
    script = " ".join(str(a) for a in services()["cards"]["command"])  # type: ignore[attr-defined]
    profiles = re.findall(r"svcard card new /usr/share/svcard/fixtures/(\S+)", script)
    assert profiles == ["psam-demo.toml", "hsm-demo.toml"]
    assert all((ROOT / "fixtures" / p).is_file() for p in profiles)
    assert "new" in svcard_main.commands["card"].commands  # type: ignore[attr-defined]
