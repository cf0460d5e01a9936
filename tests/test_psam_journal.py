"""The PSAM's journal (card/journal_file.py, card/storage.py): one small fsynced append per
purchase change, the image rewritten only at a batch close; power cut at every write step and
at every byte of an append; images from before journals; journals that are not the image's."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import demo_image, with_balance

from svcard.card.image import card_from_image, new_image, open_card, save_new_image
from svcard.card.journal_file import (
    MAX_FRAME,
    JournalError,
    apply_change,
    encode_change,
    header_frame,
    parse_journal,
)
from svcard.card.runtime import Card
from svcard.card.storage import (
    APPEND_STEPS,
    WRITE_STEPS,
    ImageError,
    PowerCut,
    journal_path,
    read_image,
)
from svcard.host.cli.main import main
from svcard.host.terminal import apdus
from svcard.host.terminal import purse as T
from svcard.protocols import purse as P
from svcard.reader import VirtualReader

WHEN = dt.datetime(2027, 3, 14, 15, 9, 26)
CLOSE = bytes([0x80, 0x7E, 0x00, 0x00])
CLOSE_AGAIN = bytes([0x80, 0x7E, 0x01, 0x00])


class Tear:
    """Counts write steps once armed, cuts power at step number ``cut_at``, and calls
    ``after`` with each step name that went through."""

    def __init__(self, cut_at: int | None = None,
                 after: Callable[[str], None] | None = None) -> None:
        self.cut_at, self.after = cut_at, after
        self.armed = False
        self.steps: list[str] = []

    def __call__(self, step: str) -> None:
        if not self.armed:
            return
        index = len(self.steps)
        self.steps.append(step)
        if index == self.cut_at:
            raise PowerCut(step)
        if self.after:
            self.after(step)


def purse() -> VirtualReader:
    # a fixed card random: every PSAM of a test signs the same purchases with the same MACs
    image = with_balance(demo_image("iep", fixed_random="A1B2C3D4"), ep=100_000)
    reader = VirtualReader(card_from_image(image))
    reader.connect()
    return reader


def psam_reader(card: Card) -> VirtualReader:
    reader = VirtualReader(card)
    reader.connect()
    return reader


def buy(psam: VirtualReader, amount: int = 5) -> None:
    T.purchase(purse(), psam, amount, when=WHEN)


def send(psam: VirtualReader, apdu: bytes) -> bytes:
    T.call(psam, apdus.select(P.DEFAULT_PSAM_AID), "SELECT PSAM")
    return T.call(psam, apdu, "PSAM")


def new_psam(folder: Path, name: str = "psam.json", purchases: int = 0) -> Path:
    """A PSAM image on disk, with ``purchases`` purchases already made through it."""
    path = folder / name
    save_new_image(path, demo_image("psam"), overwrite=True)
    if purchases:
        card = open_card(path)
        try:
            psam = psam_reader(card)
            for _ in range(purchases):
                buy(psam)
        finally:
            card.close()
    return path


def state_on_disk(path: Path) -> dict[str, Any]:
    """The PSAM as it comes back after power returns: opened afresh (read-only check too)."""
    merged = read_image(path)["app"]
    card = open_card(path)
    try:
        state = card.apps[0].to_state()
    finally:
        card.close()
    assert merged == state
    return state


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


# --- the frame format -----------------------------------------------------------------------
def test_a_torn_tail_is_dropped_at_every_byte_and_damage_before_it_is_refused() -> None:
    head = header_frame("00" * 8, 3)
    changes = [{"append": {"records": [f"{n:02X}" * 45]}, "set": {"next_ttn": n + 2}}
               for n in range(3)]
    frames = [encode_change(c) for c in changes]
    whole = head + b"".join(frames)
    done = parse_journal(whole)
    assert (done.journal_id, done.seq, done.changes, done.torn_bytes) == ("00" * 8, 3,
                                                                          changes, 0)
    start = len(whole) - len(frames[-1])
    for cut in range(start, len(whole)):
        for tail in (b"", b"\x00" * (len(whole) - cut), b"\xff" * (len(whole) - cut)):
            got = parse_journal(whole[:cut] + tail)
            assert got.changes == changes[:2] and got.good_length == start
            assert got.torn_bytes == cut - start + len(tail)
    # a bad frame with more than one frame's worth after it is damage, not a torn append
    flipped = bytearray(whole + encode_change({"set": {"x": "y" * 1500}}) * 2)
    flipped[len(head) + 10] ^= 1
    assert len(flipped) - len(head) > MAX_FRAME
    with pytest.raises(JournalError, match="damaged at byte"):
        parse_journal(bytes(flipped))
    with pytest.raises(JournalError, match="no journal header"):
        parse_journal(head[:-1])
    with pytest.raises(JournalError, match="not an svcard card journal"):
        parse_journal(encode_change({"set": {}}))


def test_changes_apply_in_order_and_a_change_that_does_not_fit_is_refused() -> None:
    app: dict[str, Any] = {"records": ["A"], "blocked": ["02"], "next_ttn": 2}
    for change in ({"append": {"records": ["B", "C"]}, "set": {"next_ttn": 4}},
                   {"put": {"records": [[1, "b"]]}}, {"add": {"blocked": ["01", "02"]}},
                   {"remove": {"blocked": ["02"]}}):
        apply_change(app, change)
    assert app == {"records": ["A", "b", "C"], "blocked": ["01"], "next_ttn": 4}
    for bad in ({"put": {"records": [[3, "x"]]}}, {"put": {"nothing": [[0, "x"]]}},
                {"append": {"next_ttn": ["x"]}}):
        with pytest.raises(JournalError):
            apply_change(app, bad)


# --- a purchase: one append per change, the image left alone ---------------------------------
def test_a_purchase_appends_to_the_journal_and_leaves_the_image_alone(tmp_path: Path) -> None:
    path = new_psam(tmp_path, purchases=1)      # the first change starts the journal
    image_bytes = path.read_bytes()
    assert json.loads(image_bytes)["journal"]["seq"] == 1
    card = open_card(path)
    try:
        psam = psam_reader(card)
        sizes = [journal_path(path).stat().st_size]
        for _ in range(20):
            buy(psam)
            sizes.append(journal_path(path).stat().st_size)
        send(psam, bytes([0x80, 0x76, 0x01, 0x00, 0x08]) + bytes(range(8)))  # block a card
        live = card.apps[0].to_state()
    finally:
        card.close()
    assert path.read_bytes() == image_bytes          # never rewritten by a purchase
    growth = {b - a for a, b in itertools.pairwise(sizes)}
    assert max(growth) - min(growth) <= 4 and max(growth) < 600   # flat, small
    assert len(live["records"]) == 21 and live["next_ttn"] == 22
    assert live["blocked"] == ["0001020304050607"]
    assert state_on_disk(path) == live
    contents = parse_journal(journal_path(path).read_bytes())
    # the first purchase's CREDIT SAM, then INIT SAM and CREDIT SAM each, then the block
    assert len(contents.changes) == 1 + 2 * 20 + 1
    # svcard card show reads the open batch through the journal
    shown = CliRunner().invoke(main, ["card", "show", str(path), "--json"], prog_name="svcard")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["open_batch_records"] == 21


def test_the_close_moves_the_batch_into_the_image_and_empties_the_journal(
        tmp_path: Path) -> None:
    path = new_psam(tmp_path, purchases=3)
    card = open_card(path)
    try:
        psam = psam_reader(card)
        records = list(card.apps[0].to_state()["records"])
        answer = send(psam, CLOSE)
        buy(psam)
    finally:
        card.close()
    raw = json.loads(path.read_bytes())
    assert raw["journal"]["seq"] == 2 and raw["app"]["records"] == []
    assert raw["app"]["closed_records"] == records and raw["app"]["batch_number"] == 2
    state = state_on_disk(path)
    assert len(state["records"]) == 1 and state["closed_records"] == records
    card = open_card(path)
    try:
        assert send(psam_reader(card), CLOSE_AGAIN) == answer
    finally:
        card.close()


# --- power cuts -----------------------------------------------------------------------------
def _cut_purchase(path: Path, cut: int | None,
                  snapshots: list[dict[str, Any]] | None = None) -> list[str]:
    card = open_card(path, tear=(tear := Tear(cut)))
    if snapshots is not None:
        tear.after = lambda step: (snapshots.append(card.apps[0].to_state())
                                   if step == "append-synced" else None)
    try:
        psam = psam_reader(card)
        tear.armed = True
        buy(psam)
    finally:
        card.close()
    return tear.steps


def test_power_cut_at_every_step_of_a_purchase(tmp_path: Path) -> None:
    dry = new_psam(tmp_path, "dry.json", purchases=2)
    before = state_on_disk(dry)
    snapshots: list[dict[str, Any]] = []
    steps = _cut_purchase(dry, None, snapshots)
    assert steps == list(APPEND_STEPS) * 2           # INIT SAM, CREDIT SAM: one append each
    after_init, after_credit = snapshots
    assert state_on_disk(dry) == after_credit
    # the state a cut at each step leaves: the last append that was written counts
    expected = [before, after_init, after_init, after_init, after_credit, after_credit]
    for cut, want in enumerate(expected):
        path = new_psam(tmp_path, f"cut{cut}.json", purchases=2)
        with pytest.raises(PowerCut):
            _cut_purchase(path, cut)
        assert state_on_disk(path) == want, steps[cut]
        _buy_again_and_check(path, want)


def _buy_again_and_check(path: Path, was: dict[str, Any]) -> None:
    """Power is back: the PSAM takes the next purchase, and its journal has no torn tail."""
    card = open_card(path)
    try:
        buy(psam_reader(card))
        live = card.apps[0].to_state()
    finally:
        card.close()
    assert len(live["records"]) == len(was["records"]) + 1
    assert live["next_ttn"] == was["next_ttn"] + 1
    assert parse_journal(journal_path(path).read_bytes()).torn_bytes == 0
    assert state_on_disk(path) == live


@pytest.mark.parametrize("which", ["init", "credit"])
def test_power_cut_at_every_byte_of_an_append(tmp_path: Path, which: str) -> None:
    """The append's frame reached the disk only up to some byte (the rest missing, zeros or
    ones): the PSAM comes back as before that change, and goes on."""
    dry = new_psam(tmp_path, "dry.json", purchases=1)
    before = state_on_disk(dry)
    snapshots: list[dict[str, Any]] = []
    _cut_purchase(dry, None, snapshots)
    after_init, after_credit = snapshots
    cut = 1 if which == "init" else 4              # "append-written" of that append
    unchanged, changed = (before, after_init) if which == "init" else (after_init, after_credit)
    source = new_psam(tmp_path, "source.json", purchases=1)
    jsource = journal_path(source)
    start = jsource.stat().st_size if which == "init" else None
    with pytest.raises(PowerCut):
        _cut_purchase(source, cut)
    whole = jsource.read_bytes()
    if start is None:   # the CREDIT SAM append is the last frame
        start = len(whole) - len(encode_change(_last_change(whole)))
    image = source.read_bytes()
    assert len(whole) - start > 100
    for length in range(start, len(whole) + 1):
        for fill in (b"",) if length == len(whole) else (b"", b"\x00", b"\xff"):
            path, jpath = tmp_path / "torn.json", journal_path(tmp_path / "torn.json")
            path.write_bytes(image)
            jpath.write_bytes(whole[:length] + fill * (len(whole) - length))
            want = changed if length == len(whole) else unchanged
            assert state_on_disk(path) == want, (length, fill)
            if length % 16 == 0 or length >= len(whole) - 1:  # going on: a sample of them
                _buy_again_and_check(path, want)


def _last_change(journal: bytes) -> dict[str, Any]:
    return parse_journal(journal).changes[-1]


def test_power_cut_at_every_step_of_a_batch_close(tmp_path: Path) -> None:
    dry = new_psam(tmp_path, "dry.json", purchases=3)
    before = state_on_disk(dry)
    card = open_card(dry, tear=(tear := Tear()))
    try:
        tear.armed = True
        answer = send(psam_reader(card), CLOSE)
    finally:
        card.close()
    after = state_on_disk(dry)
    assert tear.steps == [*WRITE_STEPS, *(f"journal-{s}" for s in WRITE_STEPS)]
    assert after["closed_records"] == before["records"] and after["records"] == []
    renamed = tear.steps.index("renamed")
    for cut in range(len(tear.steps)):
        path = new_psam(tmp_path, f"cut{cut}.json", purchases=3)
        card = open_card(path, tear=(tear := Tear(cut)))
        try:
            tear.armed = True
            with pytest.raises(PowerCut):
                send(psam_reader(card), CLOSE)
        finally:
            card.close()
        state = state_on_disk(path)   # never the batch twice (open and closed)
        assert state == (after if cut >= renamed else before), tear.steps[cut]
        card = open_card(path)
        try:
            psam = psam_reader(card)
            if cut >= renamed:
                assert send(psam, CLOSE_AGAIN) == answer   # the lost answer, again
            else:
                assert send(psam, CLOSE) == answer
            buy(psam)
        finally:
            card.close()
        state = state_on_disk(path)
        assert state["batch_number"] == 2 and len(state["records"]) == 1
        assert parse_journal(journal_path(path).read_bytes()).seq == 2
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_a_failed_append_leaves_no_partial_frame(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk error in the middle of an append (a full disk): the change is refused, and the
    next one goes after the last whole frame."""
    import svcard.card.storage as storage

    path = new_psam(tmp_path, purchases=1)
    card = open_card(path)
    try:
        psam = psam_reader(card)
        real_write = storage.os.write

        def half_then_fail(fd: int, data: Any) -> int:
            real_write(fd, bytes(data[:len(data) // 2]))
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(storage.os, "write", half_then_fail)
        with pytest.raises(T.Declined) as refused:
            buy(psam)
        assert (refused.value.step, refused.value.sw) == ("INIT SAM FOR PURCHASE", 0x6F00)
        monkeypatch.undo()
        assert parse_journal(journal_path(path).read_bytes()).torn_bytes > 0
        buy(psam)   # the whole image first (the card's memory may be ahead), then appends
        live = card.apps[0].to_state()
    finally:
        card.close()
    assert parse_journal(journal_path(path).read_bytes()).torn_bytes == 0
    assert json.loads(path.read_bytes())["journal"]["seq"] == 2
    assert state_on_disk(path) == live


# --- images from before journals, and journals that are not the image's ---------------------
def test_an_image_with_its_open_batch_inside_goes_on_with_a_journal(tmp_path: Path) -> None:
    memory = card_from_image(demo_image("psam"))
    psam = psam_reader(memory)
    for _ in range(4):
        buy(psam)
    old = memory.apps[0].to_state()
    path = tmp_path / "old.json"
    save_new_image(path, new_image("psam", old))
    assert "journal" not in json.loads(path.read_bytes()) and len(old["records"]) == 4
    files = digests(tmp_path)
    assert state_on_disk(path) == old
    assert digests(tmp_path) == files                # opening writes nothing
    card = open_card(path)
    try:
        psam = psam_reader(card)
        buy(psam)
        buy(psam)
        live = card.apps[0].to_state()
    finally:
        card.close()
    assert journal_path(path).exists() and "journal" in json.loads(path.read_bytes())
    assert live["records"][:4] == old["records"] and len(live["records"]) == 6
    assert state_on_disk(path) == live
    card = open_card(path)
    try:
        psam = psam_reader(card)
        header = P.BatchHeader.parse(send(psam, CLOSE)[:P.BatchHeader.sizeof()])
        assert header.record_count == 6
        first = send(psam, bytes([0x80, 0x7C, 0x00, 0x00, 0x05, 0x01, 0, 0, 0, 0]))
    finally:
        card.close()
    assert first.hex().upper() == old["records"][0]


def test_a_journal_left_beside_a_new_image_is_set_aside_not_replayed(tmp_path: Path) -> None:
    path = new_psam(tmp_path, purchases=3)
    old_journal = journal_path(path).read_bytes()
    save_new_image(path, demo_image("psam"), overwrite=True)   # a new PSAM, same file name
    assert state_on_disk(path)["records"] == []
    card = open_card(path)
    try:
        buy(psam_reader(card))
    finally:
        card.close()
    assert len(state_on_disk(path)["records"]) == 1
    orphans = [p for p in tmp_path.iterdir() if ".journal.orphan-" in p.name]
    assert [p.read_bytes() for p in orphans] == [old_journal]
    # an orphan that holds no change is simply removed
    save_new_image(path, demo_image("psam"), overwrite=True)
    journal_path(path).write_bytes(header_frame("AB" * 8, 1))
    card = open_card(path)
    try:
        buy(psam_reader(card))
    finally:
        card.close()
    assert len([p for p in tmp_path.iterdir() if ".journal.orphan-" in p.name]) == 1
    assert parse_journal(journal_path(path).read_bytes()).journal_id != "AB" * 8


def test_a_journal_that_is_missing_or_not_the_images_is_refused(tmp_path: Path) -> None:
    path = new_psam(tmp_path, purchases=2)
    jpath = journal_path(path)
    good = jpath.read_bytes()
    jpath.unlink()
    for opener in (read_image, open_card):
        with pytest.raises(ImageError, match=r"journal psam\.json\.journal is missing"):
            opener(path)
    contents = parse_journal(good)
    body = good[len(header_frame(contents.journal_id, contents.seq)):]
    for header, problem in ((header_frame("CD" * 8, contents.seq), "of another card image"),
                            (header_frame(contents.journal_id, contents.seq + 1), "is newer"),
                            (b"not a journal at all", "no journal header")):
        jpath.write_bytes(header + body)
        with pytest.raises(ImageError, match=problem):
            open_card(path)
    # and a journal whose change does not fit the image
    jpath.write_bytes(header_frame(contents.journal_id, contents.seq)
                      + encode_change({"put": {"records": [[99, "00"]]}}))
    with pytest.raises(ImageError, match="change 1"):
        read_image(path)
    jpath.write_bytes(good)
    assert len(state_on_disk(path)["records"]) == 2
    assert not (tmp_path / "psam.json.lock").exists()


_CHILD = """
import sys
from svcard.card.image import card_from_image, open_card
from svcard.card.personalise import image_from_profile
from svcard.fixtures import fixture_path
from svcard.host.terminal import purse as T
from svcard.reader import VirtualReader
image = image_from_profile(fixture_path("iep-demo.toml"))
image["app"]["ep"]["balance"] = 100_000
card = VirtualReader(card_from_image(image))
psam = VirtualReader(open_card(sys.argv[1], lock_timeout=30))
card.connect()
psam.connect()
for n in range(100_000):
    T.purchase(card, psam, 1)
    print(n + 1, flush=True)
"""


def test_kill_9_mid_purchase_leaves_a_consistent_psam(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    path = new_psam(tmp_path)
    seen = 0
    for round_ in range(5):
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        for _ in range(2 + 5 * round_):   # a varying number of purchases, then kill -9
            assert child.stdout.readline()
            seen += 1
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        state = state_on_disk(path)   # the dead child's lock went with it
        records = [P.PsamRecord.parse(bytes.fromhex(r)) for r in state["records"]]
        assert len(records) >= seen and state["next_ttn"] == len(records) + 1
        assert [r.terminal_txn_number for r in records] == list(range(1, len(records) + 1))
        # every purchase the PSAM finished is credited; only one per kill may wait for it
        assert sum(r.status == 1 for r in records) <= round_ + 1
        assert parse_journal(journal_path(path).read_bytes()).changes
