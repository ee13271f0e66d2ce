"""Live routing on 2 prefill instances: under dualmap, two requests sharing a long prefix meet on
one prefill instance and the second hits that engine's prefix cache; round-robin splits them."""
from __future__ import annotations

import time

import grpc
import pytest
import ray

from conftest import start_router, stop_router, wait_until
from helpers import idle, reset_caches
from pdserve.client import PdServeClient, build_request

PREFIX = ("You are a meticulous support agent for a railway company. Policies: refunds within 30 days; "
          "seat upgrades subject to availability; pets travel free in carriers. ") * 8


@pytest.fixture(scope="module")
def two_prefill(cluster):
    """The session cluster plus a second prefill instance for this module."""
    extra = cluster.add_worker("prefill")
    yield cluster
    cluster.remove_worker(extra.name)


def _hits(cluster, name: str) -> int:
    worker = next(w for w in cluster.prefill if w.name == name)
    return ray.get(worker.actor.load.remote(), timeout=30).prefix_cache_hits


@pytest.mark.parametrize("policy,same_instance", [("dualmap", True), ("round_robin", False)])
def test_shared_prefix_requests_meet_under_dualmap(two_prefill, policy, same_instance):
    cluster = two_prefill
    assert [w.name for w in cluster.prefill] == ["prefill-0", "prefill-1"]
    reset_caches(cluster)
    router = start_router(cluster.prefill, cluster.decode, cluster.model_info, prefill_policy=policy)
    client = PdServeClient(router.target)
    try:
        first = client.complete(build_request(prompt=PREFIX + "Question: can I bring my cat?", max_tokens=4))
        target = first.final.prefill_instance
        hits_before = _hits(cluster, target)
        second = client.complete(build_request(prompt=PREFIX + "Question: how do refunds work?", max_tokens=4))
    finally:
        client.close()
        stop_router(router)
    assert (second.final.prefill_instance == target) == same_instance
    if same_instance:
        shared_blocks = (first.final.usage.prompt_tokens // 32) - 1
        assert second.final.usage.cached_prompt_tokens >= 32 * (shared_blocks - 1)
        assert _hits(cluster, target) - hits_before == second.final.usage.cached_prompt_tokens
    else:
        assert second.final.usage.cached_prompt_tokens == 0


# ---- the router-side admission queue, live on 2 prefill engines ------------------------------------

def _concurrently(fn, args: list) -> list:
    """Run ``fn(arg)`` for every arg on its own thread; results (or exceptions) in order."""
    from concurrent.futures import ThreadPoolExecutor

    def wrapped(arg):
        try:
            return fn(arg)
        except Exception as err:  # collected, asserted by the caller
            return err
    with ThreadPoolExecutor(len(args)) as pool:
        return list(pool.map(wrapped, args))


def _router(cluster, **settings):
    router = start_router(cluster.prefill, cluster.decode, cluster.model_info, metrics=False, **settings)
    return router, PdServeClient(router.target)


def test_a_queued_request_is_moved_by_live_rebalancing(two_prefill):
    """Eight requests of one conversation (about 1,000 tokens each) queue behind one engine (one
    prompt at a time), far past the 1.5 s TTFT SLO: the poller's rebalancing moves the last-queued
    to the other candidate, and the final message says so."""
    from pdserve.base.config import AdmissionConfig

    router, client = _router(two_prefill, prefill_policy="dualmap", slo_ttft_ms=1500,
                             prefill_params={"slo_aware": False, "adaptive_key": False},
                             admission=AdmissionConfig(max_engine_prompts=1, reject_factor=0))
    try:
        prompts = [PREFIX + f"Question {i}: " + "tell me more about the policies. " * 100 for i in range(8)]
        finals = _concurrently(lambda p: client.complete(build_request(prompt=p, max_tokens=2), timeout_s=120).final,
                               prompts)
    finally:
        client.close()
        stop_router(router)
    assert all(not isinstance(f, Exception) for f in finals), finals
    moved = [f for f in finals if f.prefill_reason == "rebalance"]
    affine = {f.prefill_instance for f in finals if f.prefill_reason == "affinity"}
    assert moved and len(affine) == 1, [(f.prefill_instance, f.prefill_reason, f.timings.queue_ms) for f in finals]
    assert all(f.prefill_instance not in affine for f in moved)  # moved to the conversation's other candidate
    assert router.server.prefill.admission.stats.moved == len(moved)


def test_early_rejection_when_the_slo_cannot_be_met(two_prefill):
    router, client = _router(two_prefill)
    try:
        with pytest.raises(grpc.RpcError) as info:
            client.complete(build_request(prompt=PREFIX, max_tokens=4, ttft_ms=1), timeout_s=60)
        ok = client.complete(build_request(prompt="Hello there", max_tokens=2), timeout_s=60)
    finally:
        client.close()
        stop_router(router)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "predicted TTFT" in info.value.details() and "exceeds 3 x the 0.00 s TTFT SLO" in info.value.details()
    assert dict(info.value.trailing_metadata()).get("retry-after-s")
    assert ok.final.finish_reason and router.server.prefill.admission.stats.rejected["slo"] == 1


def test_priority_orders_the_router_queue(two_prefill):
    """One engine at a time takes prompts of one prefix (consistent_hash): queued behind a long
    prompt, four requests start in priority order (lower first), not in arrival order."""
    from pdserve.base.config import AdmissionConfig

    router, client = _router(two_prefill, prefill_policy="consistent_hash",
                             admission=AdmissionConfig(max_engine_prompts=1))
    try:
        blocker = client.stream(build_request(prompt=PREFIX * 5, max_tokens=2), timeout_s=120)
        first = iter(blocker)
        time.sleep(0.3)  # the blocker is on its engine; what follows queues in the router

        def send(priority: int) -> float:
            got = client.complete(build_request(prompt=PREFIX + f"Priority {priority}?", max_tokens=1,
                                                priority=priority), timeout_s=120)
            return got.final.timings.queue_ms
        queue_ms = _concurrently(send, [3, 1, 2, 0])
        list(first)
    finally:
        client.close()
        stop_router(router)
    assert all(isinstance(q, float) for q in queue_ms), queue_ms
    by_priority = dict(zip([3, 1, 2, 0], queue_ms))
    assert by_priority[0] < by_priority[1] < by_priority[2] < by_priority[3]


def test_resource_exhausted_at_the_queue_bound_and_nothing_lost(two_prefill):
    from pdserve.base.config import AdmissionConfig

    router, client = _router(two_prefill, admission=AdmissionConfig(max_engine_prompts=1, max_queued_requests=2))
    try:
        results = _concurrently(lambda i: client.complete(build_request(prompt=PREFIX + f"Request {i}.", max_tokens=8,
                                                                        ignore_eos=True), timeout_s=120), list(range(10)))
    finally:
        client.close()
        stop_router(router)
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert len(refused) + len(served) == 10 and refused and served
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "router queue full" in r.details() for r in refused)
    assert all(r.final.finish_reason == "length" and r.final.usage.completion_tokens == 8 for r in served)
    assert wait_until(lambda: idle(two_prefill), 30)
