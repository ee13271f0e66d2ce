"""The routing-policy interface: request features and load snapshots in, one choice out.

Policies are small pure classes: no I/O, no clocks; state only where the policy is defined by it
(a round-robin cursor, an approximate view of what each instance has cached, hash rings). The
same classes run in the live router and in the simulator (``pdserve simulate``). Prefill and
decode pools each get their own policy object.
"""
from __future__ import annotations

import random

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import xxhash

from pdserve.base.types import LoadSnapshot

ROUTER_BLOCK_TOKENS = 512
"""Tokens per router block hash by default: independent of the engine's KV block size, long enough
that a block is a meaningful prefix unit (DualMap's and Mooncake's 512)."""


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may look at of a request."""

    request_id: str
    block_hashes: tuple[int, ...]
    """Chained hashes of the prompt's full router blocks (``PolicyContext.block_size`` tokens
    each): equal leading hashes mean an equal prefix. Empty when the policy does not use them."""
    num_tokens: int
    """Prompt tokens."""
    max_tokens: int = 0
    ttft_slo_ms: float = 0.0
    tpot_slo_ms: float = 0.0
    priority: int = 0


@dataclass(frozen=True)
class PolicyContext:
    """What every policy may be built with (the deployment's constants, not live state)."""

    block_size: int = ROUTER_BLOCK_TOKENS
    """Tokens per block hash in ``RouteRequest.block_hashes``."""
    cache_blocks: int = 1024
    """Prefix-cache capacity of one instance, in those blocks (for approximate cache views)."""
    latency: object | None = None
    """A ``router.latency.LatencyModel`` for TTFT/TPOT predictions, or None (tokens as cost)."""
    ttft_slo_ms: float = 0.0
    """TTFT target for requests that set none (0: none)."""
    seed: int = 0
    """Seed of every random choice."""
    replica: int = 0
    """The router replica this policy serves. Its random draws (``rng``) are seeded with ``seed``
    and the replica, so replicas draw independently; hash rings use ``seed`` alone, so every
    replica maps a key to the same instances. The simulator numbers its replicas 0, 1, ...; a
    live router draws its own at random (``RouterServer``), so replicas of one deployment, on
    any node, do not draw the same sequence."""

    def rng(self) -> random.Random:
        """A generator for this policy's random draws (replica 0: seeded with ``seed`` itself)."""
        return random.Random(self.seed + 1_000_003 * self.replica)


@dataclass(frozen=True)
class Choice:
    """A policy's answer: the chosen instance and why (a low-cardinality word for metrics:
    ``rotation``, ``random``, ``load``, ``affinity``, ``owner``, ``slo_switch``, ``rebalance``, ...)."""

    instance: str
    reason: str
    predicted_ttft_s: float | None = None
    """The policy's TTFT prediction for the chosen instance, where it makes one."""
    cached_tokens: int = 0
    """The policy's estimate of the prompt tokens the chosen instance has cached (0: unknown)."""


@dataclass(frozen=True)
class QueuedRequest:
    """A request waiting in the router for its prefill instance (not started), with its predicted
    prefill seconds there."""

    request: RouteRequest
    prefill_s: float
    arrived_s: float = 0.0
    """When the request arrived, on the clock of ``InstanceQueue.now_s`` (a queued request's
    record does not change while it waits, so a caller can keep it instead of rebuilding it)."""


REBALANCE_WINDOW = 64
"""Queued requests per instance a rebalancing round looks at: the last ones (the candidates with the
largest gains); the work queued ahead of them is folded into ``InstanceQueue.busy_s``."""


@dataclass(frozen=True)
class InstanceQueue:
    """One prefill instance's work as the router sees it: the predicted seconds before the listed
    requests can start (what the engine already runs, plus queued requests ahead of the window),
    then the last ``REBALANCE_WINDOW`` queued requests in service order."""

    instance: str
    busy_s: float
    items: tuple[QueuedRequest, ...] = ()
    now_s: float = 0.0
    """The time of this view, on the items' ``arrived_s`` clock."""

    def wait_s(self) -> float:
        """Predicted time until everything queued here has been prefilled."""
        return self.busy_s + sum(q.prefill_s for q in self.items)

    def waited_s(self, item: QueuedRequest) -> float:
        """Seconds ``item`` has waited so far (its TTFT so far)."""
        return self.now_s - item.arrived_s


@dataclass(frozen=True)
class Move:
    """A rebalancing decision: run queued request ``request_id`` on ``target`` instead, where its
    predicted prefill takes ``prefill_s``."""

    request_id: str
    target: str
    prefill_s: float


class Policy(Protocol):
    """Chooses one of ``candidates`` (never empty, all alive) for ``request``."""

    name: str
    uses_prefix: bool
    """Whether the policy reads ``RouteRequest.block_hashes`` (the router hashes only for those)."""

    def select(self, request: RouteRequest, candidates: Sequence[LoadSnapshot]) -> Choice:
        """Return the chosen candidate's instance name and the reason."""
        ...


def block_hashes(token_ids: Sequence[int] | np.ndarray, block_size: int) -> tuple[int, ...]:
    """Chained 64-bit hashes of the full ``block_size``-token blocks of a prompt: block i's hash is
    xxh3 of its tokens (int32 bytes) seeded with block i-1's, so it identifies the whole prefix.
    Deterministic across processes; one C call per block over a contiguous int32 buffer."""
    ids = np.ascontiguousarray(token_ids, dtype=np.int32)
    full = len(ids) // block_size
    if not full:
        return ()
    data, step, prev, out = memoryview(ids[:full * block_size]).cast("B"), block_size * 4, 0, []
    for start in range(0, full * step, step):
        prev = xxhash.xxh3_64_intdigest(data[start:start + step], prev)
        out.append(prev)
    return tuple(out)


def cached_tokens(num_tokens: int, hit_blocks: int, block_size: int) -> int:
    """Prompt tokens a cached prefix of ``hit_blocks`` blocks saves: at least one token of the
    prompt is always computed (the engine needs its logits)."""
    return min(hit_blocks * block_size, max(num_tokens - 1, 0))


def load_key(s: LoadSnapshot) -> tuple[float, ...]:
    """How loaded a prefill candidate is: queued prefill work first, then requests."""
    return (s.queued_prefill_s, s.pending_prefill_tokens, s.waiting + s.running, s.instance)
