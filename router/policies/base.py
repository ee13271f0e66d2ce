"""The routing-policy interface: request features and load snapshots in, one instance name out.

Policies are small pure classes: no I/O, no clocks; state only where the policy is defined by it
(a round-robin cursor). Prefill and decode pools each get their own policy object.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from pdserve.types import LoadSnapshot


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may look at of a request."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    ttft_slo_ms: float = 0.0
    tpot_slo_ms: float = 0.0
    priority: int = 0


@dataclass(frozen=True)
class Choice:
    """A policy's answer: the chosen instance and why (a low-cardinality word for metrics:
    ``rotation``, ``affinity``, ``load``, ``slo_switch``, ``rebalance``, ...)."""

    instance: str
    reason: str


class Policy(Protocol):
    """Chooses one of ``candidates`` (never empty, all alive) for ``request``."""

    name: str

    def select(self, request: RouteRequest, candidates: Sequence[LoadSnapshot]) -> Choice:
        """Return the chosen candidate's instance name and the reason."""
        ...
