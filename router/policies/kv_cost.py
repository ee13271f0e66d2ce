"""``kv_cost``: Dynamo-KV-router style. Cost of a candidate = prompt tokens it would have to
prefill (not in its approximate prefix cache) + ``load_weight`` x its queued prefill tokens; the
cheapest wins. ``load_weight`` 0.5 was the best of 0.5, 1 and 2 on the Mooncake trace
(docs/routing.md): a queued token costs less than an own one, since queued requests often hit
the cache and the quadratic part of a long prompt is its own."""
from __future__ import annotations

from typing import Sequence

from pdserve.base.types import LoadSnapshot
from router.policies.base import Choice, PolicyContext, RouteRequest
from router.policies.prefix_index import PrefixIndexes


class KvCostPolicy:
    """Minimum of uncached tokens plus weighted load."""

    name = "kv_cost"
    uses_prefix = True

    def __init__(self, ctx: PolicyContext = PolicyContext(), load_weight: float = 0.5) -> None:
        self.ctx, self.load_weight = ctx, load_weight
        self.indexes = PrefixIndexes(ctx.cache_blocks)

    def select(self, request: RouteRequest, candidates: Sequence[LoadSnapshot]) -> Choice:
        def cost(c: LoadSnapshot) -> tuple[float, str]:
            uncached = max(0, request.num_tokens - self.indexes[c.instance].match(request.block_hashes) * self.ctx.block_size)
            return uncached + self.load_weight * c.pending_prefill_tokens, c.instance

        best = min(candidates, key=cost)
        index = self.indexes[best.instance]
        reason = "affinity" if index.match(request.block_hashes) else "load"
        index.insert(request.block_hashes)
        return Choice(best.instance, reason)
