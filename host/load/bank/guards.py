"""The bank's guards on account secrets kept in memory: verified secrets remembered for a short
while (never the secret itself: an HMAC under a random key of this process), and wrong secrets
counted per client address in a sliding window. Both are bounded in size."""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import time


class SecretCache:
    """Verified (account, stored hash, secret) triples for a short while, each kept only as an
    HMAC under a random key of this process; bounded in size (oldest dropped first)."""

    def __init__(self, lifetime: float, max_entries: int = 10_000) -> None:
        self.lifetime, self.max_entries = lifetime, max_entries
        self._key = os.urandom(32)
        self._seen: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._hashes: collections.OrderedDict[str, str] = collections.OrderedDict()

    def known_hash(self, account: str) -> str | None:
        """The stored hash the account's secret was last verified against (a hint: the
        database must still hold it, and :meth:`hit` must still say yes)."""
        return self._hashes.get(account)

    def _tag(self, account: str, stored: str, secret: str) -> bytes:
        return hmac.new(self._key, b"\0".join(x.encode() for x in (account, stored, secret)),
                        hashlib.sha256).digest()

    def hit(self, account: str, stored: str, secret: str) -> bool:
        tag = self._tag(account, stored, secret)
        until = self._seen.get(tag)
        if until is None or until < time.monotonic():
            self._seen.pop(tag, None)
            return False
        return True

    def add(self, account: str, stored: str, secret: str) -> None:
        if self.lifetime <= 0:
            return
        self._seen[self._tag(account, stored, secret)] = time.monotonic() + self.lifetime
        self._hashes[account] = stored
        self._hashes.move_to_end(account)
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
        while len(self._hashes) > self.max_entries:
            self._hashes.popitem(last=False)


class AddressThrottle:
    """Wrong secrets per client address in a sliding window (in memory, bounded)."""

    def __init__(self, max_failures: int, window: float, max_addresses: int = 10_000) -> None:
        self.max_failures, self.window, self.max_addresses = max_failures, window, max_addresses
        self._failures: collections.OrderedDict[str, collections.deque[float]] = \
            collections.OrderedDict()

    def _recent(self, address: str, now: float) -> collections.deque[float]:
        times = self._failures.get(address, collections.deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        return times

    def blocked_for(self, address: str) -> float:
        now = time.monotonic()
        times = self._recent(address, now)
        if len(times) < self.max_failures:
            return 0.0
        return times[-self.max_failures] + self.window - now

    def failed(self, address: str) -> None:
        now = time.monotonic()
        times = self._recent(address, now)
        times.append(now)
        while len(times) > self.max_failures:
            times.popleft()
        self._failures[address] = times
        self._failures.move_to_end(address)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)
