"""Issue 9, CL4 and T1 (reader side), and "the audit sees what the attacks hid": each situation
is built for real (servers on loopback, real SQLite, real card and PSAM crypto), or, where no
honest flow can make it any more, by writing the rows an attack left into the real tables; the
audit must name the transaction, and clearing must pay a late proof once and only once."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import load_card as load
from sqlalchemy import insert, select

from svcard.host.demo.system import System, card_image
from svcard.host.kit.db import now_ms
from svcard.host.load.bank.db import BankDb
from svcard.host.load.bank.db import make_engine as make_bank_engine
from svcard.host.load.server.db import loads
from svcard.host.load.server.db import make_engine as make_load_engine
from svcard.host.pay import client as C
from svcard.host.pay.server.db import make_engine as make_pay_engine
from svcard.host.pay.server.db import payments
from svcard.host.settle.audit import DAY_MS, AuditReport, audit, psam_open_batches
from svcard.host.settle.proofs import PROOFS_FORMAT, PROOFS_PREFIX
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import messages as M
from svcard.protocols import purse as P

EIGHT_DAYS = 8 * DAY_MS


def pay(system: System, card: Path, journal: Journal, sku: str = "ticket",
        variant: str = "fig6", http: httpx.Client | None = None) -> None:
    with (http or httpx.Client(timeout=30)) as client, \
            open_reader(f"virtual:{card}") as reader:
        C.pay(system.pay.checkout_url(sku, variant), reader, journal=journal, http=client)


class LoseOne(httpx.Client):
    """The attacker's (or the unlucky) client: the request to ``path`` is sent, and the
    connection drops before its answer comes back (or before it goes out: ``before``)."""

    def __init__(self, path: str, *, before: bool = False) -> None:
        super().__init__(timeout=30)
        self.path, self.before = path, before

    def post(self, url: object, **kw: Any) -> httpx.Response:  # type: ignore[override]
        if self.path in str(url) and self.before:
            raise httpx.ConnectError("link cut")
        response = super().post(url, **kw)  # type: ignore[arg-type]
        if self.path in str(url):
            raise httpx.ConnectError("link cut")
        return response


def payment_rows(system: System) -> list[dict[str, Any]]:
    with make_pay_engine(system.pay.payment_server.config.db_url).connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(payments).order_by(payments.c.id))]


def named(report: AuditReport, *words: str) -> list[str]:
    return [d for d in report.discrepancies if all(w in d for w in words)]


def batch_of(system: System, psam_hex: str, ttn: int) -> tuple[Path, int]:
    """The handed batch file holding PSAM ``psam_hex``'s record ``ttn``, and its number."""
    for path in sorted(system.batch_dir.glob("batch-*.json")):
        doc = json.loads(path.read_text())
        if doc["psam_id"].upper() != psam_hex.upper():
            continue
        for raw in doc["records"]:
            if P.PsamRecord.parse(bytes.fromhex(raw)).terminal_txn_number == ttn:
                return path, int(doc["batch_number"])
    raise AssertionError(f"no batch holds PSAM {psam_hex} TTN {ttn}")


def proofs_file(folder: Path, terminal: str, psam: str, proofs: list[dict[str, Any]],
                stamp: str) -> Path:
    path = folder / f"proofs-{terminal.upper()}-{psam.upper()}-{stamp}.json"
    path.write_text(json.dumps({"format": PROOFS_FORMAT, "terminal_id": terminal.upper(),
                                "psam_id": psam.upper(), "proofs": proofs}))
    return path


# --- CL4: a FIG. 8 proof arriving after its batch was closed ---------------------------------

def test_a_late_fig8_proof_is_paid_once_and_a_tampered_one_moves_nothing(
        system: System, tmp_path: Path) -> None:
    card = card_image(tmp_path, ep=0)
    journal = Journal(tmp_path / "j.jsonl")
    load(system, card, journal, 5_000)
    # 1. FIG. 8: goods released, the card debited; the proof upload is lost on the way
    with pytest.raises(httpx.ConnectError):
        pay(system, card, journal, "ticket", "fig8", http=LoseOne("/v1/proof", before=True))
    (row,) = [r for r in payment_rows(system) if r["variant"] == M.FIG8_MERCHANT_COMPARES]
    assert row["state"] == "released"
    # 2. the batch closes without the card's TAC: clearing holds the record, pays nothing
    system.close_batches()
    first = system.run_clearing()
    assert first.total_paid == 0
    assert sum(b["counts"].get("held", 0) for b in first.batches) == 1
    # 3. the client resumes: the proof reaches the payment server after the batch left
    with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
        C.resume(reader, journal=journal, http=http)
    (row,) = [r for r in payment_rows(system) if r["id"] == row["id"]]
    assert row["state"] == "confirmed" and row["tac"]
    # the audit sees it: a confirmed payment whose record clearing holds, listed with its age;
    # past the maximum age it fails the audit, naming the record (it used to say "clean")
    now = system.audit([card])
    assert [h["ttn"] for h in now.held] == [row["ttn"]]
    assert "records held by clearing: 1" in now.text()
    late = system.audit([card], now=now_ms() + EIGHT_DAYS)
    assert named(late, f"TTN {row['ttn']}", "held", "older than the maximum age"), \
        late.discrepancies
    # the payment server may write its own late proofs file: keep it aside, replay it last
    system.close_batches()
    aside = tmp_path / "aside"
    aside.mkdir()
    for found in system.batch_dir.glob(f"{PROOFS_PREFIX}*.json"):
        shutil.move(str(found), aside / found.name)
    psam_hex = row["psam_id"].upper()
    terminal = system.pay.payment_server.pool.terminal_id.hex().upper()
    _, number = batch_of(system, psam_hex, row["ttn"])
    good = {"batch_number": number, "terminal_txn_number": row["ttn"], "tac": row["tac"]}
    # 4. attacks on the proofs file, each refused and moving nothing:
    #    a tampered TAC; a proof aimed at a record clearing does not hold; a malformed file
    tac = bytes.fromhex(row["tac"])
    forged = {**good, "tac": bytes([tac[0] ^ 1, *tac[1:]]).hex().upper()}
    unknown = {**good, "terminal_txn_number": row["ttn"] + 1000}
    proofs_file(system.batch_dir, terminal, psam_hex, [forged, unknown], "20260101000000000001")
    (system.batch_dir / f"{PROOFS_PREFIX}deep.json").write_text("[" * 100_000)
    (system.batch_dir / f"{PROOFS_PREFIX}bad.json").write_text(json.dumps(
        {"format": PROOFS_FORMAT, "terminal_id": terminal, "psam_id": psam_hex,
         "proofs": [{**good, "batch_number": True}]}))
    attacked = system.run_clearing()
    assert attacked.total_paid == 0 and attacked.records_cleared == 0
    by_file = {p["file"]: p for p in attacked.proofs}
    (tampered,) = [p for f, p in by_file.items() if f.endswith("000001.json")]
    assert tampered["counts"] == {"refused": 1, "not held": 1}
    assert "TAC does not verify" in tampered["problems"][0]["reason"]
    assert by_file[f"{PROOFS_PREFIX}deep.json"]["state"] == "refused"
    assert "not a late proofs file" in by_file[f"{PROOFS_PREFIX}bad.json"]["reason"]
    assert len(system.audit([card]).held) == 1  # the record is still held
    # 5. the genuine proof: paid in this run, in the settlement file and the ledger
    proofs_file(system.batch_dir, terminal, psam_hex, [good], "20260101000000000002")
    paid = system.run_clearing()
    assert paid.records_cleared == 1 and paid.total_paid == 1250, paid.proofs
    assert ("merchant payout", 1250) in {(ln["kind_name"], ln["amount"]) for ln in paid.lines}
    twin = [json.loads(x) for x in Path(paid.jsonl_file).read_text().splitlines()]
    assert any(t["type"] == "proofs" and t["counts"] == {"cleared": 1} for t in twin)
    after = system.audit([card], now=now_ms() + EIGHT_DAYS)
    assert after.clean, after.discrepancies
    assert after.held == [] and after.figures["purchases settled"] == 1250
    # 6. replays: the same file again, a copy under a new name, the server's own file:
    #    nothing is paid twice
    again = system.run_clearing()
    assert again.total_paid == 0 and all(
        p["state"] == "refused" and "duplicate proofs file" in p["reason"]
        for p in again.proofs if p["file"].endswith("000002.json"))
    shutil.copy(system.batch_dir / f"proofs-{terminal}-{psam_hex}-20260101000000000002.json",
                system.batch_dir / f"proofs-{terminal}-{psam_hex}-20260101000000000003.json")
    for found in aside.iterdir():
        shutil.move(str(found), system.batch_dir / found.name)
    replayed = system.run_clearing()
    assert replayed.total_paid == 0 and replayed.records_cleared == 0
    final = system.audit([card], now=now_ms() + EIGHT_DAYS)
    assert final.clean and final.figures["merchants paid (ledger)"] == 1250


def test_twenty_clearing_runs_racing_one_late_proof_pay_it_once(
        system: System, tmp_path: Path) -> None:
    card = card_image(tmp_path, ep=0)
    journal = Journal(tmp_path / "j.jsonl")
    load(system, card, journal, 5_000)
    with pytest.raises(httpx.ConnectError):
        pay(system, card, journal, "song", "fig8", http=LoseOne("/v1/proof", before=True))
    system.close_batches()
    system.run_clearing()
    with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
        C.resume(reader, journal=journal, http=http)
    (row,) = [r for r in payment_rows(system) if r["variant"] == M.FIG8_MERCHANT_COMPARES]
    terminal = system.pay.payment_server.pool.terminal_id.hex().upper()
    _, number = batch_of(system, row["psam_id"], row["ttn"])
    for found in system.batch_dir.glob(f"{PROOFS_PREFIX}*.json"):
        found.unlink()  # only the attacker's copies below
    proofs_file(system.batch_dir, terminal, row["psam_id"], [
        {"batch_number": number, "terminal_txn_number": row["ttn"], "tac": row["tac"]}],
        "20260101000000000009")
    paid: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(20)

    def racer() -> None:
        start.wait()
        try:
            paid.append(system.run_clearing().total_paid)
        except Exception as exc:  # a run that loses the race is rolled back whole
            errors.append(exc)

    threads = [threading.Thread(target=racer) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sum(paid) == 99 and paid.count(99) == 1, (paid, errors)
    report = system.audit([card])
    assert report.clean, report.discrepancies
    assert report.figures["merchants paid (ledger)"] == 99


# --- T1: a confirmed payment with no PSAM record ---------------------------------------------

def test_a_confirmed_payment_with_no_psam_record_fails_the_audit(
        system: System, tmp_path: Path) -> None:
    card = card_image(tmp_path, ep=0)
    journal = Journal(tmp_path / "j.jsonl")
    load(system, card, journal, 5_000)
    pay(system, card, journal, "ticket", "fig5")  # an honest payment, recorded by its PSAM
    (honest,) = payment_rows(system)
    # what T1 leaves: the server confirmed a FIG. 5 payment (MAC2 compared by itself after the
    # PSAM's hold ended), but CREDIT SAM never ran: no record in any PSAM
    psam = system.pay.payment_server.pool.psams[0]
    stamp = now_ms()
    ghost = {**{k: v for k, v in honest.items() if k != "id"}, "txn_id": "ab" * 16,
             "psam_id": psam.psam_id.hex(), "ttn": 4_000_000, "card_counter": 77,
             "card_serial": "00" * 10, "state": "confirmed", "tac": "01020304",
             "created": stamp, "updated": stamp}
    engine = make_pay_engine(system.pay.payment_server.config.db_url)
    with engine.begin() as conn:
        conn.execute(insert(payments).values(**{k: v for k, v in ghost.items()
                                                if k in payments.c}))
    # a. read from the PSAMs: the record is in no open batch -> a finding, at once
    readers = [p.reader for p in system.pay.payment_server.pool.psams]
    opened = psam_open_batches(readers)
    assert honest["ttn"] in opened[honest["psam_id"].upper()]
    assert 4_000_000 not in opened[psam.psam_id.hex().upper()]
    now = system.audit([card], open_batches=opened)
    assert named(now, ghost["txn_id"], "no PSAM record"), now.discrepancies
    assert not named(now, honest["txn_id"]), now.discrepancies
    # b. without the PSAMs: listed as not yet handed; past the maximum age, a finding
    young = system.audit([card])
    assert any(ghost["txn_id"] in u["text"] for u in young.unhanded)
    assert not named(young, ghost["txn_id"])
    old = system.audit([card], now=stamp + EIGHT_DAYS)
    assert named(old, ghost["txn_id"], "older than the maximum age"), old.discrepancies
    # c. its batch went to clearing without it: a finding, at once
    system.close_batches()
    system.run_clearing()
    path, number = batch_of(system, honest["psam_id"], honest["ttn"])
    with engine.begin() as conn:
        conn.execute(payments.update().where(payments.c.txn_id == ghost["txn_id"]).values(
            psam_id=honest["psam_id"], batch_number=number, batch=path.name))
    handed = system.audit([card])
    assert named(handed, ghost["txn_id"], "absent from batch"), handed.discrepancies
    assert not named(handed, honest["txn_id"])


# --- held records: listed with their age, a finding when old; superseded when never debited --

def test_held_records_are_listed_and_old_ones_fail_the_audit(
        system: System, tmp_path: Path) -> None:
    card = card_image(tmp_path, ep=0)
    journal = Journal(tmp_path / "j.jsonl")
    load(system, card, journal, 5_000)
    # the client takes the debit command and vanishes: the PSAM recorded the purchase at
    # once (FIG. 8), the card was never debited
    with pytest.raises(httpx.ConnectError):
        pay(system, card, journal, "ticket", "fig8", http=LoseOne("/v1/draw"))
    system.close_batches()
    system.run_clearing()
    report = system.audit([card])
    assert report.clean, report.discrepancies   # young: information, printed even when clean
    (held,) = report.held
    assert "records held by clearing: 1" in report.text() and held["text"] in report.text()
    stale = system.audit([card], now=now_ms() + EIGHT_DAYS)
    assert named(stale, f"TTN {held['ttn']}", f"PSAM {held['psam_id']}", "held"), \
        stale.discrepancies
    shorter = system.audit([card], max_age_ms=0, now=now_ms() + 1000)
    assert named(shorter, f"TTN {held['ttn']}")
    # the card's real next purchase uses the same counter and is cleared: the held record
    # was never debited, it is superseded and no longer a finding
    pay(system, card, journal, "song", "fig6")
    system.close_batches()
    assert system.run_clearing().total_paid == 99
    later = system.audit([card], now=now_ms() + EIGHT_DAYS)
    assert later.clean and later.held == [], later.discrepancies


# --- open loads, and refunds without evidence -------------------------------------------------

def load_row(txn_id: str, state: str, **values: Any) -> dict[str, Any]:
    stamp = now_ms()
    row = {"bank_id": "42414e4b30303031", "txn_id": txn_id, "state": state, "reason": "",
           "amount": 5_000, "currency_code": 156, "issuer_id": "", "card_serial": "11" * 10,
           "online_counter": 3, "s1": txn_id[:8], "created": stamp, "updated": stamp,
           **values}
    return {k: v for k, v in row.items() if k in loads.c}


def test_open_loads_are_listed_and_old_ones_fail_the_audit(system: System) -> None:
    # S2 issued, and the card's outcome never proven (the attacker keeps the S2 and says
    # nothing): the load stays open, with nothing refunded
    engine = make_load_engine(system.load.load_server.config.db_url)
    with engine.begin() as conn:
        conn.execute(insert(loads).values(**load_row("0a" * 16, "authorized")))
    report = system.audit([])
    assert report.clean, report.discrepancies
    assert [o["txn_id"] for o in report.open_loads] == ["0a" * 16]
    assert "open loads: 1" in report.text()
    stale = system.audit([], now=now_ms() + EIGHT_DAYS)
    assert named(stale, "0a" * 16, "outcome not proven", "older than the maximum age")


def test_every_refund_needs_a_proven_not_loaded(system: System) -> None:
    bank = BankDb(make_bank_engine(system.load.bank_server.config.db_url))
    engine = make_load_engine(system.load.load_server.config.db_url)
    has_evidence = "evidence" in loads.c
    cases = {  # txn id -> (load-DB row, refund backed?)
        "01" * 16: (load_row("01" * 16, "not_loaded", evidence=""), False),  # A1 / A2
        "02" * 16: (load_row("02" * 16, "not_loaded", evidence="probe"), has_evidence),
        "03" * 16: (load_row("03" * 16, "not_loaded", evidence="no-s2"), has_evidence),
        "04" * 16: (load_row("04" * 16, "not_loaded", online_counter=5,
                             evidence="counter-used:" + "05" * 16), has_evidence),
        "06" * 16: (load_row("06" * 16, "not_loaded", online_counter=6,
                             evidence="counter-used:" + "07" * 16), False),  # 07 not loaded
        "08" * 16: (load_row("08" * 16, "loaded"), False),
    }
    with engine.begin() as conn:
        for row, _ in cases.values():
            conn.execute(insert(loads).values(**row))
        conn.execute(insert(loads).values(**load_row("05" * 16, "loaded", online_counter=5,
                                                     s1="55555555")))
        conn.execute(insert(loads).values(**load_row("07" * 16, "refused", online_counter=6,
                                                     s1="77777777")))
    bank.create_account("mallory", "Mallory", 156, 100_000, "pw")
    for txn in cases:
        bank.debit_for_load("mallory", txn, 5_000, "11" * 10)
        assert bank.register(txn, False, "not loaded")
    bank.debit_for_load("mallory", "05" * 16, 5_000, "11" * 10)
    assert bank.register("05" * 16, True, "loaded")
    report = audit({}, load_dbs=(system.load.load_server.config.db_url,),
                   bank_dbs=(system.load.bank_server.config.db_url,), opening=0)
    for txn, (_, backed) in cases.items():
        found = named(report, f"bank load {txn}", "refunded")
        assert bool(found) != backed, (txn, report.discrepancies)
