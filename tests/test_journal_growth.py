"""The client journal's start-up does not grow with its history (issue 16, point 2).

Before: every new ``Journal`` (each ``svcard pay``/``load`` process) parsed the whole file at its
first use (13 s at 100,000 payments). Now a reader starts from ``JOURNAL.checkpoint`` when it
matches the journal and parses only what follows; every answer (``unfinished``, ``is_open``,
``in``, ``entry``, ``entries``) is the one a whole read gives, also with a stale, forged or
torn checkpoint and after a crash (a raised tear point or a SIGKILL) at any step of writing one.
The randomised test prints its seed; replay with SVCARD_JOURNAL_GROWTH_SEED (steps:
SVCARD_JOURNAL_GROWTH_STEPS, default 400).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from svcard.host.terminal import journal as J
from svcard.host.terminal.journal import DONE_STATES, Journal

CARD = "0000000000000001"
OTHER = "0000000000000002"


def finished_lines(n: int, card: str = CARD) -> str:
    txn = f"t{n:08d}"
    steps = [{"state": "draw", "card_serial": card, "counter": n,
              "params": {"amount": 1250, "txn_id": txn, "description": "x" * 40}},
             {"state": "debit-sent", "debit": "00" * 24}, {"state": "debited", "tac": "1122"},
             {"state": "confirmed"}, {"state": "done", "goods": f"g{n}"}]
    return "".join(json.dumps({"txn_id": txn, **s}) + "\n" for s in steps)


def whole(path: Path) -> dict[str, Any]:
    """What a whole read of the journal says, folded here by hand (not by the code tested)."""
    entries: dict[str, dict[str, Any]] = {}
    open_: dict[str, None] = {}
    data = path.read_bytes() if path.exists() else b""
    for line in data[:data.rfind(b"\n") + 1].splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        entries.setdefault(rec["txn_id"], {}).update(rec)
        if rec.get("state") in DONE_STATES:
            open_.pop(rec["txn_id"], None)
        else:
            open_[rec["txn_id"]] = None
    return {"entries": entries, "open": list(open_)}


def assert_reads_as_whole(j: Journal, probes: list[str]) -> None:
    ref = whole(j.path)
    for card in (CARD, OTHER):
        got = [J.split_secrets(e)[0] for e in j.unfinished(card)]
        assert got == [ref["entries"][t] for t in ref["open"]
                       if ref["entries"][t].get("card_serial") == card]
    for txn in probes:
        assert j.is_open(txn) == (txn in ref["open"])
        assert (txn in j) == (txn in ref["entries"])
        assert j.entry(txn) == ref["entries"].get(txn)
    assert j.entries() == ref["entries"]
    assert list(j.entries()) == list(ref["entries"])   # first-seen order kept


class Counting:
    """Stands in for the journal module's ``json``: counts the lines it parses."""

    def __init__(self) -> None:
        self.loads_calls = 0

    def loads(self, data: Any) -> Any:
        self.loads_calls += 1
        return json.loads(data)

    def dumps(self, obj: Any) -> str:
        return json.dumps(obj)


def test_a_new_reader_parses_only_what_follows_the_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_text("".join(finished_lines(i) for i in range(2000)))   # 10,000 lines
    first = Journal(path)
    first.write("open1", "draw", card_serial=CARD, counter=1, params={"tsk": "AB" * 8})
    # the first reader parses the whole file (10,001 lines, ~1 MB) and leaves a checkpoint
    assert [e["txn_id"] for e in first.unfinished(CARD)] == ["open1"]
    later = Journal(path)
    later.write("open2", "draw", card_serial=CARD, counter=2)
    counting = Counting()
    monkeypatch.setattr(J, "json", counting)
    assert [e["txn_id"] for e in Journal(path).unfinished(CARD)] == ["open1", "open2"]
    # the checkpoint and the one line after it; before: every one of the 10,002 lines
    assert counting.loads_calls <= 3, counting.loads_calls
    monkeypatch.undo()
    assert_reads_as_whole(Journal(path), ["open1", "open2", "t00000000", "t00001999", "nope"])


def test_readers_write_checkpoints_on_their_own(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_text("".join(finished_lines(i) for i in range(200)))
    j = Journal(path)
    j.checkpoint_every = 4096
    assert j.unfinished(CARD) == []
    doc = json.loads(j.checkpoint_path.read_bytes())
    assert doc["offset"] == path.stat().st_size and doc["open"] == []
    assert len(doc["entries"]) == J.CHECKPOINT_RECENT   # bounded: not the 200 transactions
    assert os.stat(j.checkpoint_path).st_mode & 0o777 == 0o600


def test_the_checkpoint_holds_no_secret(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.jsonl")
    j.write("t1", "load-starting", card_serial=CARD, secret="hunter2-pw",
            params={"tsk": "C0FFEE" * 2, "etsk": "BEEF" * 4, "amount": 5})
    j.checkpoint()
    text = j.checkpoint_path.read_text()
    assert "hunter2-pw" not in text and "C0FFEE" not in text and "BEEF" not in text
    (entry,) = Journal(j.path).unfinished(CARD)   # the resume still gets them (side file)
    assert entry["secret"] == "hunter2-pw" and entry["params"]["tsk"] == "C0FFEE" * 2


@pytest.mark.parametrize("late", ["done-after-refused", "reopened"])
def test_a_late_line_of_a_transaction_the_checkpoint_did_not_keep(tmp_path: Path,
                                                                   late: str) -> None:
    """A transaction finished long ago (not among the kept) gets one more line: the reader
    that started from the checkpoint must not take that line for the whole transaction."""
    path = tmp_path / "journal.jsonl"
    old = "t00000000"
    path.write_text(json.dumps({"txn_id": old, "state": "draw", "card_serial": CARD,
                                "params": {"amount": 5}}) + "\n"
                    + json.dumps({"txn_id": old, "state": "refused", "reason": "x"}) + "\n"
                    + "".join(finished_lines(i) for i in range(1, 200)))
    Journal(path).checkpoint()
    assert old not in json.loads(path.with_name(path.name + ".checkpoint").read_text())["entries"]
    reader = Journal(path)
    assert reader.unfinished(CARD) == []        # started from the checkpoint
    if late == "done-after-refused":            # as the SP's journal does (409 after refused)
        Journal(path).write(old, "done", goods="g")
    else:
        Journal(path).write(old, "debited", tac="99")
    for j in (reader, Journal(path)):
        assert j.entry(old) == whole(path)["entries"][old]
        assert_reads_as_whole(j, [old, "t00000199", "nope"])
    if late == "reopened":
        (entry,) = Journal(path).unfinished(CARD)
        assert entry["params"] == {"amount": 5} and entry["tac"] == "99"


def _journal_with_checkpoint(tmp_path: Path) -> Journal:
    path = tmp_path / "journal.jsonl"
    path.write_text("".join(finished_lines(i) for i in range(50)))
    j = Journal(path)
    j.write("open1", "draw", card_serial=CARD, counter=7)
    j.checkpoint()
    return j


PROBES = ["open1", "open2", "t00000000", "t00000049", "x1", "nope"]


@pytest.mark.parametrize("change", [
    "replaced", "rewritten-in-place", "shorter", "garbage", "torn", "not-a-dict", "wrong-types",
    "other-journal"])
def test_a_checkpoint_that_does_not_match_is_not_used(tmp_path: Path, change: str) -> None:
    j = _journal_with_checkpoint(tmp_path)
    path, cp = j.path, j.checkpoint_path
    doc = json.loads(cp.read_bytes())
    if change == "replaced":            # another file under the name (a rotation, a restore)
        new = path.with_name("new")
        new.write_text(finished_lines(1) + finished_lines(2, OTHER)
                       + json.dumps({"txn_id": "x1", "state": "draw", "card_serial": CARD})
                       + "\n" + path.read_text()[:100])
        os.replace(new, path)
    elif change == "rewritten-in-place":   # same inode, other bytes, longer than the offset
        data = path.read_bytes()
        with path.open("r+b") as fh:
            fh.truncate(0)
            fh.write(data.replace(b'"t00000049", "state": "done"',
                                  b'"t00000049", "state": "dont"'))
            fh.write(finished_lines(77).encode())
        assert path.stat().st_size > doc["offset"]
    elif change == "shorter":
        with path.open("r+b") as fh:
            fh.truncate(doc["offset"] // 2)
    elif change == "garbage":
        cp.write_bytes(b"\x00{not json")
    elif change == "torn":
        cp.write_bytes(cp.read_bytes()[:len(cp.read_bytes()) // 2])
    elif change == "not-a-dict":
        cp.write_text(json.dumps([1, 2, 3]))
    elif change == "wrong-types":
        cp.write_text(json.dumps({**doc, "entries": [], "open": 5}))
    elif change == "other-journal":     # a checkpoint copied from another journal
        other = _journal_with_checkpoint(tmp_path / "o" if (tmp_path / "o").mkdir() is None
                                         else tmp_path)
        cp.write_bytes(other.checkpoint_path.read_bytes())
    assert_reads_as_whole(Journal(path), PROBES)


@pytest.mark.parametrize("point", ["begin", "temp-written", "temp-synced", "renamed"])
def test_a_crash_at_each_step_of_a_checkpoint_reads_the_same(tmp_path: Path,
                                                              point: str) -> None:
    j = _journal_with_checkpoint(tmp_path)
    j.write("open2", "debit-sent", card_serial=OTHER, debit="00")
    j.write("open1", "done")

    class Crash(Exception):
        pass

    def tear(at: str) -> None:
        if at == point:
            raise Crash(at)

    with pytest.raises(Crash):
        Journal(j.path).checkpoint(tear=tear)
    assert_reads_as_whole(Journal(j.path), PROBES)
    Journal(j.path).checkpoint()               # the next one is written whole
    assert json.loads(j.checkpoint_path.read_bytes())["offset"] == j.path.stat().st_size
    assert_reads_as_whole(Journal(j.path), PROBES)


CHILD = r"""
import json, sys
from pathlib import Path
from svcard.host.terminal.journal import Journal
path, n = Path(sys.argv[1]), 0
while True:   # a writer's lines and a reader's checkpoints, until killed
    j = Journal(path)
    j.checkpoint_every = 512
    j.write(f"k{n}", "draw", card_serial="0000000000000001", counter=n, pad="x" * 100)
    if n % 3:
        j.write(f"k{n}", "done")
    j.unfinished("0000000000000001")
    n += 1
    if n == 5:
        print("ready", flush=True)
"""


def test_sigkill_while_writing_lines_and_checkpoints_reads_the_same(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_text("".join(finished_lines(i) for i in range(100)))
    rng = random.Random(1616)
    for kill in range(6):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0, 0.3))   # a random moment of its work, not a wait for it
        child.send_signal(signal.SIGKILL)
        child.wait()
        txns = list(whole(path)["entries"])
        assert_reads_as_whole(Journal(path), [*rng.sample(txns, 5), "nope"])
        assert kill == 0 or path.with_name(path.name + ".checkpoint").exists()


def test_random_reads_and_writes_answer_as_a_whole_read(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    seed = int(os.environ.get("SVCARD_JOURNAL_GROWTH_SEED") or random.randrange(1 << 32))
    steps = int(os.environ.get("SVCARD_JOURNAL_GROWTH_STEPS") or 400)
    print(f"journal growth seed {seed} (replay: SVCARD_JOURNAL_GROWTH_SEED={seed})")
    rng = random.Random(seed)
    monkeypatch.setattr(J, "CHECKPOINT_RECENT", rng.choice((0, 2, 8)))   # few kept: more reads
    path = tmp_path / "journal.jsonl"
    readers: list[Journal] = []
    begun: set[str] = set()
    states = ["draw", "debit-sent", "debited", "load-starting", *DONE_STATES]
    for step in range(steps):
        roll = rng.random() if readers else 0.6   # a first reader before anything else
        if roll < 0.55:
            txn = f"r{rng.randrange(max(1, step // 3) + 1)}"
            w = rng.choice(readers) if readers and rng.random() < 0.5 else Journal(path)
            # as the clients write: the first line names the card, later ones carry some
            # other fields (so a record missing its earlier lines would show)
            first = txn not in begun
            begun.add(txn)
            more = {f"f{rng.randrange(6)}": step for _ in range(rng.randrange(3))}
            w.write(txn, rng.choice(states), **more,
                    **({"card_serial": rng.choice((CARD, OTHER)), "n": step} if first else {}))
        elif roll < 0.7:
            fresh = Journal(path)
            fresh.checkpoint_every = rng.choice((1, 300, 2000, 10**9))
            readers.append(fresh)
            if len(readers) > 4:
                readers.pop(0)
        elif roll < 0.75 and path.exists():   # a torn tail, as a crash mid-write leaves it
            with path.open("ab") as fh:
                fh.write(b'{"txn_id": "torn", "sta')
        elif roll < 0.8:
            rng.choice(readers).checkpoint()
        else:
            r = rng.choice(readers)
            known = list(whole(path)["entries"]) if path.exists() else []
            probes = [*rng.sample(known, min(3, len(known))), "nope"]
            try:
                assert_reads_as_whole(r, probes)
            except AssertionError:
                print(f"step {step} of seed {seed}")
                raise
    assert_reads_as_whole(Journal(path), ["nope"])
