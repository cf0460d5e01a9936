"""The client terminal's local journal: one JSON line per step of a payment or load, fsynced
before the next exchange, so an interrupted transaction can be finished, or proven not to have
happened, on the next run.

A write is all or nothing: short writes are continued, and if the disk refuses the rest (full,
``EFBIG``, an I/O error) the file is cut back to its size before the write, synced, and
:class:`JournalError` is raised, so the client stops *before* the card or network step the line
was to record (a half line would otherwise be skipped on resume and hide that step). A torn tail
left by a crash is dropped before the next line is written (its step never happened: each line
is synced before its step).

Secrets (:data:`SECRET_FIELDS`: the account secret, the TSK and ETSK, also inside ``params``)
never go into the journal itself: they are kept, while a transaction is open, in a small side
file of their own (``JOURNAL.secrets/TXN.json``, folder 0700, file 0600, written atomically
before the line that needs them), and that file is deleted once the transaction is final
(:data:`DONE_STATES`). So finishing a transaction costs one unlink, never a rewrite of the
journal, and the journal stays append-only (its readers parse only what is new).

A transaction's first line names the purse application it selected (``aid``, hex), so that its
resume selects the same one (:func:`entry_aid`; a line without it: svcard's default AID).

**Start-up flat in the history** (issue 16; a whole parse took 13 s at 100,000 payments in each
``svcard pay``/``load`` process): a reader that parsed :data:`CHECKPOINT_EVERY` bytes since the
last checkpoint writes ``JOURNAL.checkpoint`` (atomically, 0600): the offset, the open
transactions in order with their records, the last :data:`CHECKPOINT_RECENT` begun, the
journal's device, inode and SHA-256 of its first and last 4 KiB before the offset. A new reader
starts from a matching checkpoint and parses only what follows; any other is ignored and the
journal read whole. The journal is never rewritten for it; the checkpoint holds only journal
lines (no secret). :meth:`~Journal.entries`, ``in``/:meth:`~Journal.entry` for a transaction not
kept, and a later line of one (without ``card_serial``, which every first line names) read the
whole journal once per object: every answer is the one a whole read gives.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...card.storage import TearHook, write_atomically
from ...protocols import purse as P
from ...reader import Reader
from .purse import TerminalCheckFailed, TerminalError, select_purse

CHECKPOINT_EVERY = 64 * 1024    # bytes parsed past the last checkpoint before a new one
CHECKPOINT_RECENT = 64          # latest transactions the checkpoint keeps besides the open ones
_CHECKPOINT_MAX = 64 * 1024 * 1024
_SPAN = 4096                    # the journal bytes a checkpoint's digests cover at each end
DONE_STATES = ("done", "abandoned", "refused", "load-done", "unproven")
SECRET_FIELDS = ("secret", "tsk", "etsk")
# what an open step means for the money, said when a command stops with it open
_NOT_LOADED = "the card was not loaded; the bank re-credits your account once the load is closed"
PAYMENT_STEPS = {
    "draw": "the card was not debited",
    "debit-sent": "the card may have been debited",
    "card-refused": "the card refused the debit (it was not debited)",
    "debited": "the card was debited and the merchant has not confirmed it yet",
    "confirmed": "the card was debited; the merchant may have released the goods",
    "goods": "paid and the goods released; the card's proof has not reached the payment server",
}
LOAD_STEPS = {
    "load-starting": "the bank may have debited your account; the card was not loaded",
    "load-started": "the bank debited your account; the card was not loaded",
    "load-requested": "the bank debited your account; the card was not loaded",
    "load-command": "the card may have been loaded",
    "card-loaded": "the card was loaded and the load server has not confirmed it yet",
    "undecided": "the load server cannot tell yet whether the card was loaded",
    "load-confirmed": "the load server decided the load; the bank has not registered it yet",
}
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")

log = logging.getLogger(__name__)


class JournalError(TerminalError, OSError):
    """The journal could not record a step (nothing of the line was kept): the client must not
    take the step. A :class:`~svcard.host.terminal.purse.TerminalError` and an :class:`OSError`."""


def default_journal() -> Path:
    env = os.environ.get("SVCARD_JOURNAL")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "svcard" / "journal.jsonl"


def entry_aid(entry: dict[str, Any]) -> bytes:
    """The purse AID a journalled transaction was started with (its ``aid`` field, hex), which
    its resume selects again; an entry written before the journal kept the AID: svcard's
    default."""
    text = entry.get("aid")
    return bytes.fromhex(text) if isinstance(text, str) and text else P.DEFAULT_IEP_AID


def select_entry_purse(card: Reader, entry: dict[str, Any], selected: bytes) -> bytes:
    """Before a journalled transaction's card steps: SELECT the purse it was started with when
    ``selected`` (the AID selected now) is another, and check that purse is the entry's card
    (:class:`TerminalCheckFailed` if not). The AID selected afterwards."""
    aid = entry_aid(entry)
    if aid != selected:
        info = select_purse(card, aid)
        if info.app_serial != entry.get("card_serial"):
            raise TerminalCheckFailed(f"the purse {aid.hex().upper()} this transaction was "
                                      f"started with is another card's")
    return aid


def split_secrets(record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the record without secret fields, the secret fields), at the top or inside
    ``params``."""
    public = {k: v for k, v in record.items() if k not in SECRET_FIELDS}
    secrets = {k: record[k] for k in SECRET_FIELDS if k in record}
    params = record.get("params")
    if isinstance(params, dict):
        hidden = {k: params[k] for k in SECRET_FIELDS if k in params}
        if hidden:
            secrets["params"] = hidden
            public["params"] = {k: v for k, v in params.items() if k not in SECRET_FIELDS}
    return public, secrets


def merge_secrets(record: dict[str, Any], secrets: dict[str, Any]) -> dict[str, Any]:
    out = {**record, **{k: v for k, v in secrets.items() if k != "params"}}
    if isinstance(secrets.get("params"), dict):
        out["params"] = {**out.get("params", {}), **secrets["params"]}
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
        self.secrets_dir = path.with_name(path.name + ".secrets")
        self.checkpoint_path = path.with_name(path.name + ".checkpoint")
        self.checkpoint_every = CHECKPOINT_EVERY
        self._reset(None)
        self.touched: dict[str, None] = {}   # open transactions this object wrote, in order

    def _reset(self, inode: tuple[int, int] | None) -> None:
        self._entries: dict[str, dict[str, Any]] = {}
        self._open: dict[str, None] = {}   # open transactions, in the order first seen
        self._offset, self._mark = 0, b""   # append-only: read on from _offset; the bytes before
        self._inode = inode  # a replaced journal is read again
        self._whole, self._base = True, 0   # all held (no checkpoint read); the last one's offset

    @contextlib.contextmanager
    def _locked(self, wait: bool = True) -> Iterator[None]:
        """One writer at a time, across processes (a lock file beside the journal). POSIX
        file locks only: ``fcntl`` is imported here, so the module imports without it."""
        try:
            import fcntl
        except ImportError:
            raise JournalError(errno.ENOSYS, f"the journal {self.path} needs POSIX file locks "
                               "(fcntl), which this system lacks; the terminal runs on Linux "
                               "and macOS") from None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            yield
        finally:
            os.close(fd)

    def _secrets_file(self, txn_id: str) -> Path:
        name = txn_id if _SAFE_NAME.fullmatch(txn_id) else \
            hashlib.sha256(txn_id.encode()).hexdigest()
        return self.secrets_dir / f"{name}.json"

    def _secrets(self, txn_id: str) -> dict[str, Any]:
        try:
            data = json.loads(self._secrets_file(txn_id).read_bytes())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _keep_secrets(self, txn_id: str, secrets: dict[str, Any]) -> None:
        self.secrets_dir.mkdir(mode=0o700, exist_ok=True)
        kept = self._secrets(txn_id)
        merged = merge_secrets(kept, secrets) if kept else secrets
        write_atomically(self._secrets_file(txn_id), json.dumps(merged).encode())

    def _forget_secrets(self, txn_id: str) -> None:
        path = self._secrets_file(txn_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:  # the final line is on disk; say so, the next finish retries
            log.warning("journal secrets %s not removed: %s", path, exc.strerror or exc)
            return
        dir_fd = os.open(self.secrets_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def write(self, txn_id: str, state: str, **data: Any) -> None:
        """Append one line, synced, or raise :class:`JournalError` having kept none of it. Its
        secret fields go to the transaction's side file first; a final state deletes it."""
        self.touched[txn_id] = None
        public, secrets = split_secrets({"txn_id": txn_id, "state": state, **data})
        line = (json.dumps(public) + "\n").encode()
        try:
            with self._locked():
                if secrets:
                    self._keep_secrets(txn_id, secrets)
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
                    self._forget_secrets(txn_id)
                    self.touched.pop(txn_id, None)
        except OSError as exc:
            if isinstance(exc, JournalError):
                raise
            raise JournalError(exc.errno or errno.EIO,
                               f"the journal {self.path} cannot record '{state}' "
                               f"({exc.strerror or exc}): stopped before the next step") from None

    def _refresh(self, checkpoint: bool = True, force: bool = False,
                 tear: TearHook | None = None) -> None:
        """Parse what is new (all, or from a matching checkpoint, if the file was replaced)."""
        try:
            fh = self.path.open("rb")
        except FileNotFoundError:
            self._reset(None)
            return
        with fh:
            st = os.fstat(fd := fh.fileno())
            inode = (st.st_dev, st.st_ino)
            if st.st_size < self._offset or inode != self._inode or self._mark != os.pread(
                    fd, min(_SPAN, self._offset), max(0, self._offset - _SPAN)):  # or rewritten
                self._reset(inode)
                if checkpoint:
                    self._resume_from_checkpoint(fd, st)
            fh.seek(self._offset)
            data = fh.read()
            complete = data.rfind(b"\n") + 1  # a torn last line is read again next time
            if self._parse(data[:complete]):   # a line of a transaction not kept: read whole
                self._inode = None
                return self._refresh(False, force, tear)
            self._offset += complete
            self._mark = os.pread(fd, min(_SPAN, self._offset), max(0, self._offset - _SPAN))
            if self._offset and (force or self._offset - self._base >= self.checkpoint_every):
                self._save_checkpoint(fd, tear)

    def _parse(self, data: bytes) -> bool:
        """Fold lines in; True at a line of a transaction begun before the checkpoint, not kept."""
        entries, open_ = self._entries, self._open
        for line in data.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash mid-write
            txn = rec["txn_id"]
            if not self._whole and txn not in entries and "card_serial" not in rec:
                return True
            entries.setdefault(txn, {}).update(rec)
            if rec.get("state") in DONE_STATES:
                open_.pop(txn, None)
            else:
                open_[txn] = None
        return False

    def _digests(self, fd: int, offset: int) -> list[str]:
        return [hashlib.sha256(os.pread(fd, min(_SPAN, offset), at)).hexdigest()
                for at in (0, max(0, offset - _SPAN))]

    def _resume_from_checkpoint(self, fd: int, st: os.stat_result) -> None:
        """Start from the checkpoint if it matches this file; else the journal is read whole."""
        try:
            with self.checkpoint_path.open("rb") as cf:
                doc = json.loads(cf.read(_CHECKPOINT_MAX + 1)[:_CHECKPOINT_MAX])
            offset, entries, open_ = doc["offset"], doc["entries"], doc["open"]
            ok = (doc["version"] == 1 and [doc["dev"], doc["ino"]] == [st.st_dev, st.st_ino]
                  and type(offset) is int and 0 < offset <= st.st_size
                  and [doc["head"], doc["tail"]] == self._digests(fd, offset)
                  and all(isinstance(e, dict) for e in entries.values())
                  and all(isinstance(t, str) and t in entries for t in open_))
        except Exception as exc:   # unreadable, torn, or not a checkpoint: not used
            if not isinstance(exc, FileNotFoundError):
                log.debug("journal checkpoint %s not used: %s", self.checkpoint_path, exc)
            return
        if ok:
            self._entries, self._open = entries, dict.fromkeys(open_)
            self._offset = self._base = offset
            self._whole = False

    def _save_checkpoint(self, fd: int, tear: TearHook | None = None) -> None:
        """A checkpoint of what is parsed (skipped, never raised, e.g. in a read-only folder)."""
        self._base = self._offset
        keep = {*self._open, *itertools.islice(reversed(self._entries), CHECKPOINT_RECENT)}
        st = os.fstat(fd)
        head, tail = self._digests(fd, self._offset)
        doc = {"version": 1, "dev": st.st_dev, "ino": st.st_ino, "offset": self._offset,
               "head": head, "tail": tail, "open": list(self._open),
               "entries": {t: e for t, e in self._entries.items() if t in keep}}
        try:
            with self._locked(wait=False):   # held by a writer or another checkpoint: later
                write_atomically(self.checkpoint_path, json.dumps(doc).encode(), tear)
        except OSError as exc:
            log.debug("journal checkpoint %s not written: %s", self.checkpoint_path, exc)

    def checkpoint(self, tear: TearHook | None = None) -> None:
        """Write a checkpoint now (readers do every so often). ``tear``: a test's crash point."""
        self._refresh(force=True, tear=tear)

    def _read(self, txn_id: object = None) -> None:
        """Up to date; read whole (once) unless ``txn_id`` is among the transactions held."""
        self._refresh()
        if not self._whole and (txn_id is None or txn_id not in self._entries):
            self._inode = None
            self._refresh(checkpoint=False)

    def entries(self) -> dict[str, dict[str, Any]]:
        """The latest record of every transaction, earlier fields kept unless overwritten: the
        whole history, read whole (tools, tests; the hot path: unfinished, is_open, entry, in)."""
        self._read()
        return {k: dict(v) for k, v in self._entries.items()}

    def entry(self, txn_id: str) -> dict[str, Any] | None:
        """The latest record of one transaction (as :meth:`entries` gives it), or None."""
        self._read(txn_id)
        return dict(self._entries[txn_id]) if txn_id in self._entries else None

    def __contains__(self, txn_id: object) -> bool:
        self._read(txn_id)
        return txn_id in self._entries

    def unfinished(self, card_serial: str) -> list[dict[str, Any]]:
        """This card's open transactions, with the secrets their resume needs (only the open
        ones are looked at: the cost does not grow with the journal's history)."""
        self._refresh()
        return [merge_secrets(self._entries[t], self._secrets(t)) for t in self._open
                if self._entries[t].get("card_serial") == card_serial]

    def is_open(self, txn_id: str) -> bool:
        """The transaction is in the journal and not in a final state."""
        self._refresh()
        return txn_id in self._open


def open_steps(journal: Journal) -> list[str]:
    """What each transaction this journal object wrote and left open means, e.g. "the card may
    have been debited; the payment is journalled as TXN (step debit-sent)"."""
    journal._refresh()
    said = []
    for txn in [t for t in journal.touched if t in journal._open]:
        entry = journal._entries[txn]
        state = str(entry.get("state"))
        load = entry.get("kind") == "load"
        meaning = (LOAD_STEPS.get(state, _NOT_LOADED) if load
                   else PAYMENT_STEPS.get(state, "the payment is not finished"))
        said.append(f"{meaning}; the {'load' if load else 'payment'} is journalled as {txn} "
                    f"(step {state})")
    return said
