"""The adaptive mode (`mode: adaptive`) on two real `kv_both` engines: a request served whole by a
flex engine is exact, and so is one prefilled on a flex engine and decoded on the other; while both
engines decode, the per-request rule serves a short prompt whole and disaggregates a long one; when
TPOT attainment falls short, the two engines split into the decode and prefill roles. Each
decision is counted in the metrics. Two flex engines join the session's cluster for this module."""
from __future__ import annotations

import threading

import pytest
import ray

from conftest import start_router, stop_router, wait_until
from helpers import STORY, exactness_cases, idle, kv_bytes, reference, reset_caches, tokenize
from pdserve.base.config import RoutingConfig
from pdserve.base.types import PromptInput, SamplingSpec
from pdserve.client import PdServeClient, build_request


@pytest.fixture(scope="module")
def adaptive(cluster):
    """A router in adaptive mode over two added flex engines."""
    engines = []
    try:
        for _ in range(2):
            engines.append(cluster.add_worker("flex"))
        router = start_router(engines, [], cluster.model_info, mode="adaptive", prefill_policy="least_loaded",
                              routing=RoutingConfig(role_window=20, role_cooldown_s=600.0))
        client = PdServeClient(router.target)
        yield cluster, router, client, engines
        client.close()
        stop_router(router)
    finally:
        for engine in engines:
            cluster.remove_worker(engine.name)


def exact(cluster, got, name: str, ids: list[int], max_tokens: int, ignore_eos: bool) -> None:
    ref = reference(cluster, f"adaptive-ref-{name}", ids, SamplingSpec(max_tokens=max_tokens, ignore_eos=ignore_eos))
    assert got.token_ids == ref.token_ids and got.text == ref.text, name
    assert got.final.finish_reason == ref.finish_reason, name


def test_idle_flex_engines_serve_requests_whole_and_exactly(adaptive):
    cluster, _, client, engines = adaptive
    for name, kwargs, prompt, max_tokens, ignore_eos in exactness_cases(cluster)[:3]:
        ids = tokenize(cluster, prompt)
        reset_caches(cluster)
        got = client.complete(build_request(max_tokens=max_tokens, ignore_eos=ignore_eos, **kwargs), timeout_s=180)
        exact(cluster, got, name, ids, max_tokens, ignore_eos)
        assert got.final.prefill_instance == got.final.decode_instance, name
        assert got.final.prefill_instance in {e.name for e in engines}, name
        assert got.final.timings.kv_transfer_bytes == 0, name
    assert wait_until(lambda: idle(cluster), 30)


def test_a_flex_engine_decodes_another_flex_engines_prefill_exactly(adaptive):
    cluster, _, _, (first, second) = adaptive
    for name, _, prompt, max_tokens, ignore_eos in exactness_cases(cluster)[:3]:
        ids = tokenize(cluster, prompt)
        spec = SamplingSpec(max_tokens=max(2, max_tokens), ignore_eos=ignore_eos)
        reset_caches(cluster)
        head = ray.get(first.actor.prefill.remote(f"flex-{name}", ids, spec, True), timeout=120)
        tokens, report = [head.token_id], {}
        stream = second.actor.decode.options(num_returns="streaming").remote(f"flex-{name}", ids, head.token_id, spec,
                                                                             head.kv_params)
        for ref in stream:
            chunk = ray.get(ref, timeout=120)
            tokens, report = tokens + list(chunk.token_ids), chunk.kv or report
        ref = reference(cluster, f"flex-ref-{name}", ids, spec)
        assert tokens == ref.token_ids, name
        if len(ref.token_ids) > 1:
            assert report["failed"] == "", name
            assert report["bytes"] == kv_bytes(cluster.model_info.model, len(ids), cluster.model_info.block_size), name
    assert wait_until(lambda: idle(cluster), 30)


def decisions(router, reason: str, pool: str = "prefill", policy: str = "split") -> float:
    value = router.server.exporter.registry.get_sample_value(
        "pdserve_router_decisions_total", {"pool": pool, "policy": policy, "reason": reason})
    return value or 0.0


def test_short_prompt_whole_long_prompt_split_while_engines_decode(adaptive):
    cluster, router, client, engines = adaptive
    reset_caches(cluster)
    background = [threading.Thread(target=client.complete, daemon=True, kwargs={
        "request": build_request(prompt=f"Count to a thousand, {i}:", max_tokens=600, ignore_eos=True),
        "timeout_s": 300}) for i in range(2)]
    for thread in background:
        thread.start()
        assert wait_until(lambda: sum(router.server.prefill.snapshot(e.name).running > 0 for e in engines)
                          >= background.index(thread) + 1, 60)
    latency = router.server.latency
    short, long_ = PromptInput(text="The capital of France is"), PromptInput(text=STORY * 4)
    short_ids, long_ids = tokenize(cluster, short), tokenize(cluster, long_)
    # TPOT SLOs on either side of each prompt's predicted prefill (3x margins: the model refits online)
    short_slo = 3e3 * latency.prefill_s(len(short_ids), 0)
    long_slo = 1e3 * latency.prefill_s(len(long_ids), 0) / 3
    before = decisions(router, "whole:short_prefill"), decisions(router, "split:long_prefill")
    got_short = client.complete(build_request(prompt=short.text, max_tokens=16, ignore_eos=True, tpot_ms=short_slo),
                                timeout_s=180)
    got_long = client.complete(build_request(prompt=long_.text, max_tokens=16, ignore_eos=True, tpot_ms=long_slo),
                               timeout_s=180)
    assert got_short.final.prefill_instance == got_short.final.decode_instance
    assert got_short.final.timings.kv_transfer_bytes == 0
    assert got_long.final.prefill_instance != got_long.final.decode_instance
    assert got_long.final.timings.kv_transfer_bytes > 0
    assert (decisions(router, "whole:short_prefill"), decisions(router, "split:long_prefill")) == (
        before[0] + 1, before[1] + 1)
    assert len(got_short.token_ids) == len(got_long.token_ids) == 16
    for thread in background:
        thread.join(300)
    assert wait_until(lambda: idle(cluster), 30)


def test_the_engines_split_into_decode_and_prefill_roles_when_tpot_falls_short(adaptive):
    cluster, router, client, engines = adaptive
    assert set(router.server.roles.roles.values()) == {"both"}
    for i in range(4):  # more misses than a 20-request window allows (2): TTFT met, TPOT missed
        got = client.complete(build_request(prompt=f"Tell me about the sea, {i}.", max_tokens=8, ignore_eos=True,
                                            ttft_ms=60_000, tpot_ms=0.001), timeout_s=120)
        assert len(got.token_ids) == 8
    assert wait_until(lambda: decisions(router, "both->decode:tpot_short", "roles", "balancer") == 1, 30)
    # two engines: the one left would take every prompt beside its own decodes, so it takes prompts only
    assert decisions(router, "both->prefill:tpot_short", "roles", "balancer") == 1
    roles = {role: name for name, role in router.server.roles.roles.items()}
    assert set(roles) == {"prefill", "decode"}
    for i in range(3):  # every prompt on the prefill engine, every decode on the decode engine
        got = client.complete(build_request(prompt=f"Name a colour, {i}.", max_tokens=4, ignore_eos=True),
                              timeout_s=120)
        assert (got.final.prefill_instance, got.final.decode_instance) == (roles["prefill"], roles["decode"])
    assert wait_until(lambda: idle(cluster), 30)
