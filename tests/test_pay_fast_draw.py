"""A draw without a held PSAM (FIG. 6, 7, 8) costs the loop one wait for the PSAM and the row's
step together: the PSAM's thread runs INIT SAM and gives the row's step to the SQLite writer
itself, and the loop wakes once, after that step's commit (draw.py ``_issue_and_record``).
FIG. 5 holds its PSAM on the loop before the row says "issued", so its step stays the loop's."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from svcard.host.pay import client as C
from svcard.host.pay.stack import Stack
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader

STATE = {"fig5": "issued", "fig6": "issued", "fig7": "released", "fig8": "released"}


@pytest.mark.parametrize("variant", sorted(STATE))
def test_the_psams_thread_gives_the_draws_step_to_the_writer(
        stack: Stack, card: Path, http: httpx.Client, tmp_path: Path, variant: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    writer = stack.payment_server.sql.executor
    assert writer is not None
    given: list[tuple[str, dict[str, Any]]] = []
    submit = writer.submit

    def seen(fn: Any, *args: Any, **kwargs: Any) -> Any:
        given.append((threading.current_thread().name, kwargs))
        return submit(fn, *args, **kwargs)

    monkeypatch.setattr(writer, "submit", seen)
    with open_reader(f"virtual:{card}") as reader:
        outcome = C.pay(stack.checkout_url("ticket", variant), reader,
                        journal=Journal(tmp_path / "journal.jsonl"), http=http)
    row = stack.payment_server.db.get(stack.merchant_server.config.merchant_id.hex(),
                                      outcome.txn_id)
    assert row is not None and row["state"] == "confirmed"
    issued = [name for name, kwargs in given if kwargs.get("state") == STATE[variant]]
    assert len(issued) == 1, given
    if variant == "fig5":
        assert issued[0] == threading.main_thread().name or not issued[0].startswith("psam")
    else:
        assert issued[0].startswith("psam"), issued
