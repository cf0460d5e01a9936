"""The schema version of every svcard database (host/kit/schema.py): stamped at creation,
adopted as version 1 when made before stamps existed, upgraded step by step, and a NEWER one
refused with one line (URL password masked) while nothing changes; on SQLite and on a real
PostgreSQL; the servers and the clearing tool do not start on a newer database."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from pg_env import Cluster, start_cluster
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    inspect,
    select,
    text,
)

from svcard.host.kit import schema as S
from svcard.host.kit.command_line import EXIT_INPUT
from svcard.host.load.bank import db as bank_db
from svcard.host.load.server import db as load_db
from svcard.host.pay.merchant import db as merchant_db
from svcard.host.pay.server import db as payment_db
from svcard.host.settle import db as clearing_db

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SVCARD = str(Path(sys.executable).parent / "svcard")

MODULES: dict[str, ModuleType] = {
    "payment": payment_db, "merchant": merchant_db, "load": load_db, "bank": bank_db,
    "clearing": clearing_db,
}
COMPONENTS = sorted(MODULES)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    yield c
    c.stop()


def current(component: str) -> int:
    """The schema version this code writes for ``component`` (bank: 2, with the loads'
    issuer column; merchant: 2, with the releasing confirmation's digest and the open-order
    counter; payment: 2, with the node that recorded a draw; the others 1)."""
    return int(MODULES[component].SCHEMA.version)


def stamp_of(url: str, component: str) -> int | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table(S.TABLE):
                return None
            value = conn.execute(select(S.stamps.c.version).where(
                S.stamps.c.component == component)).scalar()
        return None if value is None else int(value)
    finally:
        engine.dispose()


def tables_of(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def run_sql(url: str, *statements: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()


def open_db(component: str, url: str) -> Engine:
    engine: Engine = MODULES[component].make_engine(url)
    return engine


def first_table(component: str) -> str:
    return sorted(MODULES[component].SCHEMA.metadata.tables)[0]


def make_newer(component: str, url: str) -> str:
    """A database of ``component`` one schema version ahead of this code, with one of its
    tables gone (as a newer svcard might have dropped it); the name of that table."""
    open_db(component, url).dispose()
    gone = first_table(component)
    run_sql(url, f"DROP TABLE {gone}",
            f"UPDATE {S.TABLE} SET version = version + 1 WHERE component = '{component}'")
    return gone


def sqlite_url(tmp_path: Path, name: str = "db.sqlite") -> str:
    return f"sqlite:///{tmp_path / name}"


# --- every component, on SQLite ------------------------------------------------------------

@pytest.mark.parametrize("component", COMPONENTS)
def test_new_database_is_stamped(tmp_path: Path, component: str) -> None:
    url = sqlite_url(tmp_path)
    open_db(component, url).dispose()
    assert stamp_of(url, component) == current(component)
    assert set(MODULES[component].SCHEMA.metadata.tables) <= tables_of(url)
    open_db(component, url).dispose()     # reopening keeps the stamp
    assert stamp_of(url, component) == current(component)


@pytest.mark.parametrize("component", COMPONENTS)
def test_database_made_before_stamps_is_adopted(tmp_path: Path, component: str) -> None:
    """Today's databases have the tables and no stamp: they are version 1 (then upgraded to
    this code's version), rows kept, and a table added since is created."""
    url = sqlite_url(tmp_path)
    metadata = MODULES[component].SCHEMA.metadata
    names = sorted(metadata.tables)
    old = create_engine(url)
    metadata.create_all(old, tables=[metadata.tables[names[0]]])   # only one of its tables
    with old.begin() as conn:
        conn.execute(text("CREATE TABLE keepme (x INTEGER)"))
        conn.execute(text("INSERT INTO keepme VALUES (7)"))
    old.dispose()
    open_db(component, url).dispose()
    assert stamp_of(url, component) == current(component)
    assert set(names) <= tables_of(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT x FROM keepme")).scalar() == 7
    engine.dispose()


@pytest.mark.parametrize("component", COMPONENTS)
def test_newer_database_is_refused_and_left_alone(tmp_path: Path, component: str) -> None:
    url = sqlite_url(tmp_path)
    gone = make_newer(component, url)
    with pytest.raises(S.SchemaError) as caught:
        open_db(component, url)
    message = str(caught.value)
    print(message)
    assert "\n" not in message
    newer = current(component) + 1
    assert f"{component} database {url} has schema version {newer}" in message
    assert f"this svcard's {current(component)}" in message
    assert stamp_of(url, component) == newer      # nothing changed: not re-stamped,
    assert gone not in tables_of(url)             # and the dropped table is not made again
    assert caught.value.exit_code == EXIT_INPUT


def test_components_share_one_database(tmp_path: Path) -> None:
    """One database may hold several components: each has its own stamp, and one being newer
    does not stop the others."""
    url = sqlite_url(tmp_path)
    for component in COMPONENTS:
        open_db(component, url).dispose()
    run_sql(url, f"UPDATE {S.TABLE} SET version = 5 WHERE component = 'merchant'")
    with pytest.raises(S.SchemaError, match=r"merchant database .* version 5"):
        open_db("merchant", url)
    for component in COMPONENTS:
        if component != "merchant":
            open_db(component, url).dispose()
            assert stamp_of(url, component) == current(component)


def test_concurrent_first_opens_agree(tmp_path: Path) -> None:
    """Eight threads open one new database at once: the open is one locked transaction, so
    none fails and there is one stamp."""
    url = sqlite_url(tmp_path)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def opener() -> None:
        try:
            start.wait(timeout=30)
            payment_db.make_engine(url).dispose()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT count(*) FROM {S.TABLE}")).scalar() == 1
    engine.dispose()


# --- the mechanism: upgrades and the read-only check ----------------------------------------

def toy_schema(version: int, upgrades: dict[int, Callable[[Connection], None]] | None = None,
               ) -> S.Schema:
    metadata = MetaData()
    Table("toys", metadata, Column("id", Integer, primary_key=True),
          Column("name", String(20)), *([Column("colour", String(20))] if version >= 2 else []))
    return S.Schema("toy", version, metadata, upgrades or {})


def test_older_version_is_upgraded_step_by_step(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    S.open_schema(url, toy_schema(1)).dispose()
    run_sql(url, "INSERT INTO toys (name) VALUES ('kite')")
    steps: list[int] = []

    def to_2(conn: Connection) -> None:
        steps.append(1)
        conn.execute(text("ALTER TABLE toys ADD COLUMN colour VARCHAR(20)"))
        conn.execute(text("UPDATE toys SET colour = 'red'"))

    engine = S.open_schema(url, toy_schema(2, {1: to_2}))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name, colour FROM toys")).one() == ("kite", "red")
    engine.dispose()
    assert steps == [1] and stamp_of(url, "toy") == 2
    S.open_schema(url, toy_schema(2, {1: to_2})).dispose()   # already there: no step again
    assert steps == [1]


def test_older_version_without_an_upgrade_is_refused(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    S.open_schema(url, toy_schema(1)).dispose()
    with pytest.raises(S.SchemaError, match=r"version 1, which this svcard .*2.* cannot"):
        S.open_schema(url, toy_schema(2))
    assert stamp_of(url, "toy") == 1


def test_failed_upgrade_changes_nothing(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    S.open_schema(url, toy_schema(1)).dispose()

    def broken(conn: Connection) -> None:
        conn.execute(text("ALTER TABLE toys ADD COLUMN colour VARCHAR(20)"))
        raise RuntimeError("step failed half way")

    with pytest.raises(RuntimeError):
        S.open_schema(url, toy_schema(2, {1: broken}))
    assert stamp_of(url, "toy") == 1
    engine = create_engine(url)
    assert "colour" not in {c["name"] for c in inspect(engine).get_columns("toys")}
    engine.dispose()


def test_read_only_check(tmp_path: Path) -> None:
    """check() is for tools that read: it writes nothing (a read-only SQLite open works) and
    refuses a newer version."""
    path = tmp_path / "pay.db"
    url = f"sqlite:///{path}"
    never = create_engine(url)
    payment_db.metadata.create_all(never)        # made before stamps: no stamp table
    never.dispose()
    ro = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    assert S.check(ro, payment_db.SCHEMA) is None
    ro.dispose()
    assert S.TABLE not in tables_of(url)         # the check wrote nothing
    open_db("payment", url).dispose()
    run_sql(url, f"UPDATE {S.TABLE} SET version = 3")
    ro = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    with pytest.raises(S.SchemaError, match="version 3, newer than this svcard's 2"):
        S.check(ro, payment_db.SCHEMA)
    ro.dispose()


# --- PostgreSQL ---------------------------------------------------------------------------

def with_password(url: str, password: str) -> str:
    """The cluster trusts local connections, so a password in the URL is carried, unused."""
    return url.replace("postgres@", f"postgres:{password}@", 1)


@pytest.mark.parametrize("component", COMPONENTS)
def test_postgresql_stamp_adopt_and_refuse(cluster: Cluster, component: str) -> None:
    url = cluster.new_database()
    open_db(component, url).dispose()
    assert stamp_of(url, component) == current(component)
    # made before stamps: drop the stamp table, keep the tables (adopted, then upgraded)
    run_sql(url, f"DROP TABLE {S.TABLE}")
    open_db(component, url).dispose()
    assert stamp_of(url, component) == current(component)
    gone = make_newer(component, url)
    secret_url = with_password(url, "pg-s3cret-pw")
    with pytest.raises(S.SchemaError) as caught:
        open_db(component, secret_url)
    message = str(caught.value)
    print(message)
    assert "pg-s3cret-pw" not in message and "postgres:***@" in message
    newer = current(component) + 1
    assert f"{component} database" in message and f"schema version {newer}" in message
    assert stamp_of(url, component) == newer and gone not in tables_of(url)


def test_postgresql_concurrent_first_opens_agree(cluster: Cluster) -> None:
    url = cluster.new_database()
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def opener(component: str) -> None:
        try:
            start.wait(timeout=30)
            open_db(component, url).dispose()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=opener, args=(c,))
               for c in ("payment", "payment", "merchant", "merchant", "load", "bank")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    for component in ("payment", "merchant", "load", "bank"):
        assert stamp_of(url, component) == current(component)


def test_postgresql_databases_of_the_compose_file(cluster: Cluster) -> None:
    """deploy/compose/postgres-init.sql runs on PostgreSQL (this module's own cluster, so its
    names are free), and each server stamps the database its compose command names."""
    import yaml

    compose = Path(__file__).resolve().parent.parent / "deploy" / "compose"
    admin = create_engine(cluster.url("postgres"), isolation_level="AUTOCOMMIT")
    script = "\n".join(line for line in (compose / "postgres-init.sql").read_text().splitlines()
                       if not line.startswith("--"))
    with admin.connect() as conn:
        for statement in filter(None, (s.strip() for s in script.split(";"))):
            conn.execute(text(statement))
    admin.dispose()
    services = yaml.safe_load((compose / "compose.yaml").read_text())["services"]
    for component in ("payment", "merchant", "load", "bank"):
        command = services[component]["command"]
        database = command[command.index("--db") + 1].rsplit("/", 1)[1]
        url = cluster.url(database)
        open_db(component, url).dispose()
        assert stamp_of(url, component) == current(component)
    url = cluster.url("clearing")   # made for `svcard clearing run --db`
    open_db("clearing", url).dispose()
    assert stamp_of(url, "clearing") == 1


# --- the servers and the clearing tool do not start on a newer database -------------------

def serve_command(component: str, tmp_path: Path, url: str) -> list[str]:
    if component == "payment":
        from svcard.host.pay.stack import psam_images
        psam = psam_images(tmp_path, 1)[0]
        return [SVCARD, "serve", "payment", "--config", str(FIXTURES / "payment-demo.toml"),
                "--psam", f"virtual:{psam}", "--db", url, "--port", "1"]
    if component == "load":
        from svcard.host.load.stack import hsm_image
        hsm = hsm_image(tmp_path)
        return [SVCARD, "serve", "load", "--config", str(FIXTURES / "load-demo.toml"),
                "--hsm", f"virtual:{hsm}", "--db", url, "--port", "1"]
    if component == "clearing":
        batches = tmp_path / "batches"
        batches.mkdir()
        return [SVCARD, "clearing", "run", "--config", str(FIXTURES / "clearing-demo.toml"),
                "--batches", str(batches), "--db", url, "--out", str(tmp_path / "out")]
    return [SVCARD, "serve", component, "--config", str(FIXTURES / f"{component}-demo.toml"),
            "--db", url, "--port", "1"]


@pytest.mark.parametrize("component", COMPONENTS)
def test_commands_refuse_a_newer_database(tmp_path: Path, component: str) -> None:
    """Port 1 is never bound here: a server that got past its database would fail on the
    port instead, with another message."""
    url = sqlite_url(tmp_path, f"{component}.db")
    make_newer(component, url)
    done = subprocess.run(serve_command(component, tmp_path, url), capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    print(done.stderr)
    assert done.returncode == EXIT_INPUT
    assert "Traceback" not in done.stderr
    newer = current(component) + 1
    assert (f"{component} database {url} has schema version {newer}, newer than this "
            f"svcard's {current(component)}") in done.stderr
    assert stamp_of(url, component) == newer
    assert not (tmp_path / "out").exists()
