"""``cache_aware``: SGLang-gateway style. Each instance gets an approximate view of its prefix
cache (``PrefixIndex``). While the pool is balanced, the candidate with the longest cached prefix
wins (if at least ``match_threshold`` of the prompt's blocks match: 0.5, SGLang's default, so a shared
system prompt alone is not affinity); otherwise, or when the pool is
imbalanced, the least loaded one wins.

Imbalanced means max - min queued prefill tokens > ``balance_abs_tokens`` and max > ``balance_rel``
x min (SGLang's two thresholds; ``balance_abs_tokens`` 131072 was the best of 8k, 32k and 128k on
the Mooncake trace, docs/routing.md).
"""
from __future__ import annotations

from typing import Sequence

from pdserve.base.types import LoadSnapshot
from router.policies.base import Choice, PolicyContext, RouteRequest, load_key
from router.policies.prefix_index import PrefixIndexes


class CacheAwarePolicy:
    """Approximate prefix tree per instance, switching to least-loaded above an imbalance."""

    name = "cache_aware"
    uses_prefix = True

    def __init__(self, ctx: PolicyContext = PolicyContext(), match_threshold: float = 0.5,
                 balance_abs_tokens: int = 131_072, balance_rel: float = 1.5) -> None:
        self.ctx, self.match_threshold = ctx, match_threshold
        self.balance_abs_tokens, self.balance_rel = balance_abs_tokens, balance_rel
        self.indexes = PrefixIndexes(ctx.cache_blocks)

    def select(self, request: RouteRequest, candidates: Sequence[LoadSnapshot]) -> Choice:
        choice = self._choose(request, candidates)
        self.indexes[choice.instance].insert(request.block_hashes)
        return choice

    def _choose(self, request: RouteRequest, candidates: Sequence[LoadSnapshot]) -> Choice:
        loads = [c.pending_prefill_tokens for c in candidates]
        if max(loads) - min(loads) > self.balance_abs_tokens and max(loads) > self.balance_rel * min(loads):
            return Choice(min(candidates, key=load_key).instance, "load")
        best = max(candidates, key=lambda c: (self.indexes[c.instance].match(request.block_hashes), -load_key(c)[0], c.instance))
        matched = self.indexes[best.instance].match(request.block_hashes)
        if request.block_hashes and matched / len(request.block_hashes) >= self.match_threshold:
            return Choice(best.instance, "affinity")
        return Choice(min(candidates, key=load_key).instance, "load")
