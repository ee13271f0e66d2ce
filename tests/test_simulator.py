"""The cluster simulator: exact results in small hand-computed cases, the trace loaders, the
capacity search, and that it runs the live router's own policy classes."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from pdserve.sim import traces
from pdserve.sim.cluster import ClusterSim, SimConfig
from pdserve.sim.study import capacity, capacity_bound_rps, markdown_table, percentile, summarize
from router.latency import LatencyModel
from router.policies import POLICIES

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
LINEAR = LatencyModel(prefill=(0.0, 0.001, 0.0), decode=(0.01, 0.0, 0.0), origin="test: 1 ms per prompt token")
TINY = SimConfig(prefill=1, decode=1, block_size=4, cache_blocks=1000, ttft_slo_s=0.095, kv_bandwidth_bps=1e18)
SHARED_BLOCKS = tuple(range(25))  # 25 blocks x 4 tokens = a 100-token prompt


def tiny_trace() -> list[traces.TraceRequest]:
    return [traces.TraceRequest(0.0, 100, 5, SHARED_BLOCKS),
            traces.TraceRequest(0.01, 100, 5, SHARED_BLOCKS),             # same prompt: 99 tokens cached
            traces.TraceRequest(0.5, 100, 1, tuple(range(100, 125)))]     # a new prompt on an idle instance


@pytest.mark.parametrize("scale,ttft,attainment", [
    (1.0, [0.1, 0.091, 0.1], 1 / 3),   # B waits for A (0.1 s), then prefills 1 uncached token
    (2.0, [0.1, 0.096, 0.1], 0.0),     # arrivals compressed 2x: B arrives at 0.005 s, misses 0.095 s
])
def test_ttft_is_exact(scale, ttft, attainment):
    result = ClusterSim(TINY, LINEAR, "round_robin").run(tiny_trace(), scale)
    assert result.ttft_s == pytest.approx(ttft)
    assert result.cached_tokens == 99 and result.input_tokens == 300
    assert result.tpot_s == pytest.approx([0.01, 0.01])            # one-token requests have no TPOT
    assert result.attainment == pytest.approx(attainment)
    assert result.busy_s == pytest.approx([0.201])


def test_percentile_matches_numpy_linear():
    assert [percentile([1, 2, 3, 4], q) for q in (0, 50, 90, 100)] == pytest.approx([1, 2.5, 3.7, 4])


@pytest.mark.parametrize("name", ["round_robin", "least_loaded", "consistent_hash", "cache_aware", "kv_cost", "dualmap"])
def test_simulator_runs_the_router_policy_classes(name):
    sim = ClusterSim(SimConfig(prefill=4, decode=2, ttft_slo_s=30.0), LatencyModel.load(), name)
    result = sim.run(traces.synthetic(300, rate=0.5, seed=3))
    assert type(sim._p_policy) is POLICIES[name]
    assert len(result.ttft_s) == 300 and all(t > 0 for t in result.ttft_s)
    assert sum(result.decisions.values()) >= 300


def test_dualmap_rebalances_in_the_simulator():
    burst = [traces.TraceRequest(0.001 * i, 4000, 10, (42,)) for i in range(60)]  # one hot key, all at once: the
    # queue violates the 30 s SLO at once (each prefill ~5 s)
    sim = ClusterSim(SimConfig(prefill=8, decode=2, ttft_slo_s=30.0), LatencyModel.load(), "dualmap",
                     policy_params={"slo_aware": False, "slo_fallback": 0})  # every arrival: the affine instance
    result = sim.run(burst)
    assert result.decisions["rebalance"] > 0
    assert sum(b > 0 for b in result.busy_s) == 2    # moves stay within the key's two candidates


def test_capacity_search_brackets_the_target():
    requests = traces.synthetic(400, rate=1.0, seed=5)
    sim = ClusterSim(SimConfig(prefill=4, decode=2, ttft_slo_s=20.0), LatencyModel.load(), "least_loaded")
    scale, points = capacity(sim, requests, guess=1.0)
    assert scale > 0 and sim.run(requests, scale).attainment >= 0.9
    assert any(s <= scale * 1.5 and a < 0.9 for s, a in points if s > scale)
    summary = summarize(sim.run(requests, scale), base_rate=1.0)
    assert summary["slo_attainment"] >= 0.9 and set(summary["ttft_s"]) == {"p50", "p90", "p99"}
    table = markdown_table({"capacity_rps": {"least_loaded": scale}, "dualmap_capacity_ratio": {},
                            "at_reference_rate": {"least_loaded": summary}})
    assert table.count("\n") == 2 and "| least_loaded |" in table


def test_synthetic_workload_is_seeded_and_shares_prefixes():
    a, b = traces.synthetic(200, 2.0, seed=9), traces.synthetic(200, 2.0, seed=9)
    assert a == b and a != traces.synthetic(200, 2.0, seed=10)
    firsts = {r.hashes[0] for r in a}
    assert 1 < len(firsts) < 50 and all(len(r.hashes) == math.ceil(r.input_len / 512) for r in a)


@pytest.mark.skipif(not (SHARED / "mooncake_fast25").is_dir(), reason="../shared/traces not present")
def test_mooncake_loader_spreads_ticks_and_keeps_prefixes():
    reqs = traces.load_mooncake(SHARED / "mooncake_fast25" / "conversation_trace.jsonl", limit=200)
    arrivals = [r.arrival_s for r in reqs]
    assert arrivals == sorted(arrivals) and len(set(arrivals)) == 200      # no two at the same instant
    assert all(len(r.hashes) == math.ceil(r.input_len / 512) for r in reqs)
    assert len({r.hashes[0] for r in reqs}) == 1                            # every request starts with block 0
    assert len({r.hashes[1] for r in reqs}) > 100


@pytest.mark.skipif(not (SHARED / "azure_llm_2023").is_dir(), reason="../shared/traces not present")
def test_azure_loader_has_lengths_and_no_sharing():
    reqs = traces.load_azure(SHARED / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv", limit=100)
    assert reqs[0].arrival_s == 0.0 and reqs[0].input_len == 374 and reqs[0].output_len == 44
    assert len({r.hashes[0] for r in reqs}) == 100


def test_capacity_bound_uses_one_infinite_cache_and_full_utilization():
    # 0.1 s + 0.001 s (99 of 100 tokens cached) + 0.1 s of work for 3 requests on 1 instance
    assert capacity_bound_rps(tiny_trace(), LINEAR, instances=1, block_size=4) == pytest.approx(3 / 0.201)
    assert capacity_bound_rps(tiny_trace(), LINEAR, instances=4, block_size=4) == pytest.approx(12 / 0.201)


def test_a_router_replica_sees_other_replicas_work_only_as_last_reported():
    """Two replicas, a load report every second: replica 1's request queued at 4.2 s is invisible
    to replica 0 until the report of 5 s; a prefill replica 1 starts at 5.3 s reaches replica 0
    with the report of 6 s, its remaining time priced at 6 s; each replica always sees its own
    work, and one router sees everything at once."""
    from pdserve.sim.queues import PrefillState, QueuedPrefill
    from router.policies import RouteRequest

    p = PrefillState("prefill-0", own=[[0, 0.0], [0, 0.0]], reported=[(0, 0.0), (0, 0.0)], report_every_s=1.0)
    for replica, (tokens, seconds) in enumerate([(100, 1.0), (300, 3.0)]):
        p.catch_up(4.2)  # the simulator takes due reports before every change
        p.push(QueuedPrefill(replica, RouteRequest(str(replica), (), tokens), seconds, tokens, replica))
    seen = lambda t, replica: (p.snapshot(t, replica).pending_prefill_tokens, p.snapshot(t, replica).queued_prefill_s)
    assert (seen(4.9, 0), seen(4.9, 1)) == ((100, 1.0), (300, 3.0))
    assert (seen(5.0, 0), seen(5.0, 1)) == ((400, 4.0), (400, 4.0))
    p.catch_up(5.3)
    p.owner, p.busy_until, p.running_uncached = 1, 7.5, 50
    assert seen(5.9, 0) == (400, 4.0)
    assert seen(6.4, 0) == (450, 5.5)       # 100 + 300 + 50 tokens; 1 + 3 + (7.5 - 6) s
    single = PrefillState("prefill-0", own=[[0, 0.0]], reported=[(0, 0.0)])
    single.pending_tokens, single.queued_s = 400, 4.0
    assert (single.snapshot(5.0).pending_prefill_tokens, single.snapshot(5.0).queued_prefill_s) == (400, 4.0)


@pytest.mark.parametrize("routers", [1, 3])
def test_runs_with_router_replicas_are_seeded_and_end(routers):
    requests = traces.synthetic(300, rate=2.0, seed=3)
    run = lambda: ClusterSim(SimConfig(prefill=4, decode=2, ttft_slo_s=20.0, routers=routers), LatencyModel.load(),
                             "dualmap").run(requests, 2.0)
    first, second = run(), run()
    assert first.ttft_s == second.ttft_s and all(t > 0 for t in first.ttft_s)
