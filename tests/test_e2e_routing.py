"""Live routing on 2 prefill instances: under dualmap, two requests sharing a long prefix meet on
one prefill instance and the second hits that engine's prefix cache; round-robin splits them."""
from __future__ import annotations

import pytest
import ray

from conftest import start_router, stop_router
from helpers import reset_caches
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
