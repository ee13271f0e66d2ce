"""``PrefixIndex``: an approximate view of what one instance holds in its prefix cache, built
from the requests routed to it (as SGLang's gateway keeps an approximate radix tree): an LRU set
of block hashes with the engine's capacity. Chained hashes make a set enough: a request's cached
prefix is the run of its leading block hashes present in the set."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence


class PrefixIndex:
    """LRU set of block hashes; ``capacity`` blocks."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[int, Any] = OrderedDict()

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` are held."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        """Record that the instance now holds these blocks (most recently used)."""
        self._put(hashes, None)

    def _put(self, hashes: Sequence[int], value: Any) -> None:
        for h in hashes:
            self._blocks[h] = value
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)

    def discard(self, hashes: Sequence[int]) -> None:
        """Forget these blocks (a request that placed them was moved elsewhere before it ran)."""
        for h in hashes:
            self._blocks.pop(h, None)

    def __len__(self) -> int:
        return len(self._blocks)


class PrefixIndexes(dict):
    """One ``PrefixIndex`` per instance name, created on first use."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def __missing__(self, instance: str) -> PrefixIndex:
        index = self[instance] = PrefixIndex(self.capacity)
        return index


class BlockOwners(PrefixIndex):
    """The instance each block hash was last placed on, for the ``capacity`` most recent blocks:
    where a request's longest known prefix lives, found in one lookup per block whatever the
    number of instances (DualMap's ``follow_owner``). A ``PrefixIndex`` whose entries name their
    instance."""

    def owner(self, hashes: Sequence[int], min_blocks: int = 1) -> str | None:
        """The instance of the longest run of leading ``hashes`` placed anywhere, if that run is
        at least ``min_blocks`` (>= 1) long (None otherwise)."""
        n = self.match(hashes)
        return self._blocks[hashes[n - 1]] if n and n >= min_blocks else None

    def place(self, hashes: Sequence[int], instance: str) -> None:
        """Record that ``instance`` now holds these blocks (most recent owner wins)."""
        self._put(hashes, instance)
