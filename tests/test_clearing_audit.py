"""Clearing, settlement and the money audit, over the whole system on loopback: loads, then
purchases in every variant, batches closed and cleared, a clean audit; then duplicate,
tampered and unproven batches and records, each refused or held with its reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import load_card as load

from svcard.fixtures import fixture_path
from svcard.host.demo.system import System, card_image
from svcard.host.pay import client as C
from svcard.host.settle.batches import check_batch
from svcard.host.settle.config import clearing_config
from svcard.host.settle.settlement_file import ClearingError, verify_settlement_file
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import purse as P

SVCARD = str(Path(sys.executable).parent / "svcard")


def pay(system: System, card: Path, journal: Journal, sku: str, variant: str) -> None:
    with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
        C.pay(system.pay.checkout_url(sku, variant), reader, journal=journal, http=http)


def test_load_pay_clear_and_a_clean_audit(system: System, tmp_path: Path) -> None:
    cards = [card_image(tmp_path, f"card{i}.json", ep=0) for i in range(2)]
    journal = Journal(tmp_path / "j.jsonl")
    for card in cards:
        load(system, card, journal, 5_000)
    spent = 0
    for variant in ("fig5", "fig6", "fig7", "fig8"):
        pay(system, cards[0], journal, "ticket", variant)
        pay(system, cards[1], journal, "song", variant)
        spent += 1250 + 99
    pay(system, cards[0], journal, "login", "fig6")  # authentication: no money
    before = system.audit(cards)
    assert before.clean, before.discrepancies
    assert before.figures["purchases unsettled"] == spent
    files = system.close_batches()
    assert len(files) == 2  # both PSAMs had records
    report = system.run_clearing()
    assert report.records_cleared == 8 and report.total_paid == spent
    assert report.loads_moved == 2 and report.total_loaded == 10_000
    assert {(ln["kind_name"], ln["amount"]) for ln in report.lines} == {
        ("loaded funds", 10_000), ("acquirer total", spent), ("merchant payout", spent)}
    after = system.audit(cards)
    assert after.clean, after.discrepancies
    assert after.figures["purchases settled"] == spent
    assert after.figures["float (ledger)"] == 10_000 - spent
    assert after.figures["card balances"] == 10_000 - spent
    # the fixed-layout file verifies, and says what the JSON Lines twin says
    blob = Path(report.settlement_file).read_bytes()
    config = clearing_config(fixture_path("clearing-demo.toml"))
    parsed = verify_settlement_file(config.settlement_key, blob)
    assert parsed["total_paid"] == spent and len(parsed["lines"]) == 3
    twin = [json.loads(x) for x in Path(report.jsonl_file).read_text().splitlines()]
    assert [t["amount"] for t in twin if t["type"] == "line"] == [
        ln["amount"] for ln in parsed["lines"]]
    with pytest.raises(ClearingError, match="MAC"):
        verify_settlement_file(config.settlement_key, blob[:-1] + bytes([blob[-1] ^ 1]))
    # the same batches again: refused as duplicates, nothing paid twice
    again = system.run_clearing()
    assert again.records_cleared == 0 and again.total_paid == 0 and again.loads_moved == 0
    assert all(b["state"] == "refused" and "duplicate batch" in b["reason"]
               for b in again.batches)
    assert system.audit(cards).clean


def test_tampered_batches_and_records(system: System, tmp_path: Path) -> None:
    card = card_image(tmp_path, ep=0)
    journal = Journal(tmp_path / "j.jsonl")
    load(system, card, journal, 5_000)
    for variant in ("fig5", "fig6"):
        pay(system, card, journal, "ticket", variant)
    (path, *_) = [Path(p) for p in system.close_batches()]
    doc = json.loads(path.read_text())
    folder = tmp_path / "tampered"
    folder.mkdir()
    # 1. a record's amount changed: the batch MAC no longer verifies
    rec = bytearray(bytes.fromhex(doc["records"][0]))
    rec[22:26] = (1).to_bytes(4, "big")
    bad_amount = {**doc, "records": [bytes(rec).hex(), *doc["records"][1:]]}
    (folder / "a.json").write_text(json.dumps(bad_amount))
    # 2. a wrong card TAC supplied for a record with no TAC of its own (the "proofs" are
    #    outside the batch MAC): the record is held, not refused (a forgery moves nothing)
    config = clearing_config(fixture_path("clearing-demo.toml"))
    records = [P.PsamRecord.parse(bytes.fromhex(r)) for r in doc["records"]]
    verdict = check_batch(config, path)
    assert verdict.state == "cleared" and all(r.state == "cleared" for r in verdict.records)
    early = [i for i, r in enumerate(records) if r.tac == bytes(4)]
    if early:
        wrong = {**doc, "proofs": {str(early[0]): "00000000"}}
        (folder / "b.json").write_text(json.dumps(wrong))
        v = check_batch(config, folder / "b.json")
        assert v.records[early[0]].state == "held"
        assert "TAC does not verify" in v.records[early[0]].reason
        # 3. no TAC at all: held, not paid
        (folder / "c.json").write_text(json.dumps({**doc, "proofs": {}}))
        v = check_batch(config, folder / "c.json")
        assert v.records[early[0]].state == "held"
    v = check_batch(config, folder / "a.json")
    assert v.state == "refused" and "batch MAC does not verify" in v.reason
    (folder / "d.json").write_text("{not json")
    assert "not a batch file" in check_batch(config, folder / "d.json").reason


def test_an_unproven_early_release_is_held_and_the_audit_stays_clean(
        system: System, tmp_path: Path) -> None:
    """FIG. 6: the PSAM recorded the purchase at once, but the client vanished before the
    card was debited. Clearing holds the record (no TAC); the card's next purchase reuses the
    counter and is cleared; the audit balances."""
    card = card_image(tmp_path, ep=0)
    journal = Journal(tmp_path / "j.jsonl")
    load(system, card, journal, 5_000)

    class Vanish(httpx.Client):
        def post(self, url: object, **kw: object) -> httpx.Response:  # type: ignore[override]
            response = super().post(url, **kw)  # type: ignore[arg-type]
            if "/v1/draw" in str(url):
                raise httpx.ConnectError("client gone")
            return response

    with Vanish(timeout=30) as http, open_reader(f"virtual:{card}") as reader, \
            pytest.raises(httpx.ConnectError):
        C.pay(system.pay.checkout_url("ticket", "fig6"), reader, journal=journal, http=http)
    pay(system, card, journal, "ticket", "fig6")  # a fresh purchase, same card counter
    system.close_batches()
    report = system.run_clearing()
    assert report.records_cleared == 1 and report.total_paid == 1250, report.batches
    held = sum(b["counts"].get("held", 0) for b in report.batches)
    assert held == 1
    result = system.audit([card])
    assert result.clean, result.discrepancies


def test_cli_clearing_and_audit(system: System, tmp_path: Path) -> None:
    card = card_image(tmp_path, ep=0)
    journal = Journal(tmp_path / "j.jsonl")
    load(system, card, journal, 3_000)
    pay(system, card, journal, "song", "fig7")
    system.close_batches()
    run = subprocess.run(
        [SVCARD, "clearing", "run", "--config", str(fixture_path("clearing-demo.toml")),
         "--batches", str(system.batch_dir), "--load-db", system.load.load_server.config.db_url,
         "--db", system.clearing_db, "--out", str(tmp_path / "out"), "--json"],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    settlement = json.loads(run.stdout)["settlement_file"]
    verify = subprocess.run([SVCARD, "clearing", "verify", settlement, "--config",
                             str(fixture_path("clearing-demo.toml"))],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and "MAC verified" in verify.stdout
    args = [SVCARD, "audit", "--card", str(card), "--payment-db",
            system.pay.payment_server.config.db_url, "--load-db",
            system.load.load_server.config.db_url, "--bank-db",
            system.load.bank_server.config.db_url, "--clearing-db", system.clearing_db]
    clean = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0 and "clean" in clean.stdout, clean.stdout + clean.stderr
    # a card that lost money nobody accounts for: the audit says so, exit code 1
    from svcard.card.image import save_new_image
    from svcard.card.storage import read_image
    image = read_image(card)
    image["app"]["ep"]["balance"] -= 1
    save_new_image(card, image, overwrite=True)
    dirty = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert dirty.returncode == 1 and "loads - purchases" in dirty.stdout
