"""Money tools that read never create what they read, and never call nothing "clean" (issue
10, point 2): ``svcard audit``, ``svcard clearing run`` and ``svcard bank account list|fund``
given a database or folder that does not exist say which, exit 3, and leave no file behind;
an audit with nothing to audit is an error; the databases a tool reads are opened read-only.

The commands run as real ``svcard`` processes on real SQLite files."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy import text

from svcard.card.image import save_new_image
from svcard.card.personalise import image_from_profile
from svcard.fixtures import fixture_path
from svcard.host.kit.command_line import EXIT_INPUT, EXIT_USAGE
from svcard.host.load import records as load_records
from svcard.host.load.bank.db import make_engine as make_bank_engine
from svcard.host.load.server.db import make_engine as make_load_engine
from svcard.host.pay import records as pay_records
from svcard.host.pay.server.db import make_engine as make_payment_engine
from svcard.host.settle.audit import audit
from svcard.host.settle.db import make_engine as make_clearing_engine

SVCARD = str(Path(sys.executable).parent / "svcard")
CLEAN = "clean: every unit of money is accounted for"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SVCARD, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60)


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def refused(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr, result.stdout)
    assert "Traceback" not in result.stderr
    assert CLEAN not in result.stdout
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


@pytest.fixture
def databases(tmp_path: Path) -> dict[str, str]:
    """Empty payment, load, bank and clearing databases, made as their servers make them."""
    urls = {name: f"sqlite:///{tmp_path / name}.db"
            for name in ("payments", "loads", "bank", "clearing")}
    for name, make in (("payments", make_payment_engine), ("loads", make_load_engine),
                       ("bank", make_bank_engine), ("clearing", make_clearing_engine)):
        make(urls[name]).dispose()
    return urls


# --- svcard audit ---------------------------------------------------------------------------
def test_audit_with_no_options_is_not_clean(tmp_path: Path) -> None:
    refused(run("audit", cwd=tmp_path), EXIT_USAGE, "nothing to audit", "--payment-db")
    assert files(tmp_path) == []


@pytest.mark.parametrize("option", ["--payment-db", "--load-db", "--bank-db", "--clearing-db"])
def test_audit_of_a_mistyped_database_creates_nothing(option: str, tmp_path: Path,
                                                      databases: dict[str, str]) -> None:
    before = files(tmp_path)
    typo = tmp_path / "paymnets.db"
    refused(run("audit", option, f"sqlite:///{typo}", cwd=tmp_path), EXIT_INPUT,
            f"sqlite:///{typo}", "does not exist")
    assert not typo.exists()
    assert files(tmp_path) == before
    # given with good databases too: still refused, still nothing created
    refused(run("audit", "--payment-db", databases["payments"], "--load-db",
                databases["loads"], option, f"sqlite:///{typo}", cwd=tmp_path), EXIT_INPUT,
            str(typo))
    assert not typo.exists()


def test_audit_of_a_database_of_another_kind(tmp_path: Path,
                                             databases: dict[str, str]) -> None:
    refused(run("audit", "--payment-db", databases["bank"], cwd=tmp_path), EXIT_INPUT,
            databases["bank"], "not a payment server database", "payments")


def test_audit_of_a_mistyped_card_image_creates_nothing(tmp_path: Path) -> None:
    refused(run("audit", "--card", "crad.json", cwd=tmp_path), EXIT_INPUT, "crad.json")
    assert files(tmp_path) == []  # neither the image nor its lock file


def test_audit_of_empty_databases_is_nothing_to_audit(tmp_path: Path,
                                                      databases: dict[str, str]) -> None:
    args = ["audit", "--payment-db", databases["payments"], "--load-db", databases["loads"],
            "--bank-db", databases["bank"], "--clearing-db", databases["clearing"]]
    result = run(*args, cwd=tmp_path)
    refused(result, EXIT_INPUT, "nothing to audit")
    as_json = run(*args, "--json", cwd=tmp_path)
    report = json.loads(as_json.stdout)
    assert as_json.returncode == EXIT_INPUT
    assert report["clean"] is False and report["nothing_audited"] is True
    # with a card, there is something to audit: clean
    card = tmp_path / "card.json"
    image = image_from_profile(fixture_path("iep-demo.toml"))
    image["app"]["ep"]["balance"] = 0
    save_new_image(card, image)
    with_card = run(*args, "--card", str(card), cwd=tmp_path)
    assert with_card.returncode == 0 and CLEAN in with_card.stdout, with_card.stderr


def test_the_audit_library_says_nothing_audited_is_not_clean() -> None:
    report = audit({})
    assert not report.clean and report.nothing_audited
    assert "nothing to audit" in report.text() and CLEAN not in report.text()


def _images(folder: Path) -> tuple[Path, Path]:
    """A card with an empty purse and a PSAM, as images in ``folder``."""
    card, psam = folder / "card.json", folder / "psam.json"
    image = image_from_profile(fixture_path("iep-demo.toml"))
    image["app"]["ep"]["balance"] = 0
    save_new_image(card, image)
    save_new_image(psam, image_from_profile(fixture_path("psam-demo.toml")))
    return card, psam


def test_an_audit_changes_and_leaves_nothing(tmp_path: Path, databases: dict[str, str]) -> None:
    """Review 4: neither a database's -wal/-shm files nor a card image's lock file are left,
    and no file read is changed; the audit itself succeeds."""
    def digest() -> dict[str, str]:
        return {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
                for name in files(tmp_path)}

    # databases made before schema stamps: a server opening one would stamp it; a reader not
    for name in databases:
        with closing(sqlite3.connect(tmp_path / f"{name}.db")) as conn:
            conn.execute("DROP TABLE svcard_schema")
            conn.commit()
    card, psam = _images(tmp_path)
    before = digest()
    assert sorted(before) == ["bank.db", "card.json", "clearing.db", "loads.db",
                              "payments.db", "psam.json"]
    result = run("audit", "--payment-db", databases["payments"], "--load-db",
                 databases["loads"], "--bank-db", databases["bank"], "--clearing-db",
                 databases["clearing"], "--card", str(card), "--psam", str(psam), cwd=tmp_path)
    assert result.returncode == 0 and CLEAN in result.stdout, (result.returncode,
                                                                result.stderr)
    assert files(tmp_path) == sorted(before)   # no -wal, -shm, .lock file
    assert digest() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_an_audit_of_a_database_in_a_folder_it_cannot_write(tmp_path: Path) -> None:
    """Review 4: an operator who may read the payment database but not write its folder can
    audit it (``mode=ro`` alone would need to make the -shm file there)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    url = f"sqlite:///{folder / 'payments.db'}"
    make_payment_engine(url).dispose()
    card, _psam = _images(tmp_path)
    folder.chmod(0o555)
    try:
        result = run("audit", "--payment-db", url, "--card", str(card), cwd=tmp_path)
    finally:
        folder.chmod(0o755)
    assert result.returncode == 0 and CLEAN in result.stdout, (result.returncode,
                                                                result.stderr)
    assert files(folder) == ["payments.db"]


def test_a_database_being_written_is_read_through_its_wal(tmp_path: Path) -> None:
    """Review 4: while a writer is connected (its -wal file there), the reader sees the rows
    still only in the WAL (it is not opened immutable then), and leaves the writer's files."""
    from svcard.host.kit.db import open_existing

    url = f"sqlite:///{tmp_path / 'payments.db'}"
    writer = make_payment_engine(url)
    try:
        with writer.connect() as held:
            held.execute(text("PRAGMA wal_autocheckpoint=0"))
            held.execute(text("INSERT INTO svcard_schema (component, version, written_by, "
                              "updated) VALUES ('other', 1, 'test', 0)"))
            held.commit()
            assert (tmp_path / "payments.db-wal").exists()
            reader = open_existing(url, ("payments",))
            try:
                with reader.connect() as conn:
                    components = conn.execute(text(
                        "SELECT component FROM svcard_schema")).scalars().all()
            finally:
                reader.dispose()
            assert "other" in components
            assert sorted(files(tmp_path)) == ["payments.db", "payments.db-shm",
                                               "payments.db-wal"]
    finally:
        writer.dispose()
    assert files(tmp_path) == ["payments.db"]   # the writer's own files went with it
    reader = open_existing(url, ("payments",))
    reader.dispose()
    assert files(tmp_path) == ["payments.db"]


def test_read_only_opening_refuses_writes(tmp_path: Path, databases: dict[str, str]) -> None:
    from svcard.host.kit.db import DatabaseError, open_existing

    engine = open_existing(databases["payments"], ("payments",))
    try:
        with pytest.raises(Exception, match="readonly"), engine.begin() as conn:
            conn.execute(text("DELETE FROM payments"))
    finally:
        engine.dispose()
    with pytest.raises(DatabaseError, match="does not exist"):
        list(pay_records.payments(f"sqlite:///{tmp_path / 'none.db'}"))
    with pytest.raises(DatabaseError, match="does not exist"):
        load_records.loads(f"sqlite:///{tmp_path / 'none.db'}")
    with pytest.raises(DatabaseError, match="does not exist"):
        load_records.bank_loads(f"sqlite:///{tmp_path / 'none.db'}")
    assert not (tmp_path / "none.db").exists()


# --- svcard clearing run --------------------------------------------------------------------
def _clearing(tmp_path: Path, *extra: str, batches: str) -> subprocess.CompletedProcess[str]:
    return run("clearing", "run", "--config", str(fixture_path("clearing-demo.toml")),
               "--batches", batches, "--db", f"sqlite:///{tmp_path / 'clearing.db'}",
               "--out", str(tmp_path / "out"), *extra, cwd=tmp_path)


def test_clearing_run_with_a_missing_batch_folder_writes_nothing(tmp_path: Path) -> None:
    refused(_clearing(tmp_path, batches="/nonexistent"), EXIT_INPUT, "/nonexistent",
            "no such folder")
    assert files(tmp_path) == []  # no settlement file, no clearing database, no out folder


def test_clearing_run_with_a_missing_load_db_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "batches").mkdir()
    typo = tmp_path / "laods.db"
    refused(_clearing(tmp_path, "--load-db", f"sqlite:///{typo}",
                      batches=str(tmp_path / "batches")), EXIT_INPUT, str(typo))
    assert files(tmp_path) == ["batches"]
    # the inputs there: the run makes its own outputs (its database and folder)
    made_load_db = tmp_path / "loads.db"
    make_load_engine(f"sqlite:///{made_load_db}").dispose()
    done = _clearing(tmp_path, "--load-db", f"sqlite:///{made_load_db}",
                     batches=str(tmp_path / "batches"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "clearing.db").exists() and (tmp_path / "out").is_dir()


# --- svcard bank account ----------------------------------------------------------------------
def test_bank_account_list_and_fund_of_a_mistyped_database(tmp_path: Path) -> None:
    typo = tmp_path / "bnak.db"
    refused(run("bank", "account", "list", "--db", f"sqlite:///{typo}", cwd=tmp_path),
            EXIT_INPUT, str(typo), "does not exist")
    refused(run("bank", "account", "fund", "alice", "100u", "--db", f"sqlite:///{typo}",
                cwd=tmp_path), EXIT_INPUT, str(typo), "does not exist")
    assert files(tmp_path) == []
    # create makes the database; list then reads it (and only reads it)
    made = run("bank", "account", "create", "alice", "--funds", "100u", "--db",
               f"sqlite:///{typo}", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    listed = run("bank", "account", "list", "--db", f"sqlite:///{typo}", "--json",
                 cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert [a["account_id"] for a in json.loads(listed.stdout)] == ["alice"]
    assert os.stat(typo).st_mode & 0o077 == 0


def test_bank_account_fund_and_create_never_touch_a_database_of_another_kind(
        tmp_path: Path, databases: dict[str, str]) -> None:
    """Review 5: the payment database given to ``bank account fund|create`` is refused (exit
    3, naming it) before it is opened for writing: no bank table is added to it."""
    payments = tmp_path / "payments.db"
    before = payments.read_bytes()
    listing = files(tmp_path)
    for args in (["fund", "alice", "1u"], ["create", "alice", "--funds", "1u"]):
        refused(run("bank", "account", *args, "--db", databases["payments"], cwd=tmp_path),
                EXIT_INPUT, databases["payments"], "not a bank database")
    assert payments.read_bytes() == before
    assert files(tmp_path) == listing
    with closing(sqlite3.connect(payments)) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE "
                                             "type = 'table'")}
    assert "accounts" not in tables and "bank_loads" not in tables
    # the bank's own database: create and fund work, and leave no -wal/-shm behind
    for args in (["create", "alice", "--funds", "1u"], ["fund", "alice", "2u"]):
        done = run("bank", "account", *args, "--db", databases["bank"], cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    assert "balance CNY 0.03" in done.stdout
    # create on an empty file or a new path makes a bank database there
    (tmp_path / "empty.db").touch()
    for name in ("empty.db", "new.db"):
        made = run("bank", "account", "create", "bob", "--db", f"sqlite:///{tmp_path / name}",
                   cwd=tmp_path)
        assert made.returncode == 0, made.stderr
    assert files(tmp_path) == sorted([*listing, "empty.db", "new.db"])


# --- card images: the lock file lasts only while an image is open ---------------------------
def _counter_image(path: Path) -> None:
    from svcard.card.storage import IMAGE_FORMAT, IMAGE_VERSION, encode_image, write_atomically

    write_atomically(path, encode_image({"format": IMAGE_FORMAT, "version": IMAGE_VERSION,
                                         "n": 0}))


def _add_ones(path: str, times: int) -> None:
    """In a child process: open the image, add one to its counter, close; ``times`` times."""
    from svcard.card.storage import ImageStore

    for _ in range(times):
        with ImageStore(path, lock_timeout=60) as store:
            n = int(store.image["n"])
            store.commit(lambda n=n: {**store.image, "n": n + 1})


def test_an_image_lock_is_exclusive_and_its_file_goes_at_close(tmp_path: Path) -> None:
    from svcard.card.storage import ImageLockedError, ImageStore

    image = tmp_path / "c.json"
    _counter_image(image)
    first = ImageStore(image)
    assert (tmp_path / "c.json.lock").exists()
    with pytest.raises(ImageLockedError):
        ImageStore(image, lock_timeout=0.05)
    first.close()
    assert files(tmp_path) == ["c.json"]
    # a lock file that was there before (left by a crash) is used and left as it was
    (tmp_path / "c.json.lock").touch()
    with ImageStore(image):
        pass
    assert files(tmp_path) == ["c.json", "c.json.lock"]


def test_image_openers_racing_the_lock_files_removal_lose_no_update(tmp_path: Path) -> None:
    """Writers still exclude each other though each removes its lock file: 6 processes add
    one 40 times each to a counter in the image; every addition counts."""
    import multiprocessing

    from svcard.card.storage import read_image

    image = tmp_path / "c.json"
    _counter_image(image)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_ones, args=(str(image), 40)) for _ in range(6)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0] * 6
    assert read_image(image)["n"] == 240
    assert files(tmp_path) == ["c.json"]


# --- PostgreSQL: a reader's session is read-only ----------------------------------------------
def test_a_postgresql_reader_cannot_write(tmp_path: Path) -> None:
    from pg_env import start_cluster

    from svcard.host.kit.db import open_existing

    cluster = start_cluster()
    try:
        url = cluster.new_database()
        make_payment_engine(url).dispose()
        engine = open_existing(url, ("payments",))
        try:
            with pytest.raises(Exception, match="read-only transaction"), \
                    engine.begin() as conn:
                conn.execute(text("DELETE FROM payments"))
            with engine.connect() as conn:   # reading works
                assert conn.execute(text("SELECT count(*) FROM payments")).scalar() == 0
        finally:
            engine.dispose()
        assert list(pay_records.payments(url)) == []
    finally:
        cluster.stop()


def test_clearing_run_never_adds_its_tables_to_a_database_of_another_kind(
        tmp_path: Path, databases: dict[str, str]) -> None:
    """``clearing run --db`` names its own database: a new one, or an existing clearing
    database; a payment database given there is refused before anything is written."""
    batches = tmp_path / "batches"
    batches.mkdir()
    payments = tmp_path / "payments.db"
    before = payments.read_bytes()
    refused(run("clearing", "run", "--config", str(fixture_path("clearing-demo.toml")),
                "--batches", str(batches), "--db", databases["payments"],
                "--out", str(tmp_path / "out"), cwd=tmp_path),
            EXIT_INPUT, databases["payments"], "not a clearing database")
    assert payments.read_bytes() == before
    assert not (tmp_path / "out").exists()
