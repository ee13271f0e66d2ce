"""``EngineStatsLogger``: a vLLM stat logger that keeps an engine's latest load and cumulative
prefix-cache counters for the router's load snapshots (no vLLM import: it duck-types the stats).

vLLM calls ``record`` from its output loop in the worker actor's process after every engine step;
the actor reads ``snapshot`` when the router polls it.
"""
from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from typing import Any

from pdserve.base.types import LoadSnapshot


@dataclass
class _Totals:
    waiting: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0
    prefix_queries: int = 0
    prefix_hits: int = 0
    external_queries: int = 0
    external_hits: int = 0
    steps: int = 0
    tokens: int = 0


class EngineStatsLogger:
    """Accumulates SchedulerStats; ``factory`` is what AsyncLLM's ``stat_loggers`` takes."""

    def __init__(self) -> None:
        self._totals = _Totals()
        self._lock = threading.Lock()
        self.boot = secrets.token_hex(6)
        """This engine incarnation's id, reported in every snapshot."""

    def factory(self, vllm_config: Any, engine_index: int = 0) -> _Recorder:
        """Called by vLLM once per engine to build the logger object it drives."""
        return _Recorder(self)

    def record(self, scheduler_stats: Any, iteration_stats: Any = None) -> None:
        """Fold one step's scheduler and iteration stats into the totals."""
        t = self._totals
        if iteration_stats is not None:
            with self._lock:
                t.tokens += (iteration_stats.num_generation_tokens + iteration_stats.num_prompt_tokens
                             + len(iteration_stats.finished_requests))
        if scheduler_stats is None:
            return
        with self._lock:
            t.steps += 1
            t.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            t.running = scheduler_stats.num_running_reqs
            t.kv_cache_usage = scheduler_stats.kv_cache_usage
            t.prefix_queries += scheduler_stats.prefix_cache_stats.queries
            t.prefix_hits += scheduler_stats.prefix_cache_stats.hits
            external = scheduler_stats.connector_prefix_cache_stats
            if external is not None:
                t.external_queries += external.queries
                t.external_hits += external.hits

    def snapshot(self, name: str, alive: bool = True, accepted: int = 0) -> LoadSnapshot:
        """The latest load of this engine, named ``name``; ``accepted`` is the worker's own count
        of its requests in the engine."""
        with self._lock:
            t = self._totals
            return LoadSnapshot(instance=name, waiting=t.waiting, running=t.running,
                                kv_cache_usage=t.kv_cache_usage, prefix_cache_queries=t.prefix_queries,
                                prefix_cache_hits=t.prefix_hits, alive=alive, steps=t.steps, tokens=t.tokens,
                                accepted=accepted, boot=self.boot)

    def external_hits(self) -> tuple[int, int]:
        """Cumulative (queried, hit) prompt tokens of the KV connector: tokens loaded from outside."""
        with self._lock:
            return self._totals.external_queries, self._totals.external_hits


class _Recorder:
    """The object vLLM drives (StatLoggerBase's interface, duck-typed)."""

    def __init__(self, owner: EngineStatsLogger) -> None:
        self._owner = owner

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        self._owner.record(scheduler_stats, iteration_stats)

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass
