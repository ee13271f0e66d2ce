"""``HotnessTree``: DualMap's adaptive prefix key (paper §3.2).

A request's key is the chained hash of its first L router blocks. L starts at 1 and grows along a
prefix's path only where that prefix is *expanded*: its share of the last ``window`` requests went
above ``expand_share`` (2/n for n instances: two candidates would hold more than their fair share).
An expanded prefix contracts again when its share falls below ``contract_share`` (1/n); the gap
between the two is the hysteresis that keeps keys stable. The key never goes past the prompt's last
full block nor ``max_depth`` blocks, so a conversation's turns keep one key as it grows.
"""
from __future__ import annotations

from collections import Counter, deque
from typing import Sequence


class HotnessTree:
    """Sliding-window traffic counts per prefix (a trie flattened by chained hashes)."""

    def __init__(self, window: int = 2000, max_depth: int = 16, min_count: int = 8) -> None:
        self.max_depth, self.min_count = max_depth, min_count
        self._window: deque[tuple[int, ...]] = deque(maxlen=window)
        self._counts: Counter[int] = Counter()
        self.expanded: set[int] = set()

    def depth(self, hashes: Sequence[int]) -> int:
        """Blocks in the request's key: past every expanded prefix on its path (at least 1)."""
        limit = min(len(hashes), self.max_depth)
        d = 1
        while d < limit and hashes[d - 1] in self.expanded:
            d += 1
        return d

    def record(self, hashes: Sequence[int], expand_share: float, contract_share: float) -> None:
        """Count one request's path and update the expanded set along it (and what left the window)."""
        path = tuple(hashes[:self.max_depth])
        if len(self._window) == self._window.maxlen:
            old = self._window[0]
            self._counts.subtract(old)
            self._update(old, expand_share, contract_share)
        self._window.append(path)
        self._counts.update(path)
        self._update(path, expand_share, contract_share)

    def share(self, prefix: int) -> float:
        """The prefix's share of the requests in the window."""
        return self._counts[prefix] / max(len(self._window), 1)

    def _update(self, path: Sequence[int], expand_share: float, contract_share: float) -> None:
        # counts against thresholds scaled by the window (share() inlined: called per block of
        # every request, it was a sixth of a DualMap decision)
        size, counts, expanded = max(len(self._window), 1), self._counts, self.expanded
        expand_at, contract_at = expand_share * size, contract_share * size
        for prefix in path[:-1]:  # a prompt's last block has nothing below it to expand into
            count = counts[prefix]
            if prefix in expanded:
                if count < contract_at:
                    expanded.discard(prefix)
            elif count >= self.min_count and count > expand_at:
                expanded.add(prefix)
            if count <= 0:
                del counts[prefix]
