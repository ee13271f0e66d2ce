"""``consistent_hash``: prefix affinity on one hash ring; load is ignored.

Parameter ``prefix_blocks`` (default 2): the key is the chained hash of the first that many
blocks, so requests sharing that prefix always meet on one instance. Two blocks skip a single
shared system-prompt block (as in the Mooncake trace) while keeping a conversation's turns
together; more blocks spread more but lose affinity for shorter shared prefixes.
"""
from __future__ import annotations

from typing import Sequence

from pdserve.base.types import LoadSnapshot
from router.policies.base import Choice, PolicyContext, RouteRequest
from router.policies.hashring import HashRing, stable_hash


def prefix_key(request: RouteRequest, blocks: int) -> int:
    """The chained hash of the first ``blocks`` blocks (or of the whole prompt if shorter)."""
    if not request.block_hashes:
        return stable_hash("no-full-block", request.request_id)
    return request.block_hashes[min(blocks, len(request.block_hashes)) - 1]


class ConsistentHashPolicy:
    """Ring with virtual nodes over the live candidates."""

    name = "consistent_hash"
    uses_prefix = True

    def __init__(self, ctx: PolicyContext = PolicyContext(), prefix_blocks: int = 2, vnodes: int = 64) -> None:
        self.prefix_blocks = prefix_blocks
        self.ring = HashRing(vnodes=vnodes, seed=ctx.seed)

    def select(self, request: RouteRequest, candidates: Sequence[LoadSnapshot]) -> Choice:
        self.ring.sync(c.instance for c in candidates)
        return Choice(self.ring.lookup(prefix_key(request, self.prefix_blocks)), "affinity")
