"""Routing policies, registered by name (``make_policy("round_robin")``)."""
from __future__ import annotations

from typing import Any, Callable

from router.policies.base import Choice, Policy, RouteRequest
from router.policies.round_robin import RoundRobinPolicy

POLICIES: dict[str, Callable[..., Policy]] = {
    RoundRobinPolicy.name: RoundRobinPolicy,
}


def make_policy(name: str, **params: Any) -> Policy:
    """A new policy object by registered name; ValueError names the known ones."""
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return POLICIES[name](**params)


__all__ = ["POLICIES", "Choice", "Policy", "RouteRequest", "make_policy"]
