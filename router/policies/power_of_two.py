"""``power_of_two``: two random candidates, the less loaded wins (Mitzenmacher's two choices)."""
from __future__ import annotations

from typing import Sequence

from pdserve.base.types import LoadSnapshot
from router.policies.base import Choice, PolicyContext, RouteRequest, load_key


class PowerOfTwoPolicy:
    """Samples two distinct candidates from a seeded generator."""

    name = "power_of_two"
    uses_prefix = False

    def __init__(self, ctx: PolicyContext = PolicyContext()) -> None:
        self._rng = ctx.rng()

    def select(self, request: RouteRequest, candidates: Sequence[LoadSnapshot]) -> Choice:
        ordered = sorted(candidates, key=lambda c: c.instance)
        pair = self._rng.sample(ordered, 2) if len(ordered) > 1 else ordered
        return Choice(min(pair, key=load_key).instance, "load")
