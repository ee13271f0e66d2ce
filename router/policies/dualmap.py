"""``dualmap``: cache affinity and load balance together (DualMap, ICLR'26), as published.

1. **Adaptive prefix key** (``adaptive_key``): a hotness tree over router blocks
   (``hotness.HotnessTree``). A prefix whose traffic share exceeds 2/n (n instances) lengthens the
   key of the requests under it; below 1/n it shortens again. Off: the key is the first block.
2. **Two candidates** from two independent hash rings with virtual nodes; if both hashes land on one
   instance, the second candidate is that instance's neighbour on the second ring.
3. **SLO-aware choice** (``slo_aware``): the candidate holding the longer cached prefix (per an
   approximate view of each instance's cache) is preferred, unless its predicted TTFT exceeds the
   TTFT SLO, then the other (``slo_switch``). Equal reuse: the lower predicted TTFT (``load``).
4. **TTFT estimate** (``queue_estimate``): an instance's wait is the sum of the predicted prefill
   seconds of each request queued there, each priced at its own length and cached prefix
   (``LoadSnapshot.queued_prefill_s``), plus this request's own uncached prefill. ``legacy`` prices
   the queued uncached tokens at the arriving request's per-token cost (the old estimate).
5. **Hotspot-aware rebalancing** (``rebalance_on``, paper §3.3): an instance whose queue violates the
   TTFT SLO moves queued, not-started requests to their other candidate when the predicted TTFT gain
   is positive and the target still meets the SLO; largest gain first, one round, until the source
   meets the SLO. With ``follow_moves`` the cache view follows each move.
6. **The prefix's owner** (``follow_owner``, not in the paper): a third candidate, the instance
   the request's longest known prefix was last placed on, when that prefix is longer than the
   request's key (``BlockOwners``, one lookup per block). A conversation whose last turn went
   elsewhere (by the SLO switch, the fallback, a move, or a key that changed length) follows its
   KV there; with two candidates it would recompute its whole history on the pair. The choice of
   item 3 runs over all three: the longest cached prefix predicted to meet the SLO, else the
   lowest predicted TTFT.
7. **SLO fallback** (``slo_fallback``, not in the paper): when the choice above is still predicted
   to miss the TTFT SLO (both candidates are loaded past it), ``slo_fallback`` more instances (a
   window of the others, in name order, from a random start) are priced the same way, and the
   lowest predicted TTFT among all is taken (``slo_fallback`` reason). The work per decision stays
   constant (at most 3 + ``slo_fallback`` instances); the paper's DualMap is ``slo_fallback=0`` and
   ``follow_owner=False``.
   Why it exists: docs/routing.md.
8. **Dual-hash-ring scaling**: rings are consistent, so adding or removing an instance remaps only
   the keys of its ring segments.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from typing import Callable, Sequence

from pdserve.base.types import LoadSnapshot
from router.policies.base import Choice, InstanceQueue, Move, PolicyContext, RouteRequest, cached_tokens
from router.policies.hashring import HashRing, stable_hash
from router.policies.hotness import HotnessTree
from router.policies.prefix_index import BlockOwners, PrefixIndexes

_REMEMBERED = 100_000
"""Routed requests whose candidates and placement are kept (for rebalancing)."""


class DualMapPolicy:
    """See the module docstring; parameters are documented in docs/routing.md."""

    name = "dualmap"
    uses_prefix = True

    def __init__(self, ctx: PolicyContext = PolicyContext(), vnodes: int = 64, max_key_blocks: int = 16,
                 window: int = 2000, min_hot_count: int = 8, adaptive_key: bool = True, slo_aware: bool = True,
                 queue_estimate: bool = True, rebalance_on: bool = True, follow_moves: bool = True,
                 expand_share_n: float = 2.0, contract_share_n: float = 1.0, slo_fallback: int = 8,
                 follow_owner: bool = True) -> None:
        self.ctx, self.slo_aware, self.queue_estimate = ctx, slo_aware, queue_estimate
        self.expand_share_n, self.contract_share_n = expand_share_n, contract_share_n
        self.adaptive_key, self.rebalance_on, self.follow_moves = adaptive_key, rebalance_on, follow_moves
        self.rings = (HashRing(vnodes=vnodes, seed=ctx.seed + 1), HashRing(vnodes=vnodes, seed=ctx.seed + 2))
        self.indexes = PrefixIndexes(ctx.cache_blocks)
        self.hotness = HotnessTree(window, max_key_blocks, min_hot_count)
        self._placed: OrderedDict[str, tuple[tuple[str, str], str, int]] = OrderedDict()
        self.slo_fallback, self._rng = slo_fallback, ctx.rng()
        self.follow_owner = follow_owner
        self.owners = BlockOwners(64 * ctx.cache_blocks)

    # ---- the two candidates ------------------------------------------------------------------
    def key(self, request: RouteRequest) -> int:
        """The request's prefix key (adaptive length; see the module docstring)."""
        hashes = request.block_hashes
        if not hashes:
            return stable_hash("no-full-block", request.request_id)
        return hashes[self._key_blocks(request) - 1]

    def _key_blocks(self, request: RouteRequest) -> int:
        """How many leading router blocks make the request's key."""
        return self.hotness.depth(request.block_hashes) if self.adaptive_key else 1

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
        names = sorted(by_name)
        pair = self.candidates(request, names)
        owner = self.owners.owner(request.block_hashes, self._key_blocks(request) + 1) if self.follow_owner else None
        options = [by_name[n] for n in dict.fromkeys((*pair, owner)) if n in by_name]
        choice = self._choose(request, options, pair)
        if self.slo_fallback and self.ctx.latency and choice.predicted_ttft_s > self._slo_s(request) > 0:
            choice = self._fall_back(request, choice, by_name, names, {c.instance for c in options})
        self._remember(request, pair, choice.instance, len(by_name))
        return choice

    def _choose(self, request: RouteRequest, options: list[LoadSnapshot], pair: tuple[str, str]) -> Choice:
        """Among the candidates (the hash ``pair``, and with ``follow_owner`` the instance the
        request's prefix was last placed on): the longest cached prefix that is predicted to meet
        the SLO (``affinity``, or ``owner`` when that is the third candidate), else the lowest
        predicted TTFT (``slo_switch``); with equal reuse everywhere, the lowest predicted TTFT
        (``load``). For two candidates this is the paper's rule (item 3)."""
        priced = []
        for c in options:
            hit = self.indexes[c.instance].match(request.block_hashes)
            priced.append((-hit, self.predicted_ttft_s(request, c, hit), c.instance, hit))
        fastest = min(priced, key=lambda p: (p[1], p[2]))
        if len({p[0] for p in priced}) == 1:
            return Choice(fastest[2], "load", fastest[1], self._cached(request, fastest[3]))
        slo_s = self._slo_s(request)
        meeting = [p for p in priced if not (self.slo_aware and slo_s) or p[1] <= slo_s]
        best = min(meeting) if meeting else fastest
        reason = "slo_switch" if best != min(priced) else "affinity" if best[2] in pair else "owner"
        return Choice(best[2], reason, best[1], self._cached(request, best[3]))

    def _fall_back(self, request: RouteRequest, choice: Choice, by_name: dict[str, LoadSnapshot],
                   names: list[str], priced: set[str]) -> Choice:
        """``choice``, or the instance of the fallback window with the lowest predicted TTFT below
        it (item 7)."""
        others = [n for n in names if n not in priced]
        start, best = self._rng.randrange(len(others)) if others else 0, choice
        least_own = self._own_s(request, len(request.block_hashes))  # with every block cached
        for name in (others + others)[start:start + min(self.slo_fallback, len(others))]:
            wait = self.wait_s(request, by_name[name])
            if wait + least_own >= best.predicted_ttft_s:
                continue  # not better even with its whole prompt cached there
            hit = self.indexes[name].match(request.block_hashes)
            t = wait + self._own_s(request, hit)
            if t < best.predicted_ttft_s:
                best = Choice(name, "slo_fallback", t, self._cached(request, hit))
        return best

    def predicted_ttft_s(self, request: RouteRequest, c: LoadSnapshot, hit_blocks: int) -> float:
        """Queue wait on ``c`` plus this request's own uncached prefill after its cached prefix
        (token counts if no latency model)."""
        return self.wait_s(request, c) + self._own_s(request, hit_blocks)

    def wait_s(self, request: RouteRequest, c: LoadSnapshot) -> float:
        """The queue wait part of ``predicted_ttft_s`` (queued tokens if no latency model)."""
        model = self.ctx.latency
        if model is None:
            return float(c.pending_prefill_tokens)
        if self.queue_estimate:
            return c.queued_prefill_s
        # the old estimate: queued tokens at this request's own per-token cost
        return c.pending_prefill_tokens * model.prefill_s(request.num_tokens) / max(request.num_tokens, 1)

    def prefill_s(self, request: RouteRequest, instance: str) -> float:
        """Predicted prefill seconds of ``request`` on ``instance`` alone (its cached prefix there)."""
        return self._own_s(request, self.indexes[instance].match(request.block_hashes))

    def _own_s(self, request: RouteRequest, hit_blocks: int) -> float:
        """The request's own prefill after ``hit_blocks`` cached blocks (uncached tokens if no model)."""
        cached = self._cached(request, hit_blocks)
        model = self.ctx.latency
        return model.prefill_s(request.num_tokens - cached, cached) if model else float(request.num_tokens - cached)

    def _cached(self, request: RouteRequest, hit_blocks: int) -> int:
        return cached_tokens(request.num_tokens, hit_blocks, self.ctx.block_size)

    def _slo_s(self, request: RouteRequest) -> float:
        return (request.ttft_slo_ms or self.ctx.ttft_slo_ms) / 1e3

    def _remember(self, request: RouteRequest, pair: tuple[str, str], chosen: str, n: int) -> None:
        if request.block_hashes:
            self.hotness.record(request.block_hashes, self.expand_share_n / n, self.contract_share_n / n)
        index = self.indexes[chosen]
        self._placed[request.request_id] = (pair, chosen, index.match(request.block_hashes))
        index.insert(request.block_hashes)
        self.owners.place(request.block_hashes, chosen)
        if len(self._placed) > _REMEMBERED:
            self._placed.popitem(last=False)

    # ---- hotspot-aware rebalancing ------------------------------------------------------------
    def rebalance(self, queues: Sequence[InstanceQueue]) -> list[Move]:
        """Moves of queued, not-started requests away from instances
        whose queue violates the TTFT SLO (module docstring, item 5). The caller must apply every
        move; this policy's cache view and placements already follow them."""
        if not self.rebalance_on:
            return []
        wait = {q.instance: q.wait_s() for q in queues}
        slo_s = self.ctx.ttft_slo_ms / 1e3
        if slo_s and min(wait.values(), default=slo_s) >= slo_s:
            return []  # every instance is past the SLO already: no move can meet it
        moves: list[Move] = []
        for q in sorted(queues, key=lambda q: -wait[q.instance]):
            if _violations(q, self._slo_s):
                moves += self._relieve(q, wait)
        return moves

    def _relieve(self, q: InstanceQueue, wait: dict[str, float]) -> list[Move]:
        """One round of moves off the violating queue ``q``, largest predicted gain first."""
        options, done = [], q.busy_s
        for item in q.items:
            done += item.prefill_s
            alt = self._alternate(item.request.request_id, q.instance)
            slo_s = self._slo_s(item.request)
            if alt in wait and not (slo_s and q.waited_s(item) + wait[alt] >= slo_s):  # else it cannot fit there
                there = self.prefill_s(item.request, alt)
                options.append((done - (wait[alt] + there), item, alt, there))
        moves, remaining = [], list(q.items)
        for gain, item, alt, there in sorted(options, key=lambda o: -o[0]):
            if gain <= 0 or not _violations(replace(q, items=tuple(remaining)), self._slo_s):
                break
            slo_s = self._slo_s(item.request)
            if slo_s and q.waited_s(item) + wait[alt] + there > slo_s:
                continue
            remaining.remove(item)
            wait[alt] += there
            wait[q.instance] -= item.prefill_s
            moves.append(Move(item.request.request_id, alt, there))
            self._moved(item.request, q.instance, alt)
        return moves

    def _alternate(self, request_id: str, instance: str) -> str | None:
        placed = self._placed.get(request_id)
        return next((c for c in placed[0] if c != instance), None) if placed else None

    def _moved(self, request: RouteRequest, source: str, target: str) -> None:
        pair, _, first_new = self._placed[request.request_id]
        self._placed[request.request_id] = (pair, target, self.indexes[target].match(request.block_hashes))
        if self.follow_moves:
            self.indexes[source].discard(request.block_hashes[first_new:])
            self.indexes[target].insert(request.block_hashes)
            self.owners.place(request.block_hashes, target)


def _violations(q: InstanceQueue, slo_s: Callable[[RouteRequest], float]) -> bool:
    """Whether any queued request of ``q`` is predicted to miss its TTFT SLO where it stands."""
    done = q.busy_s
    for item in q.items:
        done += item.prefill_s
        slo = slo_s(item.request)
        if slo and q.waited_s(item) + done > slo:
            return True
    return False
