"""Every KV transport on the real engines, and the router's lease heartbeat.

The transport is the sender's choice (it travels in the handle), so one prefill worker per
non-default transport joins the session cluster here; the session's decode engine receives from
all of them (the default, ``tcp``, is what the session cluster and every other live test use).
"""
from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import ray

from conftest import start_router, stop_router, wait_until
from helpers import STORY, exactness_cases, external_tokens, idle, kv_bytes, reference, reset_caches, tokenize
from pdserve.base.config import KvTransferConfig
from pdserve.base.types import PromptInput, SamplingSpec
from pdserve.client import PdServeClient, build_request
from pdserve.cluster import WorkerRef

OTHER_TRANSPORTS = ("grpc", "gloo")
SHORT_LEASE_S = 1.5


@pytest.fixture(scope="module")
def senders(cluster):
    """A prefill worker per non-default transport, plus one (tcp) with a short lease. They leave
    the session's cluster even when one fails to start, so later modules see the cluster as it was."""
    kvs = {name: KvTransferConfig(transport=name) for name in OTHER_TRANSPORTS}
    kvs["short-lease"] = KvTransferConfig(lease_s=SHORT_LEASE_S)
    added = {}
    try:
        for name, kv in kvs.items():
            added[name] = cluster.add_worker("prefill", wait=False, kv=kv)
        ray.get([w.actor.info.remote() for w in added.values()], timeout=600)
        yield added
    finally:
        for worker in added.values():
            cluster.remove_worker(worker.name)


def _disaggregated(prefill, decode, request_id: str, ids: list[int], spec: SamplingSpec, fault: str = ""):
    """Prefill on ``prefill``, decode on ``decode``: (token ids, the decode's load report)."""
    first = ray.get(prefill.prefill.remote(request_id, ids, spec, True, fault), timeout=120)
    tokens, report = [first.token_id], {}
    stream = decode.decode.options(num_returns="streaming").remote(request_id, ids, first.token_id, spec, first.kv_params)
    for ref in stream:
        chunk = ray.get(ref, timeout=120)
        tokens += chunk.token_ids
        report = chunk.kv or report
    return tokens, report


@pytest.mark.parametrize("transport", OTHER_TRANSPORTS)
def test_greedy_output_is_exact_over_every_transport(cluster, senders, transport):
    """The exactness cases, prefilled by this transport's worker: tokens equal a single engine's,
    and every prompt token's KV was loaded, with the exact byte count."""
    sender = senders[transport].actor
    for name, _, prompt, max_tokens, ignore_eos in exactness_cases(cluster):
        ids = tokenize(cluster, prompt)
        spec = SamplingSpec(max_tokens=max(2, max_tokens), ignore_eos=ignore_eos)
        reset_caches(cluster)
        before = external_tokens(cluster)
        tokens, report = _disaggregated(sender, cluster.decode[0].actor, f"{transport}-{name}", ids, spec)
        ref = reference(cluster, f"{transport}-ref-{name}", ids, spec)
        assert tokens == ref.token_ids, (transport, name)
        if len(ref.token_ids) > 1:
            assert report["failed"] == "" and external_tokens(cluster) - before == len(ids), (transport, name)
            assert report["bytes"] == kv_bytes(cluster.model_info.model, len(ids), cluster.model_info.block_size)
    assert wait_until(lambda: idle(cluster), 30), "KV blocks were not returned"


@pytest.mark.parametrize("transport", OTHER_TRANSPORTS)
def test_corrupted_transfer_is_detected_and_recomputed(cluster, senders, transport):
    ids = tokenize(cluster, PromptInput(text=STORY * 3))
    spec = SamplingSpec(max_tokens=12, ignore_eos=True)
    reset_caches(cluster)
    tokens, report = _disaggregated(senders[transport].actor, cluster.decode[0].actor, f"{transport}-corrupt",
                                    ids, spec, fault="corrupt")
    assert "checksum mismatch" in report["failed"] and report["tokens"] == 0
    assert tokens == reference(cluster, f"{transport}-corrupt-ref", ids, spec).token_ids
    assert wait_until(lambda: idle(cluster), 30), "KV blocks were not returned after the failed load"


@ray.remote
class QueuedDecode:
    """A decode worker whose requests wait ``delay_s`` before reaching its engine, as if queued
    behind others (a stand-in at the actor boundary around the real decode worker)."""

    role = "decode"

    def __init__(self, name: str, inner, delay_s: float) -> None:
        self.name, self.inner, self.delay_s = name, inner, delay_s

    async def decode(self, *args):
        await asyncio.sleep(self.delay_s)
        async for ref in self.inner.decode.options(num_returns="streaming").remote(*args):
            yield await ref

    async def load(self):  # no direct server of its own: the router calls it through Ray
        return replace(await self.inner.load.remote(), instance=self.name, endpoint="", endpoint_token="",
                       tcp_endpoint="")

    async def abort(self, request_id: str) -> None:
        await self.inner.abort.remote(request_id)


@pytest.mark.parametrize("renew", [True, False])
def test_a_decode_queued_past_the_lease_still_gets_its_kv(cluster, senders, renew):
    """The decode starts 3 leases after the prefill. With the router's heartbeat the hold is
    renewed and the KV is loaded; without it (the control) the lease expires and the decode
    recomputes the prompt."""
    sender = senders["short-lease"]
    queued = QueuedDecode.remote("decode-queued", cluster.decode[0].actor, 3 * SHORT_LEASE_S)
    router = start_router([sender], [WorkerRef("decode-queued", "decode", queued)], cluster.model_info,
                          metrics=False, prefill_policy="round_robin", request_timeout_s=120,
                          kv_lease_s=SHORT_LEASE_S if renew else 1e6)
    client = PdServeClient(router.target)
    try:
        reset_caches(cluster)
        final = client.complete(build_request(prompt=STORY * 2, max_tokens=8, ignore_eos=True), timeout_s=120).final
    finally:
        client.close()
        stop_router(router)
        ray.kill(queued)
    loaded = final.timings.kv_transfer_bytes > 0
    assert loaded is renew, final
    assert final.usage.completion_tokens == 8
    assert wait_until(lambda: idle(cluster), 30), "KV blocks were not returned"
