"""The adaptive mode's per-request rule (``router.split``): served whole on an idle engine or when
the prompt's prefill fits one token's TPOT budget, disaggregated when it would stall the engine's
running decodes past it."""
from __future__ import annotations

import pytest

from pdserve.base.types import LoadSnapshot
from router.latency import LatencyModel
from router.split import SplitRule

# a prefill costs 10 ms + 1 ms per token: 40 tokens take 50 ms, 190 tokens 200 ms
MODEL = LatencyModel(prefill=(0.01, 0.001, 0.0), decode=(0.01, 0.0, 0.0), origin="test")


@pytest.mark.parametrize("tokens,running,others,tpot_slo_ms,disaggregate,reason", [
    (2000, 0, 1, 0.0, False, "whole:idle_engine"),       # nothing decodes there: no KV hop
    (40, 3, 1, 0.0, False, "whole:short_prefill"),       # 50 ms <= the 100 ms default budget
    (190, 3, 1, 0.0, True, "split:long_prefill"),        # 200 ms > 100 ms
    (190, 3, 0, 0.0, False, "whole:no_other_engine"),    # nowhere else to decode
    (190, 3, 1, 250.0, False, "whole:short_prefill"),    # the request's own TPOT SLO is the budget
    (40, 3, 1, 40.0, True, "split:long_prefill"),        # 50 ms > a 40 ms TPOT SLO
])
def test_split_rule(tokens, running, others, tpot_slo_ms, disaggregate, reason):
    rule = SplitRule(MODEL, default_budget_s=0.1)
    decision = rule.decide(tokens, LoadSnapshot("e0", running=running), others, tpot_slo_ms)
    assert (decision.disaggregate, decision.reason) == (disaggregate, reason)


def test_an_engine_in_the_prefill_role_always_splits():
    rule = SplitRule(MODEL, default_budget_s=0.1)
    decision = rule.decide(10, LoadSnapshot("e0", running=0), 1, decodes_here=False)
    assert (decision.disaggregate, decision.reason) == (True, "split:prefill_role")
    assert not rule.decide(10, LoadSnapshot("e0", running=0), 0, decodes_here=False).disaggregate
