"""``dualmap``: cache affinity and load balance together (DualMap, ICLR'26).

1. **Prefix key, adaptive length**: the chained hash of the first L blocks, where L is the first
   depth whose prefix is *not hot* (seen by at least ``min_hot_count`` and more than ``hot_share``
   of the last ``window`` requests), looked for up to ``max_key_blocks``. A system prompt shared by
   everyone is skipped (keying on it would send all traffic to two instances), while the turns of
   one conversation keep the same key (its first non-hot prefix does not change as it grows). If
   every depth up to the limit is hot, the key is the whole prompt: a hot prefix is then served
   (and cached) by many instances instead of crowding two.
2. **Two candidates** from two independent hash rings with virtual nodes (seeds 1 and 2); the
   second ring skips the first's pick, so the two always differ when two instances are live.
3. **SLO-aware choice**: the candidate holding the longer cached prefix (per an approximate view
   of each instance's cache) is preferred; if its predicted TTFT (queued prefill + this request's
   uncached prefill, from the latency model) exceeds the TTFT SLO and the other's is lower, the
   other is taken (``slo_switch``). With equal affinity, the lower predicted TTFT wins (``load``):
   power of two choices.
4. **Hotspot-aware rebalancing** (``rebalance``): queued, not-yet-started requests of an instance
   loaded above ``hot_factor`` x the mean move to their alternate candidate when that lowers the
   pair's maximum. Moves stay within each request's two candidates (selective, non-recursive).
5. **Dual-hash-ring scaling**: rings are consistent, so adding or removing an instance remaps only
   the keys of its ring segments.
"""
from __future__ import annotations

from collections import Counter, OrderedDict, deque
from typing import Mapping, Sequence

from pdserve.types import LoadSnapshot
from router.policies.base import Choice, PolicyContext, RouteRequest
from router.policies.hashring import HashRing, stable_hash
from router.policies.prefix_index import PrefixIndexes


class DualMapPolicy:
    """See the module docstring; parameters are documented in docs/routing.md."""

    name = "dualmap"

    def __init__(self, ctx: PolicyContext = PolicyContext(), vnodes: int = 64, max_key_blocks: int = 8,
                 hot_share: float = 0.05, min_hot_count: int = 8, window: int = 2000, hot_factor: float = 1.5,
                 slo_aware: bool = True) -> None:
        self.ctx, self.max_key_blocks, self.hot_share, self.slo_aware = ctx, max_key_blocks, hot_share, slo_aware
        self.min_hot_count = min_hot_count
        self.hot_factor = hot_factor
        self.rings = (HashRing(vnodes=vnodes, seed=ctx.seed + 1), HashRing(vnodes=vnodes, seed=ctx.seed + 2))
        self.indexes = PrefixIndexes(ctx.cache_blocks)
        self._window: deque[tuple[int, ...]] = deque(maxlen=window)
        self._prefix_counts: Counter[int] = Counter()
        self._pairs: OrderedDict[str, tuple[str, str]] = OrderedDict()

    # ---- the two candidates ------------------------------------------------------------------
    def key(self, request: RouteRequest) -> int:
        """The request's prefix key (adaptive length; see the module docstring)."""
        hashes = request.block_hashes
        if not hashes:
            return stable_hash("no-full-block", request.request_id)
        limit = min(len(hashes), self.max_key_blocks)
        depth = next((d for d in range(1, limit + 1) if not self._hot(hashes[d - 1])), len(hashes))
        return hashes[depth - 1]

    def _hot(self, prefix: int) -> bool:
        count = self._prefix_counts[prefix]
        return count >= self.min_hot_count and count > self.hot_share * len(self._window)

    def candidates(self, request: RouteRequest, names: Sequence[str]) -> tuple[str, str]:
        """The request's two candidate instances among ``names``."""
        for ring in self.rings:
            ring.sync(names)
        key = self.key(request)
        first = self.rings[0].lookup(key)
        return first, self.rings[1].lookup(key, exclude=first)

    # ---- choosing ----------------------------------------------------------------------------
    def select(self, request: RouteRequest, candidates: Sequence[LoadSnapshot]) -> Choice:
        by_name = {c.instance: c for c in candidates}
        pair = self.candidates(request, sorted(by_name))
        choice = self._choose(request, by_name[pair[0]], by_name[pair[1]])
        self._remember(request, pair, choice.instance)
        return choice

    def _choose(self, request: RouteRequest, a: LoadSnapshot, b: LoadSnapshot) -> Choice:
        hit_a, hit_b = (self.indexes[c.instance].match(request.block_hashes) for c in (a, b))
        t_a, t_b = self.predicted_ttft_s(request, a, hit_a), self.predicted_ttft_s(request, b, hit_b)
        if hit_a == hit_b or a.instance == b.instance:
            best, t_best = (a, t_a) if (t_a, a.instance) <= (t_b, b.instance) else (b, t_b)
            return Choice(best.instance, "load", t_best)
        (affine, t_aff), (other, t_other) = ((a, t_a), (b, t_b)) if hit_a > hit_b else ((b, t_b), (a, t_a))
        slo_s = (request.ttft_slo_ms or self.ctx.ttft_slo_ms) / 1e3
        if self.slo_aware and slo_s and t_aff > slo_s and t_other < t_aff:
            return Choice(other.instance, "slo_switch", t_other)
        return Choice(affine.instance, "affinity", t_aff)

    def predicted_ttft_s(self, request: RouteRequest, c: LoadSnapshot, hit_blocks: int) -> float:
        """Queue wait plus this request's own prefill on ``c`` (token counts if no model).

        The queue is other requests, each prefilled on its own: its wait is linear in the queued
        tokens, at this request's per-token cost (the quadratic term applies per request, never to
        the sum). The request's own prefill covers its uncached tokens after its cached prefix."""
        cached = min(hit_blocks * self.ctx.block_size, request.num_tokens - 1)
        uncached = max(1, request.num_tokens - cached)
        model = self.ctx.latency
        if model is None:
            return float(c.pending_prefill_tokens + uncached)
        per_token = model.prefill_s(request.num_tokens) / max(request.num_tokens, 1)
        return c.pending_prefill_tokens * per_token + model.prefill_s(uncached, cached)

    def _remember(self, request: RouteRequest, pair: tuple[str, str], chosen: str) -> None:
        if len(self._window) == self._window.maxlen:
            for h in self._window[0]:
                self._prefix_counts[h] -= 1
        prefix = request.block_hashes[:self.max_key_blocks]
        self._window.append(prefix)
        self._prefix_counts.update(prefix)
        self.indexes[chosen].insert(request.block_hashes)
        self._pairs[request.request_id] = pair
        if len(self._pairs) > 100_000:
            self._pairs.popitem(last=False)


    # ---- hotspot-aware rebalancing ------------------------------------------------------------
    def rebalance(self, queued: Mapping[str, Sequence[RouteRequest]], pending: Mapping[str, float]) -> list[tuple[str, str]]:
        """Moves ``(request_id, new_instance)`` for queued, not-started requests of overloaded
        instances; ``pending`` is each instance's queued prefill tokens. Pure: the caller applies
        the moves (the simulator does; see docs/routing.md for the live router)."""
        load = dict(pending)
        mean = sum(load.values()) / max(len(load), 1)
        moves = []
        for inst in sorted(load, key=load.get, reverse=True):
            for req in reversed(list(queued.get(inst, ()))):
                if load[inst] <= self.hot_factor * mean:
                    break
                alt = next((c for c in self._pairs.get(req.request_id, ()) if c != inst), None)
                if alt is not None and alt in load and load[alt] + req.num_tokens < load[inst]:
                    moves.append((req.request_id, alt))
                    load[inst] -= req.num_tokens
                    load[alt] += req.num_tokens
        return moves
