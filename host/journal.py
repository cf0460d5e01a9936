"""The client terminal's local journal: one JSON line per step of a payment or load, fsynced
before the next exchange, so an interrupted transaction can be finished, or proven not to have
happened, on the next run.

A write is all or nothing: short writes are continued, and if the disk refuses the rest (full,
``EFBIG``, an I/O error) the file is cut back to its size before the write, synced, and
:class:`JournalError` is raised, so the client stops *before* the card or network step the line
was to record (a half line would otherwise be skipped on resume and hide that step). A torn tail
left by a crash is dropped before the next line is written (its step never happened: each line
is synced before its step).

The file holds account secrets and per-transaction session keys while a transaction is open: it
is created 0600, and once a transaction is final (:data:`DONE_STATES`) the journal is compacted:
rewritten atomically (temp file 0600, fsync, rename, folder fsync) with one line per transaction
and no secret fields (:data:`SECRET_FIELDS`, also inside ``params``) in finished ones.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from svcard.card.storage import write_atomically
from svcard.host.terminal import TerminalError

DONE_STATES = ("done", "abandoned", "refused", "load-done")
SECRET_FIELDS = ("secret", "tsk", "etsk")

log = logging.getLogger(__name__)


class JournalError(TerminalError, OSError):
    """The journal could not record a step (nothing of the line was kept): the client must not
    take the step. A :class:`~svcard.host.terminal.TerminalError` and an :class:`OSError`."""


def default_journal() -> Path:
    env = os.environ.get("SVCARD_JOURNAL")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "svcard" / "journal.jsonl"


def without_secrets(record: dict[str, Any]) -> dict[str, Any]:
    """A copy of a journal record with no secret fields, at the top or inside ``params``."""
    out = {k: v for k, v in record.items() if k not in SECRET_FIELDS}
    params = out.get("params")
    if isinstance(params, dict):
        out["params"] = {k: v for k, v in params.items() if k not in SECRET_FIELDS}
    return out


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, "the disk took no more bytes")
        view, offset = view[written:], offset + written


def _complete_size(fd: int) -> int:
    """The file's size up to and including its last newline (a torn tail is not counted)."""
    size = os.fstat(fd).st_size
    pos = size
    while pos > 0:
        start = max(0, pos - 4096)
        block = os.pread(fd, pos - start, start)
        cut = block.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        pos = start
    return 0


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, dict[str, Any]] = {}
        self._offset = 0     # the file is append-only: later reads parse only what is new
        self._inode: tuple[int, int] | None = None   # a compacted journal is a new file

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time, across processes (a lock file, since compaction replaces
        the journal file itself)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def write(self, txn_id: str, state: str, **data: Any) -> None:
        """Append one line, synced, or raise :class:`JournalError` having kept none of it."""
        line = (json.dumps({"txn_id": txn_id, "state": state, **data}) + "\n").encode()
        try:
            with self._locked():
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    size = _complete_size(fd)
                    if os.fstat(fd).st_size != size:
                        os.ftruncate(fd, size)  # a line torn by a crash: its step never ran
                    try:
                        _write_all(fd, line, size)
                        os.fsync(fd)
                    except OSError:
                        with contextlib.suppress(OSError):
                            os.ftruncate(fd, size)
                            os.fsync(fd)
                        raise
                finally:
                    os.close(fd)
                if state in DONE_STATES:
                    self._compact_locked()
        except OSError as exc:
            if isinstance(exc, JournalError):
                raise
            raise JournalError(exc.errno or errno.EIO,
                               f"the journal {self.path} cannot record '{state}' "
                               f"({exc.strerror or exc}): stopped before the next step") from None

    def compact(self) -> None:
        """Rewrite the journal with one line per transaction, finished ones without secrets."""
        with self._locked():
            self._compact_locked()

    def _compact_locked(self) -> None:
        entries = self._read_all()
        if not entries:
            return
        lines = []
        for record in entries.values():
            if record.get("state") in DONE_STATES:
                record = without_secrets(record)
            lines.append(json.dumps(record) + "\n")
        try:
            write_atomically(self.path, "".join(lines).encode())
        except OSError as exc:
            # the finished line is on disk; the secrets go at the next successful compaction
            log.warning("journal %s not compacted: %s", self.path, exc.strerror or exc)

    def _read_all(self) -> dict[str, dict[str, Any]]:
        self._entries, self._offset, self._inode = {}, 0, None
        return self.entries()

    def entries(self) -> dict[str, dict[str, Any]]:
        """The latest record of every transaction, earlier fields kept unless overwritten."""
        try:
            with self.path.open("rb") as fh:
                st = os.fstat(fh.fileno())
                inode = (st.st_dev, st.st_ino)
                if st.st_size < self._offset or inode != self._inode:  # replaced: start again
                    self._entries, self._offset, self._inode = {}, 0, inode
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            self._entries, self._offset, self._inode = {}, 0, None
            return {}
        complete = data.rfind(b"\n") + 1  # a torn last line is read again next time
        for line in data[:complete].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash mid-write
            self._entries.setdefault(rec["txn_id"], {}).update(rec)
        self._offset += complete
        return {k: dict(v) for k, v in self._entries.items()}

    def unfinished(self, card_serial: str) -> list[dict[str, Any]]:
        return [e for e in self.entries().values()
                if e.get("card_serial") == card_serial and e["state"] not in DONE_STATES]
