"""``SplitRule``: whether an adaptive deployment disaggregates a request (``mode: adaptive``).

In that mode every engine is ``kv_both``: it can prefill for a remote decode, decode from remote
KV, or serve a request whole. The dispatcher asks the rule once per request, after admission has
chosen the engine that will run its prompt:

- **whole**, on that engine, when the engine has no running decodes (nothing to interfere with,
  and the KV hop would only add latency), when the prompt's predicted prefill fits within one
  token's TPOT budget (the stall it causes every running decode is within the SLO), or when no
  other engine is live to decode it;
- **disaggregated** otherwise, and always when the engine's role is ``prefill``: the engine
  prefills and holds the KV, and the decode runs on another engine chosen by the decode policy,
  so the running decodes keep their pace.

Pure: load comes in as a snapshot, the latency model is the router's (refit online).
"""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.base.types import LoadSnapshot
from router.latency import LatencyModel


@dataclass(frozen=True)
class SplitDecision:
    """The rule's verdict and its reason (a decision label in the metrics)."""

    disaggregate: bool
    reason: str


class SplitRule:
    """Disaggregate a request when its prefill would stall its engine's running decodes by more
    than ``budget_s``: the request's TPOT SLO when it has one, else ``default_budget_s``."""

    def __init__(self, latency: LatencyModel, default_budget_s: float) -> None:
        self.latency, self.default_budget_s = latency, default_budget_s

    def decide(self, uncached_tokens: int, engine: LoadSnapshot, others_live: int,
               tpot_slo_ms: float = 0.0, decodes_here: bool = True) -> SplitDecision:
        """Called by the dispatcher once per request of an adaptive deployment: ``engine`` is the
        one admission chose for the prompt, ``others_live`` how many other engines could decode,
        ``decodes_here`` whether the engine's role takes decodes (``router.roles``)."""
        if not decodes_here and others_live:
            return SplitDecision(True, "split:prefill_role")
        if engine.running == 0:
            return SplitDecision(False, "whole:idle_engine")
        if others_live == 0:
            return SplitDecision(False, "whole:no_other_engine")
        budget = tpot_slo_ms / 1e3 if tpot_slo_ms > 0 else self.default_budget_s
        if self.latency.prefill_s(uncached_tokens) <= budget:
            return SplitDecision(False, "whole:short_prefill")
        return SplitDecision(True, "split:long_prefill")
