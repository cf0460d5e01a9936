"""Seed 001 FIG. 3C over loopback with the real servers: a customer without a card (type A:
the SP pays from a purse of its pool) and a card holder (type B: ``pay.client`` with the
customer's own purse) buy at ONE merchant, in FIG. 5, 6 and 8. Its point of sale (the payment
server and its PSAMs) receives the same form of payment both times (claim 2): the payment
server's rows and the PSAM batch records have the same variant and the same fields, only the
card differs; both are cleared and paid to the merchant. FIG. 4A and 4B:
tests/test_sp_figures_pos.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from svcard.host.demo.system import System, card_image
from svcard.host.pay import client as PC
from svcard.host.pay.server.db import payments
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import messages as M
from svcard.protocols import purse as P

# what differs between two payments of one item by the nature of things (ids, time, MACs)
PER_PAYMENT = {"id", "txn_id", "card_serial", "card_counter", "psam_id", "ttn", "txn_date",
               "txn_time", "mac1", "expected_mac2", "card_mac2", "tac", "draw_digest",
               "debit_command", "response_digest", "result", "batch", "created", "updated"}


def payment_rows(system: System) -> list[dict[str, Any]]:
    with system.pay.payment_server.db.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(payments).order_by(payments.c.id))]


def batch_records(system: System) -> tuple[list[Any], list[str]]:
    """The records of the closed PSAM batches, and the card TACs handed with them."""
    records: list[Any] = []
    proofs: list[str] = []
    for path in sorted(system.batch_dir.glob("batch-*.json")):
        doc = json.loads(path.read_text())
        records += [P.PsamRecord.parse(bytes.fromhex(r)) for r in doc["records"]]
        proofs += list(doc["proofs"].values())
    return records, proofs


def pay_with_own_card(system: System, card: Path, folder: Path, sku: str, variant: str,
                      http: httpx.Client) -> PC.PaymentOutcome:
    """A type B customer: the merchant's checkout paid with the customer's own purse."""
    with open_reader(f"virtual:{card}") as reader:
        return PC.pay(system.pay.checkout_url(sku, variant), reader,
                      journal=Journal(folder / f"{card.stem}.jsonl"), http=http)


@pytest.mark.parametrize("variant", ["fig5", "fig6", "fig8"])
def test_fig3c_type_a_and_type_b_pay_one_merchant_the_same_way(
        system: System, tmp_path: Path, http: httpx.Client, variant: str) -> None:
    sp = system.start_sp(purses=1, ep=0, funds=20_000, topup_amount=5_000, variant=variant)
    alice = sp.customer("alice")                       # type A: no card, the SP pays
    bob = card_image(tmp_path, "bob.json", ep=5_000)   # type B: his own purse
    answer = sp.order(http, alice, "song")
    assert answer.status_code == 200, answer.text
    a = answer.json()
    b = pay_with_own_card(system, bob, tmp_path, "song", variant, http)
    assert (a["state"], a["line"]["wholesale"], b.amount) == ("billed", 99, 99)
    assert a["goods"] == b.goods                       # the same merchandise, both released
    # the merchant's POS: two payments that differ only in the card (and ids, times, MACs)
    rows = payment_rows(system)
    assert len(rows) == 2
    same = [{k: v for k, v in r.items() if k not in PER_PAYMENT} for r in rows]
    assert same[0] == same[1], same
    assert same[0]["variant"] == M.VARIANTS[variant] and same[0]["state"] == "confirmed"
    assert same[0]["merchant_id"] == "4d45524348303031" and same[0]["amount"] == 99
    filled = [{k for k, v in r.items() if v not in (None, "", 0)} for r in rows]
    assert filled[0] == filled[1]                      # the same fields present
    serials = {r["card_serial"] for r in rows}
    assert serials == {a["receipt"]["card_serial"].lower(), b.receipt["card_serial"].lower()}
    assert len(serials) == 2
    # the merchant's commerce server: two released orders, receipts of one form
    merchant = system.pay.merchant_server
    orders = [merchant.orders[t] for t in merchant.orders]
    assert sorted(o.state for o in orders) == ["paid", "paid"]
    assert {frozenset(o.receipt) for o in orders} == {frozenset(b.receipt)}
    # the PSAM batch: the same record form; both cleared and paid to the merchant
    system.close_batches()
    records, proofs = batch_records(system)
    assert len(records) == 2
    keep = ("issuer_id", "amount", "txn_type", "terminal_id", "status")
    assert len({tuple(getattr(r, k) for k in keep) for r in records}) == 1
    assert (records[0].amount, records[0].txn_type) == (99, P.TYPE_EP_PURCHASE)
    assert {r.card_serial for r in records} == {bytes.fromhex(s)[2:] for s in serials}
    # FIG. 5: the PSAM holds both TACs itself; FIG. 6 and 8 free the PSAM before the card
    # answers: both TACs travel as the batch's proofs
    assert len(proofs) == (0 if variant == "fig5" else 2)
    assert all((r.tac != bytes(4)) == (variant == "fig5") for r in records)
    report = system.run_clearing()
    assert (report.records_cleared, report.total_paid) == (2, 198)
    payouts = [ln for ln in report.lines if ln["kind"] == 3]
    assert [(ln["payee"], ln["count"], ln["amount"]) for ln in payouts] == [
        ("4D45524348303031", 2, 198)]
