"""Routing policies, one class per file, registered by name (``make_policy("dualmap", ctx)``).

Prefill: round_robin, random, least_loaded, power_of_two, consistent_hash, cache_aware, kv_cost,
min_ttft, dualmap. Decode: decode_p2c (default), or any of the load-only ones.
"""
from __future__ import annotations

from typing import Any, Callable

from router.policies.base import (Choice, InstanceQueue, Move, Policy, PolicyContext, QueuedRequest, RouteRequest,
                                   block_hashes)
from router.policies.cache_aware import CacheAwarePolicy
from router.policies.consistent_hash import ConsistentHashPolicy
from router.policies.decode_power_of_two import DecodePowerOfTwoPolicy
from router.policies.dualmap import DualMapPolicy
from router.policies.kv_cost import KvCostPolicy
from router.policies.least_loaded import LeastLoadedPolicy
from router.policies.min_ttft import MinTtftPolicy
from router.policies.power_of_two import PowerOfTwoPolicy
from router.policies.random_choice import RandomPolicy
from router.policies.round_robin import RoundRobinPolicy

POLICIES: dict[str, Callable[..., Policy]] = {cls.name: cls for cls in (
    RoundRobinPolicy, RandomPolicy, LeastLoadedPolicy, PowerOfTwoPolicy, ConsistentHashPolicy,
    CacheAwarePolicy, KvCostPolicy, MinTtftPolicy, DualMapPolicy, DecodePowerOfTwoPolicy)}
PREFILL_POLICIES = ("round_robin", "random", "least_loaded", "power_of_two", "consistent_hash", "cache_aware",
                    "kv_cost", "min_ttft", "dualmap")


def make_policy(name: str, ctx: PolicyContext | None = None, **params: Any) -> Policy:
    """A new policy object by registered name; ValueError names the known ones."""
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return POLICIES[name](ctx or PolicyContext(), **params)


__all__ = ["POLICIES", "PREFILL_POLICIES", "Choice", "InstanceQueue", "Move", "Policy", "PolicyContext", "QueuedRequest",
           "RouteRequest", "block_hashes", "make_policy"]
