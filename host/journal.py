"""The client terminal's local journal: one JSON line per step of a payment, fsynced before the
next exchange, so an interrupted payment can be finished, or proven not to have happened, on
the next run. The file holds per-transaction session keys: it is created 0600."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DONE_STATES = ("done", "abandoned", "refused", "load-done")


def default_journal() -> Path:
    env = os.environ.get("SVCARD_JOURNAL")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "svcard" / "journal.jsonl"


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, dict[str, Any]] = {}
        self._offset = 0     # the file is append-only: later reads parse only what is new

    def write(self, txn_id: str, state: str, **data: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps({"txn_id": txn_id, "state": state, **data}) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def entries(self) -> dict[str, dict[str, Any]]:
        """The latest record of every transaction, earlier fields kept unless overwritten."""
        try:
            with self.path.open("rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < self._offset:  # replaced or truncated: start again
                    self._entries, self._offset = {}, 0
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            self._entries, self._offset = {}, 0
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
