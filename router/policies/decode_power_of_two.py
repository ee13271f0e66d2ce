"""``decode_p2c``: the default decode policy. Two random candidates; the one with the lower
(KV-cache usage, running batch) wins, unless its predicted TPOT with this request added
(latency model) exceeds the request's TPOT SLO while the other's does not (``slo_switch``)."""
from __future__ import annotations

from typing import Sequence

from pdserve.base.types import LoadSnapshot
from router.policies.base import Choice, PolicyContext, RouteRequest


class DecodePowerOfTwoPolicy:
    """Power of two on decode load, with a TPOT check."""

    name = "decode_p2c"
    uses_prefix = False

    def __init__(self, ctx: PolicyContext = PolicyContext()) -> None:
        self.ctx = ctx
        self._rng = ctx.rng()

    def select(self, request: RouteRequest, candidates: Sequence[LoadSnapshot]) -> Choice:
        ordered = sorted(candidates, key=lambda c: c.instance)
        pair = self._rng.sample(ordered, 2) if len(ordered) > 1 else ordered
        ranked = sorted(pair, key=lambda c: (c.kv_cache_usage, c.running, c.instance))
        best, other = ranked[0], ranked[-1]
        if (request.tpot_slo_ms and self.ctx.latency is not None and best is not other
                and self._tpot_s(request, best) > request.tpot_slo_ms / 1e3 >= self._tpot_s(request, other)):
            return Choice(other.instance, "slo_switch")
        return Choice(best.instance, "load")

    def _tpot_s(self, request: RouteRequest, c: LoadSnapshot) -> float:
        return self.ctx.latency.decode_step_s(c.running + 1, request.num_tokens + request.max_tokens / 2)
