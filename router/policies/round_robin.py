"""``round_robin``: candidates in turn, in name order; ignores load and prefixes."""
from __future__ import annotations

from typing import Sequence

from pdserve.base.types import LoadSnapshot
from router.policies.base import Choice, PolicyContext, RouteRequest


class RoundRobinPolicy:
    """Cycles through the candidates; a dead instance's turn passes to the next live one."""

    name = "round_robin"
    uses_prefix = False

    def __init__(self, ctx: PolicyContext = PolicyContext()) -> None:
        self._cursor = 0

    def select(self, request: RouteRequest, candidates: Sequence[LoadSnapshot]) -> Choice:
        ordered = sorted(c.instance for c in candidates)
        choice = ordered[self._cursor % len(ordered)]
        self._cursor += 1
        return Choice(choice, "rotation")
