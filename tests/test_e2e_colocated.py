"""The colocated baseline (`mode: colocated`) passes the same exactness test as the disaggregated
path: an engine serving both phases behind the same router and API gives the single-engine
reference's greedy tokens. One colocated engine joins the session's cluster for this module."""
from __future__ import annotations

import pytest

from conftest import start_router, stop_router, wait_until
from helpers import exactness_cases, idle, reference, reset_caches, tokenize
from pdserve.base.types import SamplingSpec
from pdserve.client import PdServeClient, build_request


@pytest.fixture(scope="module")
def colocated(cluster):
    """A router in colocated mode over one added colocated engine."""
    engine = cluster.add_worker("colocated")
    router = start_router([engine], [], cluster.model_info, mode="colocated", prefill_policy="least_loaded")
    client = PdServeClient(router.target)
    yield cluster, client, engine
    client.close()
    stop_router(router)
    cluster.remove_worker(engine.name)


def test_colocated_greedy_output_matches_single_engine(colocated):
    cluster, client, engine = colocated
    for name, kwargs, prompt, max_tokens, ignore_eos in exactness_cases(cluster):
        ids = tokenize(cluster, prompt)
        reset_caches(cluster)
        got = client.complete(build_request(max_tokens=max_tokens, ignore_eos=ignore_eos, **kwargs), timeout_s=180)
        ref = reference(cluster, f"coloc-ref-{name}", ids, SamplingSpec(max_tokens=max_tokens, ignore_eos=ignore_eos))
        assert got.token_ids == ref.token_ids, name
        assert got.text == ref.text, name
        assert got.final.finish_reason == ref.finish_reason, name
        assert got.final.usage.prompt_tokens == len(ids) and got.final.usage.completion_tokens == len(ref.token_ids), name
        assert (got.final.prefill_instance, got.final.decode_instance) == (engine.name, engine.name), name
        assert got.final.timings.kv_transfer_bytes == 0 and got.final.timings.ttft_ms > 0, name
    assert wait_until(lambda: idle(cluster), 30)


def test_colocated_health_and_info(colocated):
    _, client, engine = colocated
    assert client.health().detail == "all pools have a live instance"
    info = client.info()
    assert [(p.role, [i.name for i in p.instances]) for p in info.pools] == [("colocated", [engine.name])]
