"""J1 (issue 9): the client journal on a disk that fills mid-line, and secrets left behind.

Before the fix ``Journal.write`` ignored a short write: the torn "debit-sent" line was skipped on
resume and the payment abandoned as "never debited" without asking the card, although the card
was debited; and the journal kept account secrets and session keys (TSK, ETSK) for good.

The short writes here are real: a child process runs the payment with ``RLIMIT_FSIZE`` set (and
SIGXFSZ ignored) so that the kernel itself cuts the next journal line short.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from svcard.card.image import save_new_image
from svcard.card.storage import read_image
from svcard.host.demo.system import card_image
from svcard.host.load import client as LC
from svcard.host.load.stack import start_load_stack
from svcard.host.pay import client as C
from svcard.host.pay.stack import Stack, start_stack
from svcard.host.terminal.journal import SECRET_FIELDS, Journal, JournalError
from svcard.host.terminal.purse import TerminalError
from svcard.host.terminal.reader_specs import open_reader

# The attacked client: pays, and after the journal line ``stop_after`` the file may grow only
# ``slack`` bytes more, so the next line is cut short by the kernel.
CHILD = r'''
import json, resource, signal, sys
from pathlib import Path
import httpx
from svcard.card.image import card_from_image, new_image
from svcard.host.pay import client as C
from svcard.host.terminal.journal import Journal
from svcard.reader import VirtualReader

url, image_path, journal_path, stop_after, slack = sys.argv[1:6]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
card = card_from_image(json.loads(Path(image_path).read_text()))  # in memory: no card file


class FillsAfter(Journal):
    def write(self, txn_id, state, **data):
        super().write(txn_id, state, **data)
        if state == stop_after:
            limit = self.path.stat().st_size + int(slack)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


error = None
try:
    with httpx.Client(timeout=30) as http, VirtualReader(card) as reader:
        C.pay(url, reader, journal=FillsAfter(Path(journal_path)), http=http)
except Exception as exc:
    error = type(exc).__name__
print(json.dumps({"error": error, "image": new_image("iep", card.apps[0].to_state())}))
'''


def balance(card: Path) -> int:
    return int(read_image(card)["app"]["ep"]["balance"])


def run_child_payment(stack: Stack, card: Path, journal: Path, stop_after: str) -> str | None:
    """The payment in a child whose journal fills after ``stop_after``; the card image is
    written back from what the child's card holds at its end."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, stack.checkout_url(), str(card), str(journal),
         stop_after, "40"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    save_new_image(card, out["image"], overwrite=True)
    return out["error"]


@pytest.mark.parametrize(("stop_after", "card_debited"), [
    ("draw", False),        # the "debit-sent" line is cut: the DEBIT must never go out
    ("debit-sent", True),   # the "debited" line is cut: the card was debited
])
def test_a_disk_filling_mid_line_never_abandons_a_debited_payment(
        stack: Stack, tmp_path: Path, http: httpx.Client, stop_after: str,
        card_debited: bool) -> None:
    card = card_image(tmp_path, ep=10_000)
    journal_path = tmp_path / "journal.jsonl"
    error = run_child_payment(stack, card, journal_path, stop_after)
    assert error == "JournalError"  # the client stopped at the line it could not keep
    raw = journal_path.read_bytes()
    assert raw.endswith(b"\n")  # cut back: no torn line
    (entry,) = Journal(journal_path).entries().values()
    assert entry["state"] == stop_after
    assert balance(card) == (8_750 if card_debited else 10_000)
    # the next run resumes: whatever it decides agrees with the card
    journal = Journal(journal_path)
    with open_reader(f"virtual:{card}") as reader:
        (report,) = C.resume(reader, journal=journal, http=http)
    row = stack.payment_server.db.get(stack.merchant_server.config.merchant_id.hex(),
                                      entry["txn_id"])
    if card_debited:
        assert "abandoned" not in report["outcome"], report
        assert row is not None and row["state"] == "confirmed"
        assert balance(card) == 8_750
    else:
        assert report["outcome"].startswith("abandoned"), report
        assert balance(card) == 10_000
        assert row is None or row["state"] != "confirmed"
    assert journal.entries()[entry["txn_id"]]["state"] == "done" if card_debited else True


def test_a_full_journal_is_an_oserror_and_a_terminal_error(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.jsonl")
    journal.write("t1", "draw", card_serial="01")
    size = journal.path.stat().st_size
    child = r'''
import resource, signal, sys
from pathlib import Path
from svcard.host.terminal.journal import Journal, JournalError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = Path(sys.argv[1])
limit = path.stat().st_size + 10
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    Journal(path).write("t1", "debit-sent", debit="00" * 100)
except JournalError as exc:
    print("JournalError", exc.errno)
'''
    done = subprocess.run([sys.executable, "-c", child, str(journal.path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.split() == ["JournalError", str(27)], done.stderr  # EFBIG
    assert journal.path.stat().st_size == size
    assert issubclass(JournalError, OSError) and issubclass(JournalError, TerminalError)
    assert journal.entries()["t1"]["state"] == "draw"


def test_a_line_torn_by_a_crash_is_dropped_not_glued_to_the_next(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.jsonl")
    journal.write("t1", "draw", card_serial="01")
    with journal.path.open("ab") as fh:
        fh.write(b'{"txn_id": "t1", "state": "debit-se')  # the crash cut this line
    journal.write("t2", "draw", card_serial="02")
    entries = Journal(journal.path).entries()
    assert entries["t1"]["state"] == "draw" and entries["t2"]["state"] == "draw"


def _secrets_in(*files: Path) -> list[str]:
    text = "".join(f.read_text() for f in files)
    found = [f'"{name}"' for name in SECRET_FIELDS if f'"{name}"' in text]
    return found


def test_no_secret_survives_a_finished_payment_and_load(tmp_path: Path,
                                                        http: httpx.Client) -> None:
    journal_path = tmp_path / "journal.jsonl"
    journal = Journal(journal_path)
    card = card_image(tmp_path, ep=5_000)
    secret = "a-long-account-secret-7f3a"
    pay_stack = start_stack(tmp_path / "pay", psams=1)
    try:
        with open_reader(f"virtual:{card}") as reader:
            paid = C.pay(pay_stack.checkout_url(), reader, journal=journal, http=http)
    finally:
        pay_stack.close()
    load_stack = start_load_stack(tmp_path / "load")
    try:
        load_stack.account("alice", 50_000, secret)
        # while a load is open the journal needs its secrets to resume: look mid-way
        seen_open: list[list[str]] = []
        original = journal.write

        def spy(txn_id: str, state: str, **data: object) -> None:
            original(txn_id, state, **data)
            if state == "load-started":
                seen_open.append(_secrets_in(*journal.secrets_dir.iterdir()))
                assert _secrets_in(journal_path) == []  # never in the journal itself

        journal.write = spy  # type: ignore[method-assign]
        with open_reader(f"virtual:{card}") as reader:
            loaded = LC.load(load_stack.bank_url, reader, account="alice", secret=secret,
                             amount=2_000, journal=journal, http=http)
    finally:
        load_stack.close()
    assert loaded.outcome == "loaded" and paid.goods
    assert seen_open and seen_open[0]  # secrets were kept (aside) while the load was open
    raw = journal_path.read_bytes()
    assert secret.encode() not in raw
    assert _secrets_in(journal_path) == []
    assert list(journal.secrets_dir.iterdir()) == []  # removed once final
    entries = Journal(journal_path).entries()
    assert {e["state"] for e in entries.values()} <= {"done", "load-done"}
    assert stat.S_IMODE(os.stat(journal_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(journal.secrets_dir).st_mode) == 0o700
    assert not list(tmp_path.glob(".journal.jsonl.*.tmp"))
