"""One simulated engine of ``ServingSim``: its spec, the serving constants, its decode batch and
its step loop (see ``pdserve.sim.serving`` for the model)."""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from pdserve.base.types import LoadSnapshot
from pdserve.sim.host import Contention
from pdserve.sim.traces import TraceRequest
from router.latency import DEFAULT_KV_BANDWIDTH_BPS, DEFAULT_KV_BYTES_PER_TOKEN, LatencyModel


@dataclass(frozen=True)
class EngineSpec:
    """What one instance (one engine over ``gpus`` devices) can do."""

    latency: LatencyModel
    kv_tokens: int
    """KV-cache capacity, tokens."""
    gpus: int = 1
    """Devices per instance (its tensor-parallel degree)."""


@dataclass(frozen=True)
class ServingConfig:
    """The serving constants and the SLOs a run is scored against."""

    ttft_slo_s: float
    """A request meets its SLOs when its TTFT is at most this ..."""
    tpot_slo_s: float
    """... and its TPOT at most this."""
    max_batch_tokens: int = 2048
    """Prompt tokens per prefill pass (vLLM's ``max_num_batched_tokens``)."""
    max_pass_prompts: int = 256
    """Prompts per prefill pass (live, the router's ``admission.max_engine_prompts`` caps it)."""
    colocated_schedule: str = "prefill_first"
    """How a colocated engine shares its steps: ``prefill_first`` or ``mixed`` (module docstring)."""
    max_batch: int = 256
    """Requests per decode batch (vLLM's ``max_num_seqs``)."""
    kv_bytes_per_token: int = DEFAULT_KV_BYTES_PER_TOKEN
    """KV bytes of one token (moved prefill -> decode)."""
    kv_bandwidth_bps: float = DEFAULT_KV_BANDWIDTH_BPS
    """Prefill -> decode KV bandwidth."""
    horizon_s: float = 120.0
    """A run replays the workload's requests that arrive within this many (compressed) seconds, at
    least ``min_requests`` of them, so every rate is measured in steady state, not as one burst."""
    min_requests: int = 500
    """The fewest requests a run replays, whatever the rate."""
    warmup_share: float = 0.2
    """Leading share of a run's requests not scored."""
    seed: int = 0
    """Seed of the decode policy's random choices."""
    contention: Contention | None = None
    """How instances sharing one host's cores slow each other (``pdserve.sim.host``); None: each
    instance has a device of its own (GPU profiles, or one machine per engine)."""

    def __post_init__(self) -> None:
        if min(self.max_batch_tokens, self.max_pass_prompts, self.max_batch, self.kv_bandwidth_bps) <= 0:
            raise ValueError("max_batch_tokens, max_pass_prompts, max_batch and kv_bandwidth_bps must be > 0")
        if not 0 <= self.warmup_share < 1:
            raise ValueError("warmup_share must be in [0, 1)")
        if self.colocated_schedule not in ("prefill_first", "mixed"):
            raise ValueError(f"colocated_schedule: unknown {self.colocated_schedule!r} (prefill_first or mixed)")


class DecodeBatch:
    """A continuous decode batch with its KV accounting; requests finish at step counts."""

    def __init__(self, spec: EngineSpec, cfg: ServingConfig, requests: Sequence[TraceRequest]) -> None:
        self.spec, self.cfg, self.requests = spec, cfg, requests
        self.running: set[int] = set()
        self.finishes: list[tuple[int, int]] = []
        self.steps = self.context = self.kv_used = 0

    def fits(self, i: int) -> bool:
        """Whether request ``i``'s whole KV and a batch slot are free (an empty batch takes anything)."""
        r = self.requests[i]
        return not self.running or (len(self.running) < self.cfg.max_batch
                                    and self.kv_used + r.input_len + r.output_len <= self.spec.kv_tokens)

    def join(self, i: int, delay: int = 0) -> None:
        """Request ``i`` decodes from the next step on (``delay`` 1: from the step after, when the
        next step produces its first token)."""
        r = self.requests[i]
        self.running.add(i)
        self.kv_used += r.input_len + r.output_len
        self.context += r.input_len + 1 - delay
        heapq.heappush(self.finishes, (self.steps + delay + r.output_len - 1, i))

    def step_s(self) -> float:
        """The duration of the next step."""
        return self.spec.latency.decode_step_s(len(self.running), self.context / len(self.running))

    def advance(self) -> list[int]:
        """One step done: every running request gained a token; returns those that finished."""
        self.steps += 1
        self.context += len(self.running)
        done = []
        while self.finishes and self.finishes[0][0] <= self.steps:
            i = heapq.heappop(self.finishes)[1]
            r = self.requests[i]
            self.running.discard(i)
            self.kv_used -= r.input_len + r.output_len
            self.context -= r.input_len + r.output_len
            done.append(i)
        return done


class Instance:
    """One engine: a FIFO of waiting prompts (prefill or colocated) or of arrived KV (decode), the
    pass it runs (``prefill`` or ``decode``), and a decode batch (decode or colocated)."""

    def __init__(self, name: str, role: str, spec: EngineSpec, cfg: ServingConfig,
                 requests: Sequence[TraceRequest]) -> None:
        self.name, self.role, self.spec, self.cfg, self.requests = name, role, spec, cfg, requests
        self.waiting: deque[int] = deque()
        self.waiting_tokens = 0
        self.batch = DecodeBatch(spec, cfg, requests)
        self.phase = ""
        self.prompts: list[int] = []

    def snapshot(self) -> LoadSnapshot:
        """The load the routing policies see."""
        return LoadSnapshot(self.name, waiting=len(self.waiting), running=len(self.batch.running) + len(self.prompts),
                            pending_prefill_tokens=self.waiting_tokens,
                            kv_cache_usage=min(1.0, self.batch.kv_used / self.spec.kv_tokens))

    def start(self) -> float | None:
        """If idle, start the next pass; returns its duration (None: nothing to run)."""
        if self.phase:
            return None
        if self.role == "decode":
            while self.waiting and self.batch.fits(self.waiting[0]):
                self.batch.join(self._pop())
        elif self.role == "colocated" and self.cfg.colocated_schedule == "mixed":
            return self._start_mixed()
        elif self._take_prompts():
            self.phase = "prefill"
            return self.spec.latency.prefill_batch_s([self.requests[i].input_len for i in self.prompts])
        if self.batch.running:
            self.phase = "decode"
            return self.batch.step_s()
        return None

    def _start_mixed(self) -> float | None:
        running = len(self.batch.running)
        mean_context = self.batch.context / running if running else 0.0
        self._take_prompts(budget=self.cfg.max_batch_tokens - running, delay=1)
        if not (running or self.prompts):
            return None
        self.phase = "mixed"
        lengths = [self.requests[i].input_len for i in self.prompts]
        return self.spec.latency.mixed_step_s(lengths, running, mean_context)

    def _take_prompts(self, budget: int | None = None, delay: int = 0) -> bool:
        """Move waiting prompts into ``self.prompts`` for the next step, first come first served,
        within ``budget`` tokens (one prompt always fits an otherwise empty step)."""
        budget, tokens = self.cfg.max_batch_tokens if budget is None else budget, 0
        while self.waiting:
            n = self.requests[self.waiting[0]].input_len
            if self.prompts and (tokens + n > budget or len(self.prompts) >= self.cfg.max_pass_prompts):
                break
            if self.role == "colocated" and not self.batch.fits(self.waiting[0]):
                break
            i = self._pop()
            self.prompts.append(i)
            tokens += n
            if self.role == "colocated" and self.requests[i].output_len > 1:  # its KV stays here: reserve it
                self.batch.join(i, delay)
        return bool(self.prompts)

    def _pop(self) -> int:
        i = self.waiting.popleft()
        self.waiting_tokens -= self.requests[i].input_len
        return i

    def end(self) -> tuple[list[int], list[int]]:
        """The running pass ended: (requests whose first token it produced, requests it finished)."""
        phase, self.phase = self.phase, ""
        first, self.prompts = self.prompts, []
        return first, (self.batch.advance() if phase != "prefill" else [])

    def enqueue(self, i: int) -> None:
        self.waiting.append(i)
        self.waiting_tokens += self.requests[i].input_len
