"""``ClusterSim``: a discrete-event simulation of N prefill and M decode instances that routes
with the live router's own policy classes.

Prefill instance: a FIFO server with an LRU prefix cache of ``cache_blocks`` blocks; a request's
service time is the latency model's prefill time of its uncached tokens after its cached prefix
(compute-bound prefill gains little from batching, so one request at a time). Then its KV moves to
a decode instance (prompt bytes / bandwidth). Decode instance: continuous batching, approximated
per request: its time per output token is the model's step time at the batch size and context it
joins (fluid approximation, so a 12,000-request trace simulates in a second or two).
Policies with a ``rebalance`` method (dualmap) are asked every ``rebalance_interval_s`` to move
queued, not-started requests.
"""
from __future__ import annotations

import heapq
import itertools
from collections import Counter
from dataclasses import dataclass, replace

from pdserve.base.types import LoadSnapshot
from pdserve.sim.queues import DecodeState, PrefillState, QueuedPrefill
from pdserve.sim.traces import TraceRequest
from router.latency import DEFAULT_KV_BANDWIDTH_BPS, DEFAULT_KV_BYTES_PER_TOKEN, DEFAULT_KV_TOKENS, LatencyModel
from router.policies import InstanceQueue, PolicyContext, RouteRequest, make_policy
from router.policies.base import REBALANCE_WINDOW

ARRIVE, PREFILL_DONE, DECODE_START, DECODE_DONE, REBALANCE = range(5)
_PERIODIC = (REBALANCE,)


@dataclass(frozen=True)
class SimConfig:
    """The simulated cluster."""

    prefill: int = 16
    """Prefill instances."""
    decode: int = 16
    """Decode instances."""
    block_size: int = 512
    """Tokens per block hash (512 for the Mooncake trace)."""
    cache_blocks: int = 600
    """Prefix-cache capacity of one prefill instance, blocks."""
    ttft_slo_s: float = 100.0
    """TTFT target (the capacity search's criterion)."""
    tpot_slo_s: float = 0.0
    """TPOT target (reported only; 0: none)."""
    kv_bytes_per_token: int = DEFAULT_KV_BYTES_PER_TOKEN
    """KV bytes of one token (SmolLM2-135M, bf16)."""
    kv_bandwidth_bps: float = DEFAULT_KV_BANDWIDTH_BPS
    """KV transfer bandwidth (gRPC on loopback, measured here: 650-785 MiB/s)."""
    decode_kv_tokens: int = DEFAULT_KV_TOKENS
    """KV capacity of one decode instance, tokens (1 GiB on CPU)."""
    rebalance_interval_s: float = 1.0
    """How often policies with ``rebalance`` are consulted: this, or 1/100 of the TTFT SLO if
    longer (the live router's 250 ms poll against seconds of SLO)."""
    warmup: int = 0
    """Leading requests excluded from attainment (they run, warming caches, but are not scored)."""
    routers: int = 1
    """Router replicas. Arrival i goes to replica i mod ``routers``; each replica has its own policy
    (cache view, hotness, rebalancing of the requests it queued) and, as the live router's
    admission queue, knows the work it queued itself exactly and the other replicas' only as of
    their last load report."""
    report_interval_s: float = 0.25
    """How often replicas see each other's queued work (the live router's load poll)."""
    seed: int = 0


@dataclass
class RunResult:
    """Per-request outcomes of one simulated run."""

    scale: float
    ttft_s: list[float]
    tpot_s: list[float]
    cached_tokens: int
    input_tokens: int
    busy_s: list[float]
    decisions: Counter
    ttft_slo_s: float
    warmup: int = 0

    @property
    def attainment(self) -> float:
        """Share of the scored requests (after the warm-up) whose TTFT met the SLO."""
        scored = self.ttft_s[self.warmup:]
        return sum(t <= self.ttft_slo_s for t in scored) / max(len(scored), 1)

    @property
    def hit_ratio(self) -> float:
        """Prompt tokens served from prefix caches / all prompt tokens."""
        return self.cached_tokens / max(self.input_tokens, 1)

    @property
    def imbalance_cv(self) -> float:
        """Coefficient of variation of per-instance prefill busy time."""
        mean = sum(self.busy_s) / len(self.busy_s)
        var = sum((b - mean) ** 2 for b in self.busy_s) / len(self.busy_s)
        return var ** 0.5 / mean if mean else 0.0


class ClusterSim:
    """One simulated run per ``run`` call (fresh instances and policies each time)."""

    def __init__(self, cfg: SimConfig, latency: LatencyModel, prefill_policy: str,
                 decode_policy: str = "decode_p2c", policy_params: dict | None = None) -> None:
        self.cfg, self.latency = cfg, latency
        self.prefill_policy, self.decode_policy, self.policy_params = prefill_policy, decode_policy, policy_params or {}

    def run(self, requests: list[TraceRequest], scale: float = 1.0) -> RunResult:
        """Replay ``requests`` with arrivals compressed ``scale`` times (2.0 = twice the rate)."""
        ctx = PolicyContext(block_size=self.cfg.block_size, cache_blocks=self.cfg.cache_blocks, latency=self.latency,
                            ttft_slo_ms=self.cfg.ttft_slo_s * 1e3, seed=self.cfg.seed)
        routers = max(1, self.cfg.routers)
        self._p_policies = [make_policy(self.prefill_policy, replace(ctx, replica=r), **self.policy_params)
                            for r in range(routers)]
        self._p_policy = self._p_policies[0]
        self._d_policy = make_policy(self.decode_policy, ctx)
        every = self.cfg.report_interval_s if routers > 1 else 0.0
        self._prefills = [PrefillState(f"prefill-{i}", own=[[0, 0.0] for _ in range(routers)],
                                       reported=[(0, 0.0)] * routers, report_every_s=every)
                          for i in range(self.cfg.prefill)]
        self._decodes = [DecodeState(f"decode-{i}") for i in range(self.cfg.decode)]
        self._requests, self._events, self._seq, self._pending = requests, [], 0, 0
        self._ttft, self._tpot = [0.0] * len(requests), []
        self._cached = self._input = 0
        self._decisions: Counter = Counter()
        self._arrivals = [r.arrival_s / scale for r in requests]
        for i, arrival in enumerate(self._arrivals):
            self._push(arrival, ARRIVE, i)
        self._rebalance_every = max(self.cfg.rebalance_interval_s, self.cfg.ttft_slo_s / 100)
        if hasattr(self._p_policy, "rebalance"):
            self._push(self._rebalance_every, REBALANCE, 0)
        self._loop()
        return RunResult(scale, self._ttft, self._tpot, self._cached, self._input,
                         [p.busy_s for p in self._prefills], self._decisions, self.cfg.ttft_slo_s, self.cfg.warmup)

    def _push(self, t: float, kind: int, a: int, b: int = 0) -> None:
        self._seq += 1
        self._pending += kind not in _PERIODIC
        heapq.heappush(self._events, (t, self._seq, kind, a, b))

    def _loop(self) -> None:
        handlers = {ARRIVE: self._arrive, PREFILL_DONE: self._prefill_done, DECODE_START: self._decode_start,
                    DECODE_DONE: self._decode_done, REBALANCE: self._rebalance}
        while self._events:
            t, _, kind, a, b = heapq.heappop(self._events)
            self._pending -= kind not in _PERIODIC
            handlers[kind](t, a, b)

    # ---- prefill -----------------------------------------------------------------------------
    def _arrive(self, t: float, i: int, _: int) -> None:
        r, replica = self._requests[i], i % len(self._p_policies)
        policy = self._p_policies[replica]
        hashes = r.hashes if policy.uses_prefix else ()
        route = RouteRequest(str(i), hashes, r.input_len, r.output_len, self.cfg.ttft_slo_s * 1e3)
        choice = policy.select(route, [p.snapshot(t, replica) for p in self._prefills])
        self._decisions[choice.reason] += 1
        uncached = r.input_len - min(choice.cached_tokens, r.input_len - 1)
        predicted = self.latency.prefill_s(uncached, r.input_len - uncached)
        self._enqueue(t, _index(choice.instance),
                      QueuedPrefill(i, route, predicted, uncached, replica, self._arrivals[i]))

    def _enqueue(self, t: float, p_idx: int, q: QueuedPrefill) -> None:
        """Queue a request on prefill ``p_idx`` with the router's estimates of its prefill there
        (what the load snapshots of later decisions add up)."""
        p = self._prefills[p_idx]
        p.catch_up(t)
        p.push(q)
        if not p.busy:
            self._start(t, p_idx)

    def _start(self, t: float, p_idx: int) -> None:
        p = self._prefills[p_idx]
        p.catch_up(t)
        q = p.take()
        p.owner = q.replica
        i, r = q.i, self._requests[q.i]
        hit = 0
        for h in r.hashes:
            if h not in p.cache:
                break
            p.cache.move_to_end(h)
            hit += 1
        cached = min(hit * self.cfg.block_size, r.input_len - 1)
        duration = self.latency.prefill_s(r.input_len - cached, cached)
        self._cached += cached
        self._input += r.input_len
        p.busy, p.busy_until, p.busy_s = True, t + q.predicted_s, p.busy_s + duration
        p.running_uncached = r.input_len - cached
        p.pending_tokens += p.running_uncached
        self._push(t + duration, PREFILL_DONE, p_idx, i)

    def _prefill_done(self, t: float, p_idx: int, i: int) -> None:
        p, r = self._prefills[p_idx], self._requests[i]
        p.catch_up(t)
        for h in r.hashes:
            p.cache[h] = None
            p.cache.move_to_end(h)
        while len(p.cache) > self.cfg.cache_blocks:
            p.cache.popitem(last=False)
        self._ttft[i] = t - self._arrivals[i]
        p.busy, p.busy_until, p.owner = False, t, -1
        p.pending_tokens -= p.running_uncached
        self._push(t + r.input_len * self.cfg.kv_bytes_per_token / self.cfg.kv_bandwidth_bps, DECODE_START, i)
        if p.queue:
            self._start(t, p_idx)

    # ---- decode ------------------------------------------------------------------------------
    def _decode_start(self, t: float, i: int, _: int) -> None:
        r = self._requests[i]
        snaps = [LoadSnapshot(d.name, running=d.active, kv_cache_usage=min(1.0, d.tokens / self.cfg.decode_kv_tokens))
                 for d in self._decodes]
        route = RouteRequest(str(i), (), r.input_len, r.output_len, tpot_slo_ms=self.cfg.tpot_slo_s * 1e3)
        d_idx = _index(self._d_policy.select(route, snaps).instance)
        d = self._decodes[d_idx]
        d.active += 1
        d.tokens += r.input_len + r.output_len
        step = self.latency.decode_step_s(d.active, d.tokens / d.active)
        if r.output_len > 1:
            self._tpot.append(step)
        self._push(t + (r.output_len - 1) * step, DECODE_DONE, d_idx, i)

    def _decode_done(self, t: float, d_idx: int, i: int) -> None:
        d, r = self._decodes[d_idx], self._requests[i]
        d.active -= 1
        d.tokens -= r.input_len + r.output_len

    # ---- rebalancing -------------------------------------------------------------------------
    def _rebalance(self, t: float, _: int, __: int) -> None:
        """Each replica's policy may move the requests that replica queued."""
        if any(p.queue for p in self._prefills):  # nothing to move otherwise
            for replica, policy in enumerate(self._p_policies):
                queues = [self._window(p, t, replica) for p in self._prefills]
                for move in policy.rebalance(queues):
                    self._move(t, int(move.request_id), _index(move.target), move.prefill_s)
        if self._pending:  # periodic events end with the last request's
            self._push(t + self._rebalance_every, REBALANCE, 0)

    def _window(self, p: PrefillState, t: float, replica: int = 0) -> InstanceQueue:
        """Replica ``replica``'s rebalancer view of ``p``: the last requests it queued there, the
        rest of the queue (as it sees it) folded into busy_s."""
        if len(p.own) > 1:
            mine = (q for q in reversed(p.queue) if q.replica == replica)
            tail = list(itertools.islice(mine, REBALANCE_WINDOW))[::-1]
            busy = max(0.0, p.snapshot(t, replica).queued_prefill_s - sum(q.predicted_s for q in tail))
        elif not p.queue:
            return InstanceQueue(p.name, max(0.0, p.busy_until - t))
        else:
            tail = list(itertools.islice(reversed(p.queue), REBALANCE_WINDOW))[::-1]
            busy = max(0.0, p.busy_until - t) + max(0.0, p.queued_s - sum(q.predicted_s for q in tail))
        return InstanceQueue(p.name, busy, tuple(q.record for q in tail), t)

    def _move(self, t: float, i: int, target: int, predicted_s: float) -> None:
        for p in self._prefills:
            found = next((q for q in p.queue if q.i == i), None)
            if found is not None:
                p.catch_up(t)
                p.take(found)
                self._decisions["rebalance"] += 1
                self._enqueue(t, target, replace(found, predicted_s=predicted_s))
                return


def _index(instance: str) -> int:
    return int(instance.rsplit("-", 1)[1])
