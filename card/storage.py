"""Where a card's persistent state lives: in memory, or in a JSON card image on disk.

An image is replaced atomically (write a temp file, fsync it, rename it over the image, fsync the
folder), so a power cut or ``kill -9`` at any instant leaves the old image or the new one. An
image is locked (``flock`` on ``IMAGE.lock``) by the one card that has it open; a second opener
waits up to its timeout and then fails with :class:`ImageLockedError`. The lock file lasts only
while the image is open: its maker removes it at close. The lock needs POSIX file
locks, so ``fcntl`` is imported only when an image is opened: reading, writing and building images
works where there is none (Windows), and opening one for a card says that it cannot.

Tests cut power with a *tear hook*: a callable told the name of each step of each write
(:data:`WRITE_STEPS`) that may raise :class:`PowerCut` to stop the card dead at that point.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

IMAGE_FORMAT = "svcard-card-image"
IMAGE_VERSION = 1
WRITE_STEPS = ("begin", "temp-written", "temp-synced", "renamed")

TearHook = Callable[[str], None]
ImageBuilder = Callable[[], dict[str, Any]]


class PowerCut(BaseException):
    """Raised by a tear hook: the card loses power here. Not an ``Exception`` on purpose, so
    no card code can swallow it."""


class ImageError(Exception):
    """A card image that cannot be read, written or understood."""


class ImageLockedError(ImageError):
    """Another card (in this or another process) has the image open."""


class Store(Protocol):
    def commit(self, build: ImageBuilder) -> None:
        """Make the image that ``build()`` returns the card's persistent state."""

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

    def close(self) -> None:
        pass


def read_image(path: Path) -> dict[str, Any]:
    """Read and check a card image file (no lock taken)."""
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
        self._lock(lock_timeout)
        try:
            self.image = read_image(self.path)
        except BaseException:
            self.close()
            raise
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
        image = build()
        write_atomically(self.path, encode_image(image), self.tear)
        self.image = image

    def close(self) -> None:
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
