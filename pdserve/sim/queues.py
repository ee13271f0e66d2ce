"""The routing simulator's per-instance state (``pdserve.sim.cluster``): a prefill instance's queue,
prefix cache and load accounting, per router replica, and a decode instance's batch."""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from functools import cached_property

from pdserve.base.types import LoadSnapshot
from router.policies import QueuedRequest, RouteRequest


@dataclass(frozen=True)
class QueuedPrefill:
    """A request waiting at a prefill instance, with the router's estimates for it there."""

    i: int
    route: RouteRequest
    predicted_s: float
    uncached: int
    replica: int = 0
    arrived_s: float = 0.0

    @cached_property
    def record(self) -> QueuedRequest:
        """The request as a rebalancing window lists it: built once per placement, not per
        window (building them was most of a DualMap run's time)."""
        return QueuedRequest(self.route, self.predicted_s, self.arrived_s)


@dataclass
class PrefillState:
    name: str
    cache: OrderedDict = field(default_factory=OrderedDict)
    queue: deque = field(default_factory=deque)
    """``QueuedPrefill`` requests in service order."""
    busy_until: float = 0.0
    """When the running prefill is predicted to end (the router's estimate, not the real end)."""
    busy: bool = False
    running_uncached: int = 0
    pending_tokens: int = 0
    queued_s: float = 0.0
    busy_s: float = 0.0
    owner: int = -1
    """The replica that queued the running prefill (-1: none runs)."""
    own: list = field(default_factory=list)
    """Per replica: [uncached tokens, predicted seconds] it has queued here and not started."""
    reported: list = field(default_factory=list)
    """Per replica: its [tokens, seconds] here (running included) at the last load report."""
    report_every_s: float = 0.0
    """Seconds between load reports (several replicas; the reports fall at multiples of it)."""
    last_report: int = -1
    """The last report in ``reported``, as a multiple of ``report_every_s``."""

    def catch_up(self, t: float) -> None:
        """Take the load report due last by ``t``, if not yet taken. Reports are taken lazily:
        the simulator calls this before every change to this instance's state and every read of
        it, so the state at that report's time is the state now (the busy term is priced at the
        report's time). Cost per change, not per report interval of simulated time."""
        if self.report_every_s and (k := int(t // self.report_every_s)) > self.last_report:
            at = k * self.report_every_s
            self.reported = [self.share(r, at) for r in range(len(self.own))]
            self.last_report = k

    def snapshot(self, t: float, replica: int = 0) -> LoadSnapshot:
        """The load replica ``replica`` sees: all of it, exact, with one router; else its own
        work exact and the other replicas' as last reported."""
        self.catch_up(t)
        if len(self.own) <= 1:
            return LoadSnapshot(self.name, waiting=len(self.queue), running=int(self.busy),
                                pending_prefill_tokens=self.pending_tokens,
                                queued_prefill_s=self.queued_s + max(0.0, self.busy_until - t))
        tokens, seconds = self.share(replica, t)
        for r, (tok, sec) in enumerate(self.reported):
            if r != replica:
                tokens, seconds = tokens + tok, seconds + sec
        return LoadSnapshot(self.name, waiting=len(self.queue), running=int(self.busy),
                            pending_prefill_tokens=tokens, queued_prefill_s=seconds)

    def share(self, replica: int, t: float) -> tuple[int, float]:
        """Replica ``replica``'s own work here now: what it queued, and the running prefill if it
        queued that too."""
        tokens, seconds = self.own[replica]
        if self.owner == replica:
            tokens, seconds = tokens + self.running_uncached, seconds + max(0.0, self.busy_until - t)
        return tokens, seconds

    def push(self, q: QueuedPrefill) -> None:
        """Queue ``q`` last, adding its estimates to the totals and to its replica's share."""
        self.queue.append(q)
        self._account(q, 1)

    def take(self, q: QueuedPrefill | None = None) -> QueuedPrefill:
        """Remove ``q`` (default: the head) from the queue and its estimates from the accounts."""
        if q is None:
            q = self.queue.popleft()
        else:
            self.queue.remove(q)
        self._account(q, -1)
        return q

    def _account(self, q: QueuedPrefill, sign: int) -> None:
        self.pending_tokens += sign * q.uncached
        self.queued_s += sign * q.predicted_s
        if self.own:
            self.own[q.replica][0] += sign * q.uncached
            self.own[q.replica][1] += sign * q.predicted_s


@dataclass
class DecodeState:
    name: str
    active: int = 0
    tokens: int = 0
