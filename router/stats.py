"""``RouterStats``: where the router's components send their stats.

The dispatcher emits one ``RequestRecord`` per request and the pools one ``RouteDecision`` per
choice; ``RouterStats`` keeps short per-instance windows for ``ServerInfo`` (``pdserve status``)
and forwards everything to its listeners (the Prometheus exporter). No metrics code here.
"""
from __future__ import annotations

import statistics
from collections import defaultdict, deque
from typing import Protocol

from pdserve.base.types import Outcome, RequestRecord, RouteDecision

WINDOW = 200
"""Requests per instance that the recent TTFT/TPOT medians are taken over."""


class StatsListener(Protocol):
    """Receives every record and decision (e.g. ``router.metrics.PrometheusExporter``)."""

    def on_request(self, record: RequestRecord) -> None: ...

    def on_decision(self, decision: RouteDecision) -> None: ...


class RouterStats:
    """Fan-out sink plus recent per-instance latency windows. Called on the router's event loop."""

    def __init__(self, listeners: list[StatsListener] | None = None) -> None:
        self.listeners = list(listeners or [])
        self._ttft: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=WINDOW))
        self._tpot: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=WINDOW))

    def record_request(self, record: RequestRecord) -> None:
        """Take one request's record."""
        if record.outcome is Outcome.FINISHED:
            if record.ttft_s is not None and record.prefill_instance:
                self._ttft[record.prefill_instance].append(record.ttft_s)
            if record.tpot_s is not None and record.decode_instance:
                self._tpot[record.decode_instance].append(record.tpot_s)
        for listener in self.listeners:
            listener.on_request(record)

    def record_decision(self, decision: RouteDecision) -> None:
        """Take one routing decision."""
        for listener in self.listeners:
            listener.on_decision(decision)

    def recent_ms(self, instance: str) -> tuple[float, float]:
        """Median TTFT and TPOT (ms) of the instance's recent finished requests (0 when none)."""
        ttft, tpot = self._ttft.get(instance), self._tpot.get(instance)
        return (statistics.median(ttft) * 1e3 if ttft else 0.0, statistics.median(tpot) * 1e3 if tpot else 0.0)
