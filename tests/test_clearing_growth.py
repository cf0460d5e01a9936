"""A clearing run reads only the files it has not handled (issue 16, point 2).

Before: every run re-read and re-checked every batch and late-proofs file ever handed in to the
folder (each old batch then refused as a duplicate). Now a file whose outcome is final is
recorded with its stat and digest and skipped while its stat is unchanged; a changed one
(rewritten, tampered with its mtime put back, replaced under the same name, truncated) is read
again and gets the verdict it got before; a refusal a new configuration could lift is read
again; a run whose transaction fails records nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from svcard.card.personalise import load_issuer
from svcard.fixtures import fixture_path
from svcard.host.settle import clearing as CL
from svcard.host.settle.config import ClearingConfig, clearing_config
from svcard.host.settle.db import make_engine
from svcard.host.settle.proofs import PROOFS_FORMAT
from svcard.protocols import crypto
from svcard.protocols import purse as P

TERMINAL = bytes.fromhex("000000000001")
PSAM = "0" * 19 + "1"


def write_batch(path: Path, number: int, terminal: bytes = TERMINAL) -> int:
    """A one-record batch (a real card TAC, the demo batch key's MAC); its amount."""
    issuer = load_issuer(fixture_path("demo-issuer.toml"))
    config = clearing_config(fixture_path("clearing-demo.toml"))
    serial = (5_000_000 + number).to_bytes(8, "big")
    amount, date, time_ = 100 + number, bytes.fromhex("20261122"), bytes.fromhex("120000")
    tac = crypto.tac(crypto.card_key(issuer.tac, serial), crypto.purchase_tac_input(
        amount, P.TYPE_EP_PURCHASE, terminal, number, date, time_))
    raw = P.PsamRecord.build({
        "terminal_txn_number": number, "issuer_id": issuer.issuer_id, "card_serial": serial,
        "card_counter": 0, "amount": amount, "txn_type": P.TYPE_EP_PURCHASE,
        "terminal_id": terminal, "date": date, "time": time_, "tac": tac, "status": 0})
    header = P.BatchHeader.build({"terminal_id": terminal, "batch_number": number,
                                  "record_count": 1, "total_amount": amount})
    key = config.terminals[TERMINAL].batch_key
    path.write_text(json.dumps({
        "terminal_id": terminal.hex().upper(), "batch_number": number, "record_count": 1,
        "total_amount": amount, "mac": crypto.cbc_mac(key, header + raw).hex().upper(),
        "psam_id": PSAM, "records": [raw.hex().upper()], "proofs": {}}))
    return amount


class Setup:
    def __init__(self, tmp_path: Path, db_url: str | None = None) -> None:
        self.folder = tmp_path / "batches"
        self.folder.mkdir()
        self.config: ClearingConfig = clearing_config(fixture_path("clearing-demo.toml"))
        self.engine = make_engine(db_url or f"sqlite:///{tmp_path / 'clearing.db'}")
        self.out = tmp_path / "out"

    def run(self) -> CL.ClearingReport:
        return CL.run_clearing(self.config, self.folder, self.engine, self.out)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Setup:
    monkeypatch.setattr(CL, "FRESH_NS", 0, raising=False)   # the files here are all new
    return Setup(tmp_path)


def counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[str]:
    """Count the files the run reads through ``clearing.<name>``."""
    seen: list[str] = []
    real: Callable[..., Any] = getattr(CL, name)

    def wrapper(*args: Any) -> Any:
        seen.append(args[-1].name)
        return real(*args)

    monkeypatch.setattr(CL, name, wrapper)
    return seen


def test_a_run_reads_only_the_files_it_has_not_handled(setup: Setup,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    total = sum(write_batch(setup.folder / f"batch-{n:03d}.json", n) for n in range(1, 31))
    first = setup.run()
    assert first.records_cleared == 30 and first.total_paid == total
    read = counting(monkeypatch, "check_batch")
    again = setup.run()
    # before: all 30 read again and refused as duplicates
    assert read == [] and again.batches == [] and again.total_paid == 0
    assert again.files_skipped == 30
    amount = write_batch(setup.folder / "batch-031.json", 31)
    third = setup.run()
    assert read == ["batch-031.json"] and third.total_paid == amount


def test_a_changed_file_is_read_again_and_gets_the_verdict_it_got_before(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    for n in range(1, 6):
        write_batch(setup.folder / f"b{n}.json", n)
    assert setup.run().records_cleared == 5
    read = counting(monkeypatch, "check_batch")
    # forged: an amount changed, same size, the mtime put back (the ctime still moves)
    b1 = setup.folder / "b1.json"
    st = b1.stat()
    doc = json.loads(b1.read_text())
    rec = bytearray(bytes.fromhex(doc["records"][0]))
    rec[25] ^= 1
    b1.write_text(json.dumps({**doc, "records": [bytes(rec).hex().upper()]}))
    os.utime(b1, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert b1.stat().st_size == st.st_size and b1.stat().st_mtime_ns == st.st_mtime_ns
    # replayed: rewritten with the same bytes; replaced under its name (a new inode, same
    # mtime); copied under a new name
    b2 = setup.folder / "b2.json"
    b2.write_bytes(b2.read_bytes())
    b3 = setup.folder / "b3.json"
    st3 = b3.stat()
    (setup.folder / "b3.tmp").write_bytes(b3.read_bytes())
    os.utime(setup.folder / "b3.tmp", ns=(st3.st_atime_ns, st3.st_mtime_ns))
    os.replace(setup.folder / "b3.tmp", b3)
    (setup.folder / "b9.json").write_bytes((setup.folder / "b4.json").read_bytes())
    # truncated
    b5 = setup.folder / "b5.json"
    b5.write_bytes(b5.read_bytes()[:50])
    report = setup.run()
    assert sorted(read) == ["b1.json", "b2.json", "b3.json", "b5.json", "b9.json"]
    assert report.total_paid == 0 and report.records_cleared == 0
    why = {b["file"]: b["reason"] for b in report.batches}
    assert "batch MAC does not verify" in why["b1.json"]
    assert all(why[f].startswith("duplicate batch") for f in ("b2.json", "b3.json", "b9.json"))
    assert why["b5.json"].startswith("not a batch file")
    # the duplicates are final now; the tampered and truncated ones are read at every run
    read.clear()
    report = setup.run()
    assert sorted(read) == ["b1.json", "b5.json"] and report.total_paid == 0


def test_a_refusal_a_new_configuration_could_lift_is_read_again(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    write_batch(setup.folder / "b1.json", 1)
    doc = json.loads((setup.folder / "b1.json").read_text())
    (setup.folder / "b1.json").write_text(json.dumps({**doc, "terminal_id": "0000000000FF"}))
    assert "unknown terminal" in setup.run().batches[0]["reason"]
    read = counting(monkeypatch, "check_batch")
    assert "unknown terminal" in setup.run().batches[0]["reason"]
    assert read == ["b1.json"]


def test_a_processed_proofs_file_is_not_read_again(setup: Setup,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    proofs = {"format": PROOFS_FORMAT, "terminal_id": TERMINAL.hex().upper(), "psam_id": PSAM,
              "proofs": [{"batch_number": 1, "terminal_txn_number": 9, "tac": "00" * 4}]}
    (setup.folder / "proofs-1.json").write_text(json.dumps(proofs))
    (setup.folder / "proofs-bad.json").write_text("[" * 1000)
    first = setup.run()
    assert {p["file"]: p["state"] for p in first.proofs} == {"proofs-1.json": "processed",
                                                             "proofs-bad.json": "refused"}
    read = counting(monkeypatch, "read_proofs")
    setup.run()
    assert read == ["proofs-bad.json"]
    (setup.folder / "proofs-2.json").write_text(json.dumps(proofs))   # a copy, a new name
    again = setup.run()
    assert {p["file"]: p["reason"][:24] for p in again.proofs}["proofs-2.json"] == \
        "duplicate proofs file: p"


def test_a_run_that_fails_records_no_file_as_handled(setup: Setup,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    total = sum(write_batch(setup.folder / f"b{n}.json", n) for n in range(1, 4))

    def full_disk(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CL, "write_durably", full_disk)
    with pytest.raises(OSError):
        setup.run()
    monkeypatch.undo()
    monkeypatch.setattr(CL, "FRESH_NS", 0, raising=False)
    report = setup.run()
    assert report.records_cleared == 3 and report.total_paid == total


def test_a_file_changed_just_now_is_read_again(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Within the file system's clock tick a rewrite could keep the stat: such a file is not
    recorded, the next run reads it again (and refuses it as a duplicate, as before)."""
    setup = Setup(tmp_path)
    write_batch(setup.folder / "b1.json", 1)
    assert setup.run().records_cleared == 1
    read = counting(monkeypatch, "check_batch")
    assert setup.run().batches[0]["reason"].startswith("duplicate batch")
    assert read == ["b1.json"]


def test_no_run_reads_a_table_that_grows_whole(setup: Setup) -> None:
    """The tables that grow with every run (cleared records, batches, moved loads) are asked
    only about this run's keys: a run never SELECTs one of them without a condition."""
    from sqlalchemy import event

    for n in range(1, 4):
        write_batch(setup.folder / f"b{n}.json", n)
    setup.run()
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(" ".join(statement.split()))

    event.listen(setup.engine, "before_cursor_execute", seen)
    write_batch(setup.folder / "b4.json", 4)
    assert setup.run().records_cleared == 1
    event.remove(setup.engine, "before_cursor_execute", seen)
    whole = [s for s in statements if s.startswith("SELECT") and " WHERE " not in s
             and " JOIN " not in s and any(f"FROM {t}" in s for t in (
                 "cleared_records", "cleared_batches", "moved_loads"))]
    assert whole == []   # before: three such reads at every run


def test_a_record_cleared_in_an_earlier_run_is_refused_under_another_batch(
        setup: Setup) -> None:
    """The same card debit (card, counter) replayed in a new batch (another number, its own
    valid MAC) is refused record by record, as before, now found by its key."""
    write_batch(setup.folder / "b1.json", 1)
    assert setup.run().records_cleared == 1
    doc = json.loads((setup.folder / "b1.json").read_text())
    config = setup.config
    raw = bytes.fromhex(doc["records"][0])
    header = P.BatchHeader.build({"terminal_id": TERMINAL, "batch_number": 77,
                                  "record_count": 1, "total_amount": doc["total_amount"]})
    mac = crypto.cbc_mac(config.terminals[TERMINAL].batch_key, header + raw).hex().upper()
    (setup.folder / "b77.json").write_text(json.dumps({**doc, "batch_number": 77, "mac": mac}))
    report = setup.run()
    assert report.records_cleared == 0 and report.total_paid == 0
    (b77,) = report.batches
    assert b77["state"] == "cleared" and b77["counts"] == {"refused": 1}
    assert b77["problems"][0]["reason"] == "duplicate record: already cleared"


def test_the_same_on_postgresql(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Skipping handled files, a changed file read again, and a replayed record found by its
    key, with the clearing database on PostgreSQL (its temporary table kept per session)."""
    from pg_env import start_cluster

    cluster = start_cluster()
    try:
        monkeypatch.setattr(CL, "FRESH_NS", 0, raising=False)
        setup = Setup(tmp_path, cluster.new_database())
        total = sum(write_batch(setup.folder / f"b{n}.json", n) for n in range(1, 6))
        assert setup.run().total_paid == total
        read = counting(monkeypatch, "check_batch")
        assert setup.run().batches == [] and read == []
        b2 = setup.folder / "b2.json"
        b2.write_bytes(b2.read_bytes())
        doc = json.loads((setup.folder / "b1.json").read_text())
        raw = bytes.fromhex(doc["records"][0])
        for number in (77, 78):   # the second: the session's temporary table is there
            header = P.BatchHeader.build({"terminal_id": TERMINAL, "batch_number": number,
                                          "record_count": 1,
                                          "total_amount": doc["total_amount"]})
            mac = crypto.cbc_mac(setup.config.terminals[TERMINAL].batch_key, header + raw)
            (setup.folder / f"b{number}.json").write_text(json.dumps(
                {**doc, "batch_number": number, "mac": mac.hex().upper()}))
            report = setup.run()
            why = {b["file"]: b for b in report.batches}
            assert report.total_paid == 0 and read[-1] == f"b{number}.json"
            assert why[f"b{number}.json"]["problems"][0]["reason"] == \
                "duplicate record: already cleared"
        assert read == ["b2.json", "b77.json", "b78.json"]   # b2 rewritten: read again
        setup.engine.dispose()
    finally:
        cluster.stop()


def test_two_runs_at_once_pay_each_record_once(setup: Setup, tmp_path: Path) -> None:
    """Raced: two clearing processes' runs over the same new files and database. The database's
    unique keys decide: one pays, the other pays nothing or fails whole (and its files stay
    unhandled, so a later run reads them and refuses them as duplicates)."""
    import threading

    total = sum(write_batch(setup.folder / f"b{n}.json", n) for n in range(1, 21))
    engines = [make_engine(f"sqlite:///{tmp_path / 'clearing.db'}") for _ in range(2)]
    start = threading.Barrier(2)
    outcomes: list[Any] = []

    def one(engine: Any) -> None:
        start.wait()
        try:
            outcomes.append(CL.run_clearing(setup.config, setup.folder, engine,
                                            tmp_path / f"out{id(engine)}").total_paid)
        except Exception as exc:   # the loser of the race: rolled back whole
            outcomes.append(type(exc).__name__)
            print("loser:", str(exc)[:300])

    threads = [threading.Thread(target=one, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    paid = [o for o in outcomes if isinstance(o, int)]
    print("raced runs:", outcomes)
    assert sum(paid) == total and len(outcomes) == 2, outcomes
    later = setup.run()
    assert later.total_paid == 0
