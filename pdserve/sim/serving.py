"""``ServingSim``: a step-level simulation of one deployment serving a workload, for planning
(``pdserve plan``) and for checking the simulator against live runs.

- **Disaggregated.** A prefill instance runs one forward pass at a time over the prompts queued on
  it, first come first served, up to ``max_batch_tokens`` per pass (one prompt always fits). Each
  prompt's first token comes out when its pass ends (TTFT); its KV then moves to a decode instance
  (bytes / bandwidth). A decode instance runs continuous batching: every step advances each running
  request by one token and takes ``decode_step_s(batch, mean context)``. A request joins the batch
  at a step boundary when its whole KV (prompt + output) fits the instance's KV capacity and the
  batch holds fewer than ``max_batch``; otherwise it waits there, first come first served.
- **Colocated.** Every instance runs both phases, scheduled one of two ways:
  ``prefill_first`` (vLLM before chunked prefill, DistServe's baseline): prompts that fit run as a
  pass before the next decode step, and the batch stalls; ``mixed`` (vLLM v1's chunked-prefill
  scheduling, whole prompts): every step decodes the batch and prefills the prompts that fit the
  step's token budget beside it.

TPOT is (last token - first token) / (output tokens - 1), as in DistServe. Arrivals go to the
prefill (or colocated) instance with the least queued work; decodes by ``decode_p2c``.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Sequence

from pdserve.sim.instance import EngineSpec, Instance, ServingConfig
from pdserve.sim.traces import TraceRequest
from router.policies import PolicyContext, RouteRequest, make_policy

ARRIVE, PASS_END, KV_ARRIVE = range(3)
__all__ = ["EngineSpec", "Placement", "ServingConfig", "ServingResult", "ServingSim"]


@dataclass(frozen=True)
class Placement:
    """A deployment: ``prefill`` + ``decode`` instances, or ``prefill`` colocated instances."""

    prefill: int
    decode: int = 0
    prefill_tp: int = 1
    decode_tp: int = 1
    colocated: bool = False
    """``prefill`` instances of ``prefill_tp`` devices each serve both phases; decode fields unused."""

    @property
    def gpus(self) -> int:
        """Devices the placement uses."""
        return self.prefill * self.prefill_tp + (0 if self.colocated else self.decode * self.decode_tp)

    def label(self) -> str:
        """A short human name, e.g. ``2P(TP2)+4D(TP1)`` or ``colocated 8 x TP1``."""
        if self.colocated:
            return f"colocated {self.prefill} x TP{self.prefill_tp}"
        return f"{self.prefill}P(TP{self.prefill_tp})+{self.decode}D(TP{self.decode_tp})"


@dataclass
class ServingResult:
    """Per-request outcomes of one run (``capacity`` reads ``attainment``)."""

    scale: float
    ttft_s: list[float]
    tpot_s: list[float]
    ttft_slo_s: float
    tpot_slo_s: float
    warmup: int = 0
    """Leading requests not scored (the ramp from an empty deployment)."""
    wait_s: list[float] = field(default_factory=list)
    """Per request, arrival until its prefill pass started (the rest of its TTFT is the pass)."""

    @property
    def attainment(self) -> float:
        """Share of the scored requests that met both SLOs."""
        pairs = list(zip(self.ttft_s, self.tpot_s))[self.warmup:]
        return sum(t <= self.ttft_slo_s and p <= self.tpot_slo_s for t, p in pairs) / max(len(pairs), 1)


class ServingSim:
    """One simulated run of ``placement`` per ``run`` call (fresh instances each time)."""

    def __init__(self, placement: Placement, engines: dict[int, EngineSpec], cfg: ServingConfig) -> None:
        """``engines`` maps a tensor-parallel degree to its instance's spec."""
        self.placement, self.engines, self.cfg = placement, engines, cfg

    def run(self, requests: Sequence[TraceRequest], scale: float = 1.0) -> ServingResult:
        """Replay ``requests`` with arrivals compressed ``scale`` times, over the configured horizon."""
        p, cfg = self.placement, self.cfg
        horizon = next((k for k, r in enumerate(requests) if r.arrival_s / scale > cfg.horizon_s), len(requests))
        requests = requests[:max(horizon, min(cfg.min_requests, len(requests)))]
        ctx = PolicyContext(seed=cfg.seed)
        self._front_policy, self._decode_policy = make_policy("least_loaded", ctx), make_policy("decode_p2c", ctx)
        role = "colocated" if p.colocated else "prefill"
        self._front = [Instance(f"{role}-{k}", role, self.engines[p.prefill_tp], cfg, requests)
                       for k in range(p.prefill)]
        self._decodes = [] if p.colocated else [
            Instance(f"decode-{k}", "decode", self.engines[p.decode_tp], cfg, requests) for k in range(p.decode)]
        self._instances = self._front + self._decodes
        self._index = {x.name: k for k, x in enumerate(self._instances)}
        self._requests, self._events, self._seq = requests, [], 0
        self._arrival = [r.arrival_s / scale for r in requests]
        self._first, self._last, self._started = [0.0] * len(requests), [0.0] * len(requests), [0.0] * len(requests)
        for i, t in enumerate(self._arrival):
            self._push(t, ARRIVE, i)
        while self._events:
            t, _, kind, a = heapq.heappop(self._events)
            (self._arrive, self._pass_end, self._kv_arrive)[kind](t, a)
        ttft = [f - a for f, a in zip(self._first, self._arrival)]
        tpot = [(last - first) / (r.output_len - 1) if r.output_len > 1 else 0.0
                for first, last, r in zip(self._first, self._last, requests)]
        wait = [s - a for s, a in zip(self._started, self._arrival)]
        return ServingResult(scale, ttft, tpot, cfg.ttft_slo_s, cfg.tpot_slo_s, int(cfg.warmup_share * len(requests)),
                             wait)

    def _push(self, t: float, kind: int, a: int) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, a))

    def _arrive(self, t: float, i: int) -> None:
        r = self._requests[i]
        choice = self._front_policy.select(RouteRequest(str(i), (), r.input_len, r.output_len),
                                           [x.snapshot() for x in self._front])
        self._enqueue(t, self._index[choice.instance], i)

    def _kv_arrive(self, t: float, i: int) -> None:
        r = self._requests[i]
        route = RouteRequest(str(i), (), r.input_len, r.output_len, tpot_slo_ms=self.cfg.tpot_slo_s * 1e3)
        choice = self._decode_policy.select(route, [d.snapshot() for d in self._decodes])
        self._enqueue(t, self._index[choice.instance], i)

    def _enqueue(self, t: float, k: int, i: int) -> None:
        self._instances[k].enqueue(i)
        self._kick(t, k)

    def _kick(self, t: float, k: int) -> None:
        duration = self._instances[k].start()
        if duration is not None:
            self._push(t + duration * self._slowdown(k), PASS_END, k)
            for i in self._instances[k].prompts:
                self._started[i] = t

    def _slowdown(self, k: int) -> float:
        """The factor on instance ``k``'s pass from the others sharing its host (1.0 without
        ``cfg.contention``): they prefill, or else decode their batches."""
        if self.cfg.contention is None:
            return 1.0
        others = [x for j, x in enumerate(self._instances) if j != k and x.phase]
        batch = sum(len(x.batch.running) for x in others)
        return self.cfg.contention.slowdown(bool(self._instances[k].prompts), any(x.prompts for x in others), batch)

    def _pass_end(self, t: float, k: int) -> None:
        first, finished = self._instances[k].end()
        for i in first:
            r = self._requests[i]
            self._first[i] = self._last[i] = t
            if r.output_len > 1 and not self.placement.colocated:
                self._push(t + r.input_len * self.cfg.kv_bytes_per_token / self.cfg.kv_bandwidth_bps, KV_ARRIVE, i)
        for i in finished:
            self._last[i] = t
        self._kick(t, k)
