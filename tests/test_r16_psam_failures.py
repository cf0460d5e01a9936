"""R-16: a PSAM whose disk write fails (a full disk, an I/O error) answers 6F00 and keeps its
memory as it was, and its next change leaves image, journal and memory in agreement: no record
lost, none replayed at the wrong place (card/storage.py, card/psam.py)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from test_psam_journal import CLOSE, CLOSE_AGAIN, buy, new_psam, psam_reader, send, state_on_disk

import svcard.card.storage as storage
from svcard.card.image import open_card
from svcard.card.journal_file import parse_journal
from svcard.card.storage import journal_path, read_image
from svcard.host.terminal import purse as T
from svcard.protocols import purse as P


def _full_disk(which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``write_atomically`` fails like a full disk for the image (``which`` = "image") or
    for the journal's replacement ("journal")."""
    real = storage.write_atomically

    def failing(path: Path, data: bytes, tear: Any = None) -> None:
        if path.name.endswith(".journal") == (which == "journal"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data, tear)

    monkeypatch.setattr(storage, "write_atomically", failing)


def _records(state: dict[str, Any]) -> list[int]:
    return [P.PsamRecord.parse(bytes.fromhex(r)).terminal_txn_number
            for r in state["closed_records"] + state["records"]]


def test_a_failed_close_then_a_purchase_loses_no_record(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The close's image write fails: 6F00, the batch stays open (in memory too), and the next
    purchase's CREDIT SAM does not overwrite a record of the batch on disk (before: the memory
    had closed the batch, the journal replayed ``put records[0]`` onto the old open batch, and
    TTN 1 was gone after a restart)."""
    path = new_psam(tmp_path, purchases=3)
    card = open_card(path)
    try:
        psam = psam_reader(card)
        _full_disk("image", monkeypatch)
        with pytest.raises(T.Declined) as refused:
            send(psam, CLOSE)
        assert refused.value.sw == 0x6F00
        monkeypatch.undo()
        live = card.apps[0].to_state()
        assert live["batch_number"] == 1 and len(live["records"]) == 3   # nothing changed
        buy(psam)
        live = card.apps[0].to_state()
    finally:
        card.close()
    state = state_on_disk(path)
    assert state == live
    assert _records(state) == [1, 2, 3, 4]
    card = open_card(path)
    try:   # the close the host asks again has every record
        header = P.BatchHeader.parse(send(psam_reader(card), CLOSE)[:P.BatchHeader.sizeof()])
    finally:
        card.close()
    assert (header.batch_number, header.record_count) == (1, 4)


def test_a_close_whose_image_is_written_is_answered_though_the_journal_is_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The closed batch is on disk once the image is renamed; the empty journal that follows
    is only housekeeping: its failure must not answer 6F00 for a close that happened (the host
    would close again and the batch would be closed twice over: the second answer an empty
    batch N+1, batch N never handed over)."""
    path = new_psam(tmp_path, purchases=2)
    card = open_card(path)
    try:
        psam = psam_reader(card)
        _full_disk("journal", monkeypatch)
        answer = send(psam, CLOSE)
        monkeypatch.undo()
        assert P.BatchHeader.parse(answer[:P.BatchHeader.sizeof()]).record_count == 2
        buy(psam)
        live = card.apps[0].to_state()
    finally:
        card.close()
    assert state_on_disk(path) == live
    assert live["batch_number"] == 2 and _records(live) == [1, 2, 3]
    card = open_card(path)
    try:
        assert send(psam_reader(card), CLOSE_AGAIN) == answer
    finally:
        card.close()


def test_a_journal_that_cannot_be_opened_refuses_the_change_and_keeps_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening the journal for the first append fails (too many open files): INIT SAM answers
    6F00 with nothing changed, and later purchases land where the memory has them (before: the
    memory kept the refused record, the next CREDIT SAM's ``put`` named an index the journal's
    image did not have, and the PSAM image could not be opened any more)."""
    path = new_psam(tmp_path, purchases=2)
    card = open_card(path)
    try:
        psam = psam_reader(card)
        before = card.apps[0].to_state()
        real_open = storage.os.open

        def no_journal(file: Any, flags: int, *args: Any) -> int:
            if str(file).endswith(".journal") and flags & os.O_APPEND:
                raise OSError(errno.EMFILE, "Too many open files")
            return real_open(file, flags, *args)

        monkeypatch.setattr(storage.os, "open", no_journal)
        with pytest.raises(T.Declined) as refused:
            buy(psam)
        assert (refused.value.step, refused.value.sw) == ("INIT SAM FOR PURCHASE", 0x6F00)
        monkeypatch.undo()
        assert card.apps[0].to_state() == before
        buy(psam)
        buy(psam)
        live = card.apps[0].to_state()
    finally:
        card.close()
    assert state_on_disk(path) == live
    assert _records(live) == [1, 2, 3, 4]
    assert parse_journal(journal_path(path).read_bytes()).torn_bytes == 0


@pytest.mark.parametrize("command", ["credit", "block"])
def test_a_failed_append_keeps_the_psams_memory_as_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    """CREDIT SAM and the blocked list: an append that fails answers 6F00 and changes nothing
    in the PSAM's memory either (an ISO 7816 error changes no state)."""
    path = new_psam(tmp_path, purchases=1)
    card = open_card(path)
    try:
        psam = psam_reader(card)
        real_write = storage.os.write

        def fail(fd: int, data: Any) -> int:
            raise OSError(errno.EIO, "Input/output error")

        if command == "credit":
            from svcard.host.terminal import apdus

            purse_reader = __import__("test_psam_journal").purse()
            T.call(psam, apdus.select(P.DEFAULT_PSAM_AID), "SELECT PSAM")
            # INIT SAM through the terminal code, then the CREDIT SAM append fails
            calls: list[bytes] = []
            real_call = T.call

            def spy(reader: Any, apdu: bytes, step: str) -> bytes:
                if reader is psam and apdu[1] == P.INS_CREDIT_SAM_FOR_PURCHASE:
                    calls.append(apdu)
                    monkeypatch.setattr(storage.os, "write", fail)
                    state = card.apps[0].to_state()
                    try:
                        return real_call(reader, apdu, step)
                    finally:
                        monkeypatch.setattr(storage.os, "write", real_write)
                        assert card.apps[0].to_state() == state
                return real_call(reader, apdu, step)

            monkeypatch.setattr(T, "call", spy)
            try:
                T.purchase(purse_reader, psam, 5)
            except T.Declined as exc:
                assert exc.sw == 0x6F00
            monkeypatch.setattr(T, "call", real_call)
            assert calls, "no CREDIT SAM was sent"
        else:
            before = card.apps[0].to_state()
            monkeypatch.setattr(storage.os, "write", fail)
            with pytest.raises(T.Declined):
                send(psam, bytes([0x80, 0x76, 0x01, 0x00, 0x08]) + bytes(range(8)))
            monkeypatch.setattr(storage.os, "write", real_write)
            assert card.apps[0].to_state() == before
        buy(psam)
        live = card.apps[0].to_state()
    finally:
        card.close()
    assert state_on_disk(path) == live
    assert read_image(path)["app"] == live


def test_reading_an_image_during_a_batch_close_is_not_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``svcard card show`` takes no lock: it may read the image just before the open card
    closes its batch and the journal just after (seq N+1 > N). That is a close in progress,
    not an old copy of the image: read again (before: refused as "newer than" the image)."""
    path = new_psam(tmp_path, purchases=2)
    old_image = path.read_bytes()
    card = open_card(path)
    try:
        send(psam_reader(card), CLOSE)
        live = card.apps[0].to_state()
    finally:
        card.close()
    real_read = storage._read_file
    reads: list[Path] = []

    def before_the_close_once(target: Path) -> dict[str, Any]:
        reads.append(target)
        if len(reads) == 1:   # the image as it was when the reader looked
            import json
            return dict(json.loads(old_image))
        return real_read(target)

    monkeypatch.setattr(storage, "_read_file", before_the_close_once)
    assert read_image(path)["app"] == live
    assert len(reads) == 2


def test_a_journal_grown_past_the_warning_size_is_named_at_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Nothing bounds a batch that is never closed; opening its PSAM reads the whole journal
    (100,000 purchases: 44 MB, seconds), so a journal past JOURNAL_WARN_CHANGES is named in a
    warning at open, with the remedy."""
    path = new_psam(tmp_path, purchases=3)   # 1 + 2 * 2 changes
    monkeypatch.setattr(storage, "JOURNAL_WARN_CHANGES", 4)
    with caplog.at_level("WARNING", logger="svcard.card.storage"):
        open_card(path).close()
    assert any("psam.json.journal holds 5 changes" in r.getMessage()
               and "close the batch" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.setattr(storage, "JOURNAL_WARN_CHANGES", 5)
    with caplog.at_level("WARNING", logger="svcard.card.storage"):
        open_card(path).close()
    assert not caplog.records
