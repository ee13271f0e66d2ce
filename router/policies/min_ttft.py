"""``min_ttft``: Mooncake's scheduler (FAST'25) as a baseline. Every candidate's predicted TTFT is
its queued prefill seconds plus this request's own prefill after the prefix that candidate holds
(per an approximate view of its cache); the lowest wins. A global view: it reads every candidate."""
from __future__ import annotations

from typing import Sequence

from pdserve.base.types import LoadSnapshot
from router.policies.base import Choice, PolicyContext, RouteRequest, cached_tokens
from router.policies.prefix_index import PrefixIndexes


class MinTtftPolicy:
    """Global minimum of predicted TTFT (token counts if no latency model)."""

    name = "min_ttft"
    uses_prefix = True

    def __init__(self, ctx: PolicyContext = PolicyContext()) -> None:
        self.ctx = ctx
        self.indexes = PrefixIndexes(ctx.cache_blocks)

    def select(self, request: RouteRequest, candidates: Sequence[LoadSnapshot]) -> Choice:
        scored = [(*self._ttft(request, c), c.instance) for c in candidates]
        ttft, cached, instance = min(scored)
        self.indexes[instance].insert(request.block_hashes)
        return Choice(instance, "affinity" if cached else "load", ttft, cached)

    def _ttft(self, request: RouteRequest, c: LoadSnapshot) -> tuple[float, int]:
        hit = self.indexes[c.instance].match(request.block_hashes)
        cached = cached_tokens(request.num_tokens, hit, self.ctx.block_size)
        model = self.ctx.latency
        if model is None:
            return float(c.pending_prefill_tokens + request.num_tokens - cached), cached
        return c.queued_prefill_s + model.prefill_s(request.num_tokens - cached, cached), cached
