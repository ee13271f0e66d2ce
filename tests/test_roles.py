"""The adaptive mode's role balancer (``router.roles``): which engine changes role, to what and
when, from the SLO attainment of the last window of requests."""
from __future__ import annotations

import pytest

from pdserve.base.types import LoadSnapshot, Outcome, RequestRecord
from router.roles import RoleBalancer

LOADS = [LoadSnapshot("e0", running=1), LoadSnapshot("e1", running=5), LoadSnapshot("e2", running=3)]


def record(ttft_ok: bool, tpot_ok: bool) -> RequestRecord:
    """A finished request with a 1 s TTFT and a 0.1 s TPOT target."""
    return RequestRecord(Outcome.FINISHED, ttft_s=0.5 if ttft_ok else 2.0, inter_token_s=(0.05 if tpot_ok else 0.3,) * 2,
                         ttft_slo_s=1.0, tpot_slo_s=0.1)


def fed(balancer: RoleBalancer, ttft_ok: int, tpot_ok: int, n: int = 4) -> RoleBalancer:
    for i in range(n):
        balancer.on_request(record(i < ttft_ok, i < tpot_ok))
    return balancer


@pytest.mark.parametrize("roles,ttft_ok,tpot_ok,change", [
    ({}, 4, 4, None),                                             # both met: keep
    ({}, 1, 1, None),                                             # both short (overload): keep
    ({}, 4, 2, ("e1", "both", "decode", "tpot_short", 0.5)),      # the engine decoding most
    ({}, 2, 4, ("e0", "both", "prefill", "ttft_short", 0.5)),     # the engine decoding least
    ({"e2": "prefill"}, 4, 2, ("e2", "prefill", "both", "tpot_short", 0.5)),  # undo first
    ({"e1": "decode"}, 2, 4, ("e1", "decode", "both", "ttft_short", 0.5)),
    ({"e0": "decode", "e1": "decode"}, 4, 2, ("e2", "both", "prefill", "tpot_short", 0.5)),  # completes the split
    ({"e0": "decode", "e1": "decode"}, 2, 4, ("e0", "decode", "both", "ttft_short", 0.5)),
])
def test_role_changes(roles, ttft_ok, tpot_ok, change):
    balancer = RoleBalancer(["e0", "e1", "e2"], window=4, cooldown_s=0.0)
    balancer.roles.update(roles)
    got = fed(balancer, ttft_ok, tpot_ok).rebalance(LOADS, now=100.0)
    assert (got and (got.instance, got.old, got.new, got.reason, got.attainment)) == change
    if got:
        assert balancer.roles[got.instance] == got.new


@pytest.mark.parametrize("start,steps", [
    ({}, [("tpot", ("e1", "both", "decode")), ("tpot", ("e0", "both", "prefill")), ("tpot", None),
          ("ttft", ("e1", "decode", "both")), ("ttft", None)]),
    ({"e0": "prefill"}, [("tpot", ("e0", "prefill", "both")), ("tpot", ("e1", "both", "decode")),
                         ("tpot", ("e0", "both", "prefill")), ("tpot", None)]),
])
def test_tpot_short_ends_at_the_fixed_split_and_does_not_oscillate(start, steps):
    """Two engines: TPOT short moves them to one prefill and one decode engine and no further; a
    role is never undone for the reason that made it."""
    balancer = RoleBalancer(["e0", "e1"], window=4, cooldown_s=0.0)
    balancer.roles.update(start)
    for short, change in steps:
        got = fed(balancer, 4 if short == "tpot" else 2, 2 if short == "tpot" else 4).rebalance(LOADS[:2], now=100.0)
        assert (got and (got.instance, got.old, got.new)) == change


def test_a_change_waits_for_a_full_window_and_the_cooldown():
    balancer = RoleBalancer(["e0", "e1", "e2"], window=4, cooldown_s=10.0)
    assert fed(balancer, 4, 2, n=3).rebalance(LOADS, now=0.0) is None    # 3 of 4 requests seen
    assert fed(balancer, 4, 2, n=1).rebalance(LOADS, now=0.0).new == "decode"
    assert fed(balancer, 4, 2).rebalance(LOADS, now=5.0) is None         # within the cooldown
    assert fed(balancer, 4, 2).rebalance(LOADS, now=20.0).instance == "e2"
    assert not balancer.takes_prompts("e1") and balancer.takes_decodes("e1") and balancer.takes_prompts("e0")


def test_requests_without_slo_are_not_counted():
    balancer = RoleBalancer(["e0", "e1"], window=2, cooldown_s=0.0)
    for _ in range(4):
        balancer.on_request(RequestRecord(Outcome.FINISHED, ttft_s=9.0))
    assert balancer.rebalance(LOADS[:2], now=1.0) is None


def test_a_zero_window_never_changes_roles():
    balancer = RoleBalancer(["e0", "e1", "e2"], window=0, cooldown_s=0.0)
    assert fed(balancer, 4, 0).rebalance(LOADS, now=100.0) is None
