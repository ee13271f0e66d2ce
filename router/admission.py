"""``AdmissionQueue``: the router-side queue in front of one pool's prefill engines.

An engine gets at most ``max_engine_prompts`` prompts (and ``max_engine_tokens`` uncached prompt
tokens, one prompt always fitting) at a time; every other admitted request waits here, per
instance, ordered by priority (lower first), then arrival. Because the queue is the router's:

- a request whose predicted TTFT exceeds ``reject_factor`` x its SLO is refused at once
  (``OverloadedError``: RESOURCE_EXHAUSTED; Mooncake-style early rejection);
- the queue is bounded (``max_queued_requests``, ``max_queued_tokens``): past it, RESOURCE_EXHAUSTED
  instead of memory growth in the engines;
- the prefill policy's ``rebalance`` (DualMap's hotspot rebalancing) can move queued requests;
- the load snapshots the policies see (``pending_prefill_tokens``, ``queued_prefill_s``) are this
  queue's own accounting, priced with the online latency model.

Called on the router's event loop only (no locks): the dispatcher admits, awaits ``dispatched`` and
calls ``finish``; the poller calls ``rebalance``. Every wait is bounded by the request's deadline.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pdserve.base.config import AdmissionConfig
from pdserve.base.types import OverloadedError, RouteDecision
from router.policies import Choice, InstanceQueue, QueuedRequest, RouteRequest
from router.policies.base import REBALANCE_WINDOW


@dataclass(eq=False)
class Ticket:
    """One admitted request's place in the queue (or on its engine, once dispatched)."""

    route: RouteRequest
    priority: int
    seq: int
    instance: str
    prefill_s: float
    """Predicted prefill seconds on ``instance``."""
    uncached: int
    admitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    reason: str = ""
    """The routing decision's reason (``rebalance`` once moved)."""
    predicted_ttft_s: float = 0.0
    """The admission's TTFT prediction: the instance's queued work plus this prefill."""
    engine_idle: bool = False
    """Whether the engine had nothing else when this started (a clean timing for the refit)."""
    _ready: asyncio.Future | None = None

    def order(self) -> tuple[int, int]:
        """Service order within an instance: priority, then arrival."""
        return (self.priority, self.seq)


@dataclass
class AdmissionStats:
    """Counters the exporter reads."""

    rejected: dict[str, int] = field(default_factory=lambda: {"slo": 0, "queue_full": 0, "in_flight": 0})
    moved: int = 0


class AdmissionQueue:
    """Per-instance router-side queues and in-engine accounting for one pool."""

    def __init__(self, cfg: AdmissionConfig, latency: Any, policy: Any, pool: str = "prefill",
                 on_decision: Callable[[RouteDecision], None] = lambda decision: None) -> None:
        self.cfg, self.latency, self.policy, self.pool = cfg, latency, policy, pool
        self._on_decision = on_decision
        self._queued: dict[str, list[Ticket]] = {}
        self._running: dict[str, list[Ticket]] = {}
        self._seq = itertools.count()
        self.stats = AdmissionStats()

    # ---- accounting the policies see ---------------------------------------------------------
    def load(self, instance: str) -> tuple[int, float]:
        """(uncached prompt tokens, predicted seconds) routed to ``instance`` and not prefilled."""
        queued, running = self._queued.get(instance, []), self._running.get(instance, [])
        seconds = self.load_running(instance, time.perf_counter()) + sum(t.prefill_s for t in queued)
        return sum(t.uncached for t in running) + sum(t.uncached for t in queued), seconds

    def queued(self) -> int:
        """Requests waiting in the router (all instances)."""
        return sum(len(q) for q in self._queued.values())

    # ---- the request path --------------------------------------------------------------------
    def admit(self, route: RouteRequest, priority: int, choice: Choice, slo_s: float, in_flight: int) -> Ticket:
        """Queue a routed request on its chosen instance, or raise OverloadedError (early rejection
        or a bound). ``in_flight`` counts the deployment's requests past admission."""
        cached = min(choice.cached_tokens, max(route.num_tokens - 1, 0))
        own_s = self.latency.prefill_s(route.num_tokens - cached, cached)
        self._check_bounds(route, in_flight)
        predicted = self.load(choice.instance)[1] + own_s
        if slo_s and self.cfg.reject_factor and predicted > self.cfg.reject_factor * slo_s:
            self.stats.rejected["slo"] += 1
            raise OverloadedError(f"predicted TTFT {predicted:.2f} s exceeds {self.cfg.reject_factor:g} x the "
                                  f"{slo_s:.2f} s TTFT SLO", retry_after_s=max(1.0, predicted - slo_s))
        ticket = Ticket(route, priority, next(self._seq), choice.instance, own_s, route.num_tokens - cached,
                        reason=choice.reason, predicted_ttft_s=predicted)
        ticket._ready = asyncio.get_running_loop().create_future()
        self._queued.setdefault(choice.instance, []).append(ticket)
        self._pump(choice.instance)
        return ticket

    def _check_bounds(self, route: RouteRequest, in_flight: int) -> None:
        cfg = self.cfg
        if in_flight >= cfg.max_requests_in_flight:
            self.stats.rejected["in_flight"] += 1
            raise OverloadedError(f"{in_flight} requests in flight, the deployment's bound", retry_after_s=1.0)
        tokens = sum(t.uncached for q in self._queued.values() for t in q)
        if self.queued() >= cfg.max_queued_requests or tokens + route.num_tokens > cfg.max_queued_tokens:
            self.stats.rejected["queue_full"] += 1
            raise OverloadedError(f"router queue full ({self.queued()} requests, {tokens} tokens queued)",
                                  retry_after_s=1.0)

    async def dispatched(self, ticket: Ticket) -> str:
        """Wait until the ticket's engine has room; returns the instance it runs on (a rebalancing
        move may have changed it). Cancelling the wait (deadline, client gone) leaves the queue."""
        try:
            return await ticket._ready
        except BaseException:
            self.finish(ticket)
            raise

    def finish(self, ticket: Ticket, observed_s: float | None = None, cached: int | None = None) -> None:
        """The ticket's prefill ended (or will never run): free its room, feed the refit with a clean
        observation, and start what waits. Idempotent."""
        queue = self._queued.get(ticket.instance, [])
        if ticket in queue:
            queue.remove(ticket)
        running = self._running.get(ticket.instance, [])
        if ticket in running:
            running.remove(ticket)
            if observed_s is not None and ticket.engine_idle and hasattr(self.latency, "observe"):
                c = ticket.route.num_tokens - ticket.uncached if cached is None else cached
                self.latency.observe(ticket.route.num_tokens - c, c, observed_s)
            self._pump(ticket.instance)

    def _pump(self, instance: str) -> None:
        """Start queued tickets on ``instance`` while its engine has room."""
        queue, running = self._queued.get(instance, []), self._running.setdefault(instance, [])
        while queue:
            nxt = min(queue, key=Ticket.order)
            tokens = sum(t.uncached for t in running)
            if running and (len(running) >= self.cfg.max_engine_prompts
                            or tokens + nxt.uncached > self.cfg.max_engine_tokens):
                return
            queue.remove(nxt)
            nxt.engine_idle, nxt.started = not running, time.perf_counter()
            running.append(nxt)
            if not nxt._ready.done():
                nxt._ready.set_result(instance)

    # ---- rebalancing -------------------------------------------------------------------------
    def rebalance(self, live: set[str]) -> int:
        """Ask the policy to move queued requests among ``live`` instances; apply every move.
        Returns the number of moves (called by the router's poller)."""
        if not hasattr(self.policy, "rebalance") or not any(self._queued.values()):
            return 0
        now, views = time.perf_counter(), []
        by_id = {t.route.request_id: t for q in self._queued.values() for t in q}
        for name in sorted(live):
            queued = sorted(self._queued.get(name, []), key=Ticket.order)
            head, tail = queued[:-REBALANCE_WINDOW], queued[-REBALANCE_WINDOW:]
            busy = self.load_running(name, now) + sum(t.prefill_s for t in head)
            views.append(InstanceQueue(name, busy, tuple(QueuedRequest(t.route, t.prefill_s, t.admitted) for t in tail),
                                       now))
        moves = self.policy.rebalance(views)
        for move in moves:
            self._move(by_id[move.request_id], move.target, move.prefill_s)
        return len(moves)

    def load_running(self, instance: str, now: float) -> float:
        """Predicted seconds left of what ``instance``'s engine already runs."""
        return sum(max(0.0, t.prefill_s - (now - t.started)) for t in self._running.get(instance, []))

    def _move(self, ticket: Ticket, target: str, prefill_s: float) -> None:
        self._queued[ticket.instance].remove(ticket)
        ticket.instance, ticket.prefill_s, ticket.reason = target, prefill_s, "rebalance"
        self.stats.moved += 1
        self._queued.setdefault(target, []).append(ticket)
        self._on_decision(RouteDecision(self.pool, getattr(self.policy, "name", ""), target, "rebalance"))
        self._pump(target)
