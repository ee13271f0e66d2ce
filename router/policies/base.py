"""The routing-policy interface: request features and load snapshots in, one choice out.

Policies are small pure classes: no I/O, no clocks; state only where the policy is defined by it
(a round-robin cursor, an approximate view of what each instance has cached, hash rings). The
same classes run in the live router and in the simulator (``pdserve simulate``). Prefill and
decode pools each get their own policy object.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from pdserve.types import LoadSnapshot


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may look at of a request."""

    request_id: str
    block_hashes: tuple[int, ...]
    """Chained hashes of the prompt's full blocks: equal leading hashes mean an equal prefix."""
    num_tokens: int
    """Prompt tokens."""
    max_tokens: int = 0
    ttft_slo_ms: float = 0.0
    tpot_slo_ms: float = 0.0
    priority: int = 0


@dataclass(frozen=True)
class PolicyContext:
    """What every policy may be built with (the deployment's constants, not live state)."""

    block_size: int = 32
    """Tokens per block hash in ``RouteRequest.block_hashes``."""
    cache_blocks: int = 1024
    """Prefix-cache capacity of one instance, in blocks (for approximate cache views)."""
    latency: object | None = None
    """A ``router.latency.LatencyModel`` for TTFT/TPOT predictions, or None (tokens as cost)."""
    ttft_slo_ms: float = 0.0
    """TTFT target for requests that set none (0: none)."""
    seed: int = 0
    """Seed of every random choice."""


@dataclass(frozen=True)
class Choice:
    """A policy's answer: the chosen instance and why (a low-cardinality word for metrics:
    ``rotation``, ``random``, ``load``, ``affinity``, ``slo_switch``, ``rebalance``, ...)."""

    instance: str
    reason: str
    predicted_ttft_s: float | None = None
    """The policy's TTFT prediction for the chosen instance, where it makes one (dualmap)."""


class Policy(Protocol):
    """Chooses one of ``candidates`` (never empty, all alive) for ``request``."""

    name: str

    def select(self, request: RouteRequest, candidates: Sequence[LoadSnapshot]) -> Choice:
        """Return the chosen candidate's instance name and the reason."""
        ...


def block_hashes(token_ids: Sequence[int], block_size: int) -> tuple[int, ...]:
    """Chained hashes of the full ``block_size``-token blocks of a prompt (an engine-style prefix
    key: block i's hash depends on every token before its end). Deterministic across processes."""
    out, prev = [], 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        prev = hash((prev, tuple(token_ids[start:start + block_size])))
        out.append(prev)
    return tuple(out)


def load_key(s: LoadSnapshot) -> tuple[float, ...]:
    """How loaded a prefill candidate is: queued prefill work first, then requests."""
    return (s.pending_prefill_tokens, s.waiting + s.running, s.instance)
