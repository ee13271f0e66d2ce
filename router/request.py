"""``RouterRequest``: one request's state machine and timings, owned by the router."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from pdserve.base.types import PromptInput, RequestState, SamplingSpec

_ALLOWED: dict[RequestState, set[RequestState]] = {
    RequestState.QUEUED: {RequestState.PREFILLING, RequestState.REJECTED},
    RequestState.PREFILLING: {RequestState.TRANSFERRING, RequestState.DECODING, RequestState.FINISHED},
    RequestState.TRANSFERRING: {RequestState.DECODING, RequestState.FINISHED},
    RequestState.DECODING: {RequestState.FINISHED},
}
_ANY_LIVE_TO = {RequestState.CANCELLED, RequestState.FAILED, RequestState.REJECTED}


class IllegalTransition(RuntimeError):
    """A state change the state machine does not allow (a router bug)."""


@dataclass
class RouterRequest:
    """A client request as the router tracks it."""

    request_id: str
    prompt: PromptInput
    sampling: SamplingSpec
    ttft_slo_ms: float = 0.0
    tpot_slo_ms: float = 0.0
    priority: int = 0
    state: RequestState = RequestState.QUEUED
    arrival: float = field(default_factory=time.perf_counter)
    marks: dict[str, float] = field(default_factory=dict)
    """perf_counter times at which states were entered (and ``first_token``)."""

    def to(self, state: RequestState) -> None:
        """Move to ``state``; raises IllegalTransition for a change the machine forbids."""
        if self.state.terminal or not (state in _ALLOWED.get(self.state, set()) or state in _ANY_LIVE_TO):
            raise IllegalTransition(f"{self.request_id}: {self.state.value} -> {state.value}")
        self.state = state
        self.marks[state.value] = time.perf_counter()

    def mark(self, name: str) -> None:
        """Record a named instant (e.g. ``first_token``)."""
        self.marks[name] = time.perf_counter()

    def since_arrival_ms(self, name: str) -> float:
        """Milliseconds from arrival to a recorded instant (0 if it never happened)."""
        return (self.marks[name] - self.arrival) * 1e3 if name in self.marks else 0.0
