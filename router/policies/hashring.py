"""``HashRing``: consistent hashing with virtual nodes (used by consistent_hash and dualmap).

Adding or removing an instance moves only the keys of the ring segments its virtual nodes own,
about 1/N of all keys, never a global reshuffle.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
from typing import Iterable


def stable_hash(*parts: object, seed: int = 0) -> int:
    """A 64-bit hash that is the same in every process and run (unlike ``hash`` of a str)."""
    data = repr((seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=65536)
def _point(key: int, seed: int) -> int:
    """Where a key falls on a ring (``stable_hash``, remembered: a router sees the same keys, a
    conversation's and a shared prompt's, again and again)."""
    return stable_hash(key, seed=seed)


class HashRing:
    """A ring of ``vnodes`` points per member; ``seed`` makes independent rings."""

    def __init__(self, members: Iterable[str] = (), vnodes: int = 64, seed: int = 0) -> None:
        self.vnodes, self.seed = vnodes, seed
        self._points: list[tuple[int, str]] = []
        self.members: set[str] = set()
        self._last: tuple[str, ...] = ()
        self.sync(members)

    def sync(self, members: Iterable[str]) -> None:
        """Make the ring's members exactly ``members`` (adds and removes only the difference).
        Called on every routing decision: the same sequence as last time returns at once."""
        last = tuple(members) if isinstance(members, (list, tuple)) else ()
        if last and last == self._last:
            return
        self._last = last
        wanted = set(members)
        if wanted == self.members:
            return
        kept = [p for p in self._points if p[1] in wanted]
        added = [(stable_hash(m, v, seed=self.seed), m) for m in wanted - self.members for v in range(self.vnodes)]
        self._points = sorted(kept + added)
        self.members = wanted

    def lookup(self, key: int, exclude: str | None = None) -> str:
        """The member owning ``key`` (the first point clockwise), skipping ``exclude``."""
        if not self._points:
            raise LookupError("empty hash ring")
        h = _point(key, self.seed)
        i = bisect.bisect_left(self._points, (h, ""))
        for step in range(len(self._points)):
            member = self._points[(i + step) % len(self._points)][1]
            if member != exclude or len(self.members) == 1:
                return member
        raise LookupError("unreachable")
