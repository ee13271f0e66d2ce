"""``least_loaded``: the candidate with the least queued prefill work (then fewest requests)."""
from __future__ import annotations

from typing import Sequence

from pdserve.base.types import LoadSnapshot
from router.policies.base import Choice, PolicyContext, RouteRequest, load_key


class LeastLoadedPolicy:
    """Global minimum of ``load_key``; ties go to the lower name."""

    name = "least_loaded"
    uses_prefix = False

    def __init__(self, ctx: PolicyContext = PolicyContext()) -> None:
        pass

    def select(self, request: RouteRequest, candidates: Sequence[LoadSnapshot]) -> Choice:
        return Choice(min(candidates, key=load_key).instance, "load")
