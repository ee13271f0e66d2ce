"""``random``: a uniformly random candidate (seeded)."""
from __future__ import annotations

from typing import Sequence

from pdserve.base.types import LoadSnapshot
from router.policies.base import Choice, PolicyContext, RouteRequest


class RandomPolicy:
    """Uniform over the candidates in name order, from a seeded generator."""

    name = "random"
    uses_prefix = False

    def __init__(self, ctx: PolicyContext = PolicyContext()) -> None:
        self._rng = ctx.rng()

    def select(self, request: RouteRequest, candidates: Sequence[LoadSnapshot]) -> Choice:
        return Choice(self._rng.choice(sorted(c.instance for c in candidates)), "random")
