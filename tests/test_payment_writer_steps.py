"""How many database steps one purchase costs the payment server (each a hand-off to the SQLite
writer thread, its CPU the issue-16 goal counts): 3 for FIG. 6-8 (draw: recorded, then issued or
released; debit response or proof: read and confirmed in one step), 5 for FIG. 5 (its PSAM is
held between reading the row and confirming it)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from svcard.host.pay import client as C
from svcard.host.pay.stack import Stack
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader

STEPS = {"fig5": 5, "fig6": 3, "fig7": 3, "fig8": 3}


@pytest.mark.parametrize("variant", sorted(STEPS))
def test_writer_steps_per_purchase(stack: Stack, card: Path, http: httpx.Client,
                                   tmp_path: Path, variant: str) -> None:
    writer = stack.payment_server.sql.executor
    assert writer is not None  # SQLite: one writer thread
    before = writer.steps
    with open_reader(f"virtual:{card}") as reader:
        outcome = C.pay(stack.checkout_url("ticket", variant), reader,
                        journal=Journal(tmp_path / "journal.jsonl"), http=http)
    row = stack.payment_server.db.get(stack.merchant_server.config.merchant_id.hex(),
                                      outcome.txn_id)
    assert row is not None and row["state"] == "confirmed"
    assert writer.steps - before == STEPS[variant]
