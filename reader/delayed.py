"""A stand-in for a slow physical card: every APDU waits a fixed delay, then goes to the real
reader underneath. Used to model real PSAMs (tens of milliseconds per APDU) in benchmarks;
spec ``delayed:MS:SPEC``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from .base import Reader


class DelayedReader(Reader):
    def __init__(self, inner: Reader, delay_ms: float) -> None:
        self.inner = inner
        self.delay = delay_ms / 1000
        self.name = f"delayed:{delay_ms:g}:{inner.name}"

    def connect(self) -> bytes:
        return self.inner.connect()

    def transmit(self, apdu: bytes) -> bytes:
        time.sleep(self.delay)
        return self.inner.transmit(apdu)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.inner.transaction():
            yield

    def disconnect(self) -> None:
        self.inner.disconnect()
