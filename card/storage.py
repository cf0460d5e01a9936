"""Where a card's persistent state lives: in memory, or in a JSON card image on disk.

An image is replaced atomically (write a temp file, fsync it, rename it over the image, fsync the
folder), so a power cut or ``kill -9`` at any instant leaves the old image or the new one. An
image is locked (``flock`` on ``IMAGE.lock``) by the one card that has it open; a second opener
waits up to its timeout and then fails with :class:`ImageLockedError`. The lock file lasts only
while the image is open: its maker removes it at close. The lock needs POSIX file
locks, so ``fcntl`` is imported only when an image is opened: reading, writing and building images
works where there is none (Windows), and opening one for a card says that it cannot.

An application whose state grows (the PSAM's open batch) hands each small change to
:meth:`ImageStore.append` instead: the change goes to an append-only journal beside the image
(``IMAGE.journal``, :mod:`svcard.card.journal_file`), one fsynced append, and the image is
rewritten only at a :meth:`ImageStore.commit` (the PSAM's batch close). The image then names
its journal: ``"journal": {"id": ID, "seq": N}`` at its top level. The journal's header holds
the same id and a seq; its changes apply to the image only when the seqs are equal. A commit
writes the image with seq N+1 first and then replaces the journal with an empty one of seq
N+1, so a power cut between the two leaves a journal of seq N, whose changes the new image
already holds: it is ignored, and replaced at the next change. The first change of an image
that has no journal yet (every image written before journals, its open batch inside it)
writes the image once more with its marker, after making the empty journal; an old journal
file found then (beside an image written anew, say) is set aside as
``IMAGE.journal.orphan-TIME-PID``, or removed when it holds no change. Opening an image never
writes anything: a stale journal, or a torn tail left by a power cut during an append, is
dealt with at the next change. :func:`read_image` gives the image with its journal's changes
applied and no marker (the same logical image as before journals).

Tests cut power with a *tear hook*: a callable told the name of each step of each write
(:data:`WRITE_STEPS`; a journal's replacement is ``journal-`` + each of them, an append
:data:`APPEND_STEPS`) that may raise :class:`PowerCut` to stop the card dead at that point.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .journal_file import (
    Change,
    Contents,
    JournalError,
    apply_change,
    encode_change,
    header_frame,
    parse_journal,
)

IMAGE_FORMAT = "svcard-card-image"
IMAGE_VERSION = 1
WRITE_STEPS = ("begin", "temp-written", "temp-synced", "renamed")
APPEND_STEPS = ("append-begin", "append-written", "append-synced")
JOURNAL_SUFFIX = ".journal"
# a journal with more changes than this is named in a warning when its image is opened: every
# open reads them all (100,000 purchases: 44 MB, read_image 1.4 s); only a batch close empties it
JOURNAL_WARN_CHANGES = 100_000
log = logging.getLogger(__name__)
READ_ATTEMPTS = 3  # read_image, while a card may close a batch between its two reads


def _datasync(fd: int) -> None:
    """fdatasync where there is one (not on macOS): an append needs its data and size only."""
    getattr(os, "fdatasync", os.fsync)(fd)


TearHook = Callable[[str], None]
ImageBuilder = Callable[[], dict[str, Any]]


class PowerCut(BaseException):
    """Raised by a tear hook: the card loses power here. Not an ``Exception`` on purpose, so
    no card code can swallow it."""


class ImageError(Exception):
    """A card image that cannot be read, written or understood."""


class ProfileError(ValueError):
    """A profile that cannot become a card; the message names the file and the field. Raised
    by :mod:`svcard.card.personalise` (which re-exports it) and defined here, beside
    :class:`ImageError`, so that commands catching both need not import pydantic."""


class ImageLockedError(ImageError):
    """Another card (in this or another process) has the image open."""


class Store(Protocol):
    def commit(self, build: ImageBuilder) -> None:
        """Make the image that ``build()`` returns the card's persistent state."""

    def append(self, change: Change, build: ImageBuilder) -> None:
        """Make one small change (:mod:`.journal_file`) to the image persistent; ``build()``
        gives the whole image with the change made, for a store that keeps no journal."""

    def close(self) -> None: ...


class MemoryStore:
    """State in memory only (lost with the object). It never serialises: ``image`` builds the
    JSON form only when asked."""

    def __init__(self) -> None:
        self._build: ImageBuilder | None = None
        self.commits = 0

    @property
    def image(self) -> dict[str, Any] | None:
        return self._build() if self._build else None

    def commit(self, build: ImageBuilder) -> None:
        self._build = build
        self.commits += 1

    def append(self, change: Change, build: ImageBuilder) -> None:
        self.commit(build)

    def close(self) -> None:
        pass


def journal_path(path: Path) -> Path:
    """Where the journal of the image at ``path`` lives."""
    return path.with_name(path.name + JOURNAL_SUFFIX)


def read_image(path: Path) -> dict[str, Any]:
    """Read and check a card image file (no lock taken), with its journal's changes applied
    and without its journal marker. A journal newer than the image read may be a batch close
    of the card that has it open, between the two reads: read again (a few times)."""
    for _ in range(READ_ATTEMPTS - 1):
        with contextlib.suppress(_JournalAhead):
            return _read_with_journal(Path(path)).image
    return _read_with_journal(Path(path)).image


class _JournalAhead(ImageError):
    """The journal has a greater seq than the image read."""


@dataclass
class _Opened:
    image: dict[str, Any]              # the journal's changes applied, no marker
    marker: tuple[str, int] | None     # the image's journal (id, seq), if it has one
    journal: Contents | None           # that journal, read
    stale: bool = False                # the journal is older than the image: not applied


def _read_with_journal(path: Path) -> _Opened:
    image = _read_file(path)
    marker = image.pop("journal", None)
    if marker is None:
        return _Opened(image, None, None)
    if (not isinstance(marker, dict) or not isinstance(marker.get("id"), str)
            or type(marker.get("seq")) is not int or marker["seq"] < 1):
        raise ImageError(f"{path}: journal: expected an id and a seq")
    journal_id, seq = marker["id"], marker["seq"]
    jpath = journal_path(path)
    try:
        contents = parse_journal(jpath.read_bytes(), str(jpath))
    except FileNotFoundError:
        raise ImageError(f"{path}: its journal {jpath.name} is missing (it holds the "
                         "image's latest changes): put it back beside the image") from None
    except OSError as exc:
        raise ImageError(f"cannot read {jpath}: {exc.strerror}") from None
    except JournalError as exc:
        raise ImageError(str(exc)) from None
    if contents.journal_id != journal_id:
        raise ImageError(f"{jpath} is the journal of another card image, not of {path}")
    if contents.seq > seq:
        raise _JournalAhead(f"{jpath} is newer than {path} (seq {contents.seq} > {seq}): an "
                         "older copy of the image?")
    if contents.seq < seq:  # cut between a commit's image write and its journal reset
        return _Opened(image, (journal_id, seq), contents, stale=True)
    app = image.get("app")
    if not isinstance(app, dict):
        raise ImageError(f"{path}: app: expected an object")
    for n, change in enumerate(contents.changes):
        try:
            apply_change(app, change)
        except JournalError as exc:
            raise ImageError(f"{jpath}: change {n + 1}: {exc}") from None
    return _Opened(image, (journal_id, seq), contents)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"no card image at {path}") from None
    except OSError as exc:
        raise ImageError(f"cannot read card image {path}: {exc.strerror}") from None
    try:
        image = json.loads(raw)
    except ValueError as exc:
        raise ImageError(f"{path} is not JSON: {exc}") from None
    if not isinstance(image, dict) or image.get("format") != IMAGE_FORMAT:
        raise ImageError(f"{path} is not an svcard card image")
    if image.get("version") != IMAGE_VERSION:
        raise ImageError(f"{path} has image version {image.get('version')!r}; "
                         f"this svcard reads version {IMAGE_VERSION}")
    return image


def write_atomically(path: Path, data: bytes, tear: TearHook | None = None) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file."""
    if tear:
        tear("begin")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # O_BINARY: Windows would otherwise write each "\n" as "\r\n" (POSIX has no such flag)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if tear:
                tear("temp-written")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # e.g. a full disk: the old file stays, and no half temp file is left
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if tear:
        tear("temp-synced")
    os.replace(tmp, path)
    if os.name == "posix":  # Windows opens no folder as a file: its rename is its own record
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    if tear:
        tear("renamed")


def encode_image(image: dict[str, Any]) -> bytes:
    return (json.dumps(image, indent=1, sort_keys=True) + "\n").encode()


def _open_lock_file(path: Path) -> tuple[int, bool]:
    """A descriptor on the lock file at ``path``, and whether this call made the file."""
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), True
        except FileExistsError:
            pass
        try:
            return os.open(path, os.O_RDWR), False
        except FileNotFoundError:
            continue  # removed between the two calls: make it


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path``."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


class ImageStore:
    """A card image on disk, locked while open, every commit atomic."""

    def __init__(self, path: str | os.PathLike[str], *, lock_timeout: float = 5.0,
                 tear: TearHook | None = None) -> None:
        self.path = Path(path)
        self.tear = tear
        self._lock_fd: int | None = None
        self._made_lock = False
        self._journal_fd: int | None = None
        self._lock(lock_timeout)
        try:
            opened = _read_with_journal(self.path)
        except BaseException:
            self.close()
            raise
        # the image as opened or last committed, with every change appended since applied
        self.image = opened.image
        if opened.journal and len(opened.journal.changes) > JOURNAL_WARN_CHANGES:
            log.warning("%s holds %d changes (%d bytes), all read at every open: close the "
                        "batch", journal_path(self.path), len(opened.journal.changes),
                        opened.journal.good_length)
        self._marker = opened.marker
        self._stale = opened.stale   # the journal on disk must be replaced before an append
        # where the journal's whole frames end (a torn tail after them is cut at the 1st append)
        self._good_length = opened.journal.good_length if opened.journal else 0
        # an append failed: what the card holds in memory may be ahead of the journal, so the
        # next change writes the whole image instead (as a failed image write would)
        self._whole_image_due = False
        self._clean_temp_files()

    def _lock(self, timeout: float) -> None:
        """Hold ``IMAGE.lock`` (``flock``, exclusive) until :meth:`close`.

        A lock file this store made is removed again at :meth:`close`, while still held, so
        opening an image (by a tool that only reads it, too) leaves no file behind. Removing
        a held lock file is safe because every opener, once it holds the lock, checks that the
        file it locked is still the one at the path, and starts over when it is not (the one
        it waited on was removed by the opener before it)."""
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        if not self.path.parent.is_dir():
            raise ImageError(f"no folder {self.path.parent}")
        try:
            import fcntl
        except ImportError:
            raise ImageError(f"cannot open card image {self.path} for a card: that needs POSIX "
                             "file locks (fcntl), which this system lacks; cards run on Linux "
                             "and macOS") from None
        deadline = time.monotonic() + timeout
        while True:
            fd, made = _open_lock_file(self._lock_path)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError as exc:
                        if exc.errno not in (errno.EAGAIN, errno.EACCES):
                            raise
                        if time.monotonic() >= deadline:
                            raise ImageLockedError(
                                f"card image {self.path} is in use by another card "
                                f"(waited {timeout:g} s for its lock)") from None
                        time.sleep(0.01)
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self._lock_path):
                self._lock_fd, self._made_lock = fd, made
                return
            os.close(fd)  # the file was removed (and perhaps made again) meanwhile: retry

    def _clean_temp_files(self) -> None:
        # A temp file left by a crash before its rename is not the image: drop it.
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()

    def commit(self, build: ImageBuilder) -> None:
        """Write the whole image; with a journal, the image's seq goes up by one and the
        journal is replaced by an empty one of that seq."""
        image = build()
        if self._marker is None:
            write_atomically(self.path, encode_image(image), self.tear)
            self.image = image
            return
        journal_id, seq = self._marker
        self._close_journal()
        try:
            write_atomically(self.path, encode_image({**image, "journal": {
                "id": journal_id, "seq": seq + 1}}), self.tear)
        except Exception:
            # the image on disk may be the old one (the journal then still counts) or, if
            # only the folder's fsync failed, the new one (the journal then no longer
            # counts): appending a change to either would replay it on the wrong base, so
            # the next change writes the whole image again
            self._whole_image_due = True
            raise
        self._marker, self._stale, self.image = (journal_id, seq + 1), True, image
        self._whole_image_due = False
        # an empty journal now, not at the next change: no dead weight. If that fails, the
        # image holds everything and the stale journal is replaced at the next change.
        with contextlib.suppress(OSError):
            self._open_journal()

    def append(self, change: Change, build: ImageBuilder) -> None:
        """Make ``change`` persistent with one fsynced append to the journal. An image without
        a journal gets one first: the whole image (the change in it) is written once, marked."""
        if self._marker is None:
            self._start_journal(build)
            return
        if self._whole_image_due:
            self.commit(build)
            return
        try:
            fd = self._journal_fd if self._journal_fd is not None else self._open_journal()
        except OSError:  # EMFILE, or a full disk replacing a stale journal: the card refuses
            self._whole_image_due = True  # the change, and a store's user that kept it in
            raise                         # memory all the same is written whole next time
        data = encode_change(change)
        if self.tear:
            self.tear("append-begin")
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.tear:
                self.tear("append-written")
            _datasync(fd)
        except OSError:
            self._close_journal()
            self._whole_image_due = True
            raise
        self._good_length += len(data)
        if self.tear:
            self.tear("append-synced")
        app = self.image.get("app")
        if isinstance(app, dict):
            apply_change(app, change)

    def _journal_tear(self, step: str) -> None:
        if self.tear:
            self.tear(f"journal-{step}")

    def _start_journal(self, build: ImageBuilder) -> None:
        """The first change of an image without a journal: an empty journal, then the image
        (the change in it) marked with it. A cut between them leaves an unmarked image and an
        empty journal, which the next first change removes."""
        jpath = journal_path(self.path)
        self._set_aside(jpath)
        journal_id = os.urandom(8).hex().upper()
        write_atomically(jpath, header_frame(journal_id, 1),
                         self._journal_tear if self.tear else None)
        image = build()
        write_atomically(self.path, encode_image({**image, "journal": {
            "id": journal_id, "seq": 1}}), self.tear)
        self._marker, self._stale, self.image = (journal_id, 1), False, image
        self._good_length = len(header_frame(journal_id, 1))

    def _set_aside(self, jpath: Path) -> None:
        """A journal file beside an image that names none is not its journal: removed when it
        holds no change, kept as ``.orphan-TIME`` otherwise."""
        try:
            data = jpath.read_bytes()
        except FileNotFoundError:
            return
        try:
            empty = not parse_journal(data, str(jpath)).changes
        except JournalError:
            empty = False
        if empty:
            jpath.unlink()
        else:
            stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
            os.replace(jpath, jpath.with_name(f"{jpath.name}.orphan-{stamp}-{os.getpid()}"))

    def _open_journal(self) -> int:
        """The journal, open for appends: replaced by an empty one when stale, else with any
        torn tail cut off."""
        assert self._marker is not None
        journal_id, seq = self._marker
        jpath = journal_path(self.path)
        if self._stale:
            header = header_frame(journal_id, seq)
            write_atomically(jpath, header, self._journal_tear if self.tear else None)
            self._stale, self._good_length = False, len(header)
        fd = os.open(jpath, os.O_WRONLY | os.O_APPEND | getattr(os, "O_BINARY", 0))
        try:
            if os.fstat(fd).st_size > self._good_length:  # a torn append: it never counted
                os.ftruncate(fd, self._good_length)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._journal_fd = fd
        return fd

    def _close_journal(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None

    def close(self) -> None:
        self._close_journal()
        if self._lock_fd is not None:
            if self._made_lock:  # removed while still held: see _lock
                with contextlib.suppress(OSError):
                    os.unlink(self._lock_path)
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
