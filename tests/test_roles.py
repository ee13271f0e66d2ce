"""The adaptive mode's role balancer (``router.roles``): which engine changes role, to what and
when, from the SLO attainment of the window of recent requests."""
from __future__ import annotations

import pytest

from pdserve.base.types import LoadSnapshot, Outcome, RequestRecord
from router.roles import RoleBalancer

LOADS = [LoadSnapshot("e0", running=1), LoadSnapshot("e1", running=5), LoadSnapshot("e2", running=3)]


def record(ttft_ok: bool, tpot_ok: bool, e2e_s: float = 1.0) -> RequestRecord:
    """A finished request with a 1 s TTFT and a 0.1 s TPOT target that took ``e2e_s``."""
    return RequestRecord(Outcome.FINISHED, ttft_s=0.5 if ttft_ok else 2.0, inter_token_s=(0.05 if tpot_ok else 0.3,) * 2,
                         ttft_slo_s=1.0, tpot_slo_s=0.1, e2e_s=e2e_s)


def fed(balancer: RoleBalancer, ttft_ok: int, tpot_ok: int, n: int = 4, e2e_s: float = 1.0) -> RoleBalancer:
    for i in range(n):
        balancer.on_request(record(i < ttft_ok, i < tpot_ok, e2e_s))
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
    ({"e0": "prefill", "e1": "prefill"}, 4, 4, None),
])
def test_role_changes(roles, ttft_ok, tpot_ok, change):
    balancer = RoleBalancer(["e0", "e1", "e2"], window=4, cooldown_s=0.0)
    balancer.roles.update(roles)
    got = fed(balancer, ttft_ok, tpot_ok).rebalance(LOADS, now=100.0)
    assert [(c.instance, c.old, c.new, c.reason, c.attainment) for c in got] == ([change] if change else [])
    for c in got:
        assert balancer.roles[c.instance] == c.new


@pytest.mark.parametrize("names,start,steps", [
    (["e0", "e1"], {}, [("tpot", [("e1", "both", "decode"), ("e0", "both", "prefill")]), ("tpot", []),
                        ("ttft", [("e1", "decode", "both")]), ("ttft", [])]),
    (["e0", "e1"], {"e0": "prefill"}, [("tpot", [("e0", "prefill", "both")]),
                                       ("tpot", [("e1", "both", "decode"), ("e0", "both", "prefill")]), ("tpot", [])]),
    (["e0", "e1", "e2"], {}, [("tpot", [("e1", "both", "decode")]),
                              ("tpot", [("e2", "both", "decode"), ("e0", "both", "prefill")]), ("tpot", [])]),
])
def test_tpot_short_ends_at_a_split_and_does_not_oscillate(names, start, steps):
    """TPOT short moves the engines to decode and, in the step that would leave one ``both`` engine
    beside decode engines, that one to prefill; no further. A role is never undone for the reason
    that made it."""
    balancer = RoleBalancer(names, window=4, cooldown_s=0.0)
    balancer.roles.update(start)
    for now, (short, changes) in enumerate(steps, start=100):
        got = fed(balancer, 4 if short == "tpot" else 2, 2 if short == "tpot" else 4).rebalance(LOADS[:len(names)], now=now)
        assert [(c.instance, c.old, c.new) for c in got] == changes


def test_a_clear_shortfall_acts_before_the_window_fills_then_the_cooldown_holds():
    """A 20-request window at a 0.9 target may hold 2 misses: the third acts at once."""
    balancer = RoleBalancer(["e0", "e1", "e2"], window=20, cooldown_s=10.0)
    assert fed(balancer, 10, 8, n=10).rebalance(LOADS, now=0.0) == []      # 2 TPOT misses
    assert [c.new for c in fed(balancer, 1, 0, n=1).rebalance(LOADS, now=0.0)] == ["decode"]
    assert fed(balancer, 3, 0, n=3).rebalance(LOADS, now=5.0) == []        # within the cooldown
    assert [c.instance for c in fed(balancer, 3, 0, n=3).rebalance(LOADS, now=20.0)] == ["e2", "e0"]
    assert not balancer.takes_prompts("e1") and balancer.takes_decodes("e1") and balancer.takes_prompts("e0")


def test_requests_that_began_before_a_change_are_not_counted():
    balancer = RoleBalancer(["e0", "e1", "e2"], window=20, cooldown_s=0.0)
    assert [c.new for c in fed(balancer, 3, 0, n=3).rebalance(LOADS, now=10.0)] == ["decode"]
    assert fed(balancer, 3, 0, n=3, e2e_s=5.0).rebalance(LOADS, now=12.0) == []   # began at 7 s
    assert [c.new for c in fed(balancer, 3, 0, n=3, e2e_s=1.0).rebalance(LOADS, now=12.0)] == ["decode", "prefill"]


@pytest.mark.parametrize("window,misses,acts", [(50, 5, False), (50, 6, True), (10, 1, False), (10, 2, True), (20, 3, True)])
def test_the_misses_a_window_may_hold(window, misses, acts):
    balancer = RoleBalancer(["e0", "e1", "e2"], window=window, cooldown_s=0.0)
    got = fed(balancer, window, window - misses, n=window).rebalance(LOADS, now=1.0)
    assert bool(got) == acts


def test_requests_without_slo_are_not_counted():
    balancer = RoleBalancer(["e0", "e1"], window=2, cooldown_s=0.0)
    for _ in range(4):
        balancer.on_request(RequestRecord(Outcome.FINISHED, ttft_s=9.0))
    assert balancer.rebalance(LOADS[:2], now=1.0) == []


def test_a_zero_window_never_changes_roles():
    balancer = RoleBalancer(["e0", "e1", "e2"], window=0, cooldown_s=0.0)
    assert fed(balancer, 4, 0).rebalance(LOADS, now=100.0) == []


@pytest.mark.parametrize("headroom,tpot_s,acts", [(1.0, 0.09, False), (0.8, 0.09, True), (0.8, 0.079, False),
                                                  (0.8, 0.3, True), (1.0, 0.3, True)])
def test_a_phase_near_its_slo_is_short_before_it_misses(headroom, tpot_s, acts):
    """With headroom below 1, requests that met the TPOT SLO within less than that margin count
    against decode: the split comes while attainment still meets the target."""
    balancer = RoleBalancer(["e0", "e1"], window=10, cooldown_s=0.0, headroom=headroom)
    for i in range(10):
        balancer.on_request(RequestRecord(Outcome.FINISHED, ttft_s=0.5, inter_token_s=(0.05 if i < 8 else tpot_s,) * 2,
                                          ttft_slo_s=1.0, tpot_slo_s=0.1, e2e_s=1.0))
    got = balancer.rebalance(LOADS[:2], now=1.0)
    assert [(c.new, c.reason) for c in got] == ([("decode", "tpot_short"), ("prefill", "tpot_short")] if acts else [])
