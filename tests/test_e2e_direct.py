"""The router's direct request paths (``routing.worker_calls: grpc`` and ``tcp``) on the real
engines: requests really bypass Ray, are exact either way, and a worker's direct server answers only its token."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import grpc
import pytest
import ray

from conftest import start_router, stop_router, wait_until
from helpers import STORY, idle, reference, reset_caches, tokenize
from pdserve.base.config import FaultConfig, RoutingConfig
from pdserve.base.types import PromptInput, SamplingSpec, WorkerError
from pdserve.client import PdServeClient, build_request
from pdserve.cluster import WorkerRef
from protos import worker_v1_pb2 as pb
from protos import worker_v1_pb2_grpc as pb_grpc

MAX_TOKENS = 12


@ray.remote
class RayPathClosed:
    """A stand-in at the actor boundary around a real worker: polled like it (its direct server's
    address and token included), but every request call made through Ray fails."""

    def __init__(self, name: str, inner) -> None:
        self.name, self.inner = name, inner

    async def load(self):
        return replace(await self.inner.load.remote(), instance=self.name)

    async def tokenize(self, prompt):
        return await self.inner.tokenize.remote(prompt)

    async def prefill(self, *args):
        raise WorkerError("request calls through Ray are closed")

    async def decode(self, *args):
        raise WorkerError("request calls through Ray are closed")
        yield  # an async generator, as the worker's

    async def abort(self, request_id: str) -> None:
        raise WorkerError("request calls through Ray are closed")


@pytest.fixture(scope="module")
def closed(cluster):
    """The session's prefill and decode workers behind RayPathClosed stand-ins."""
    stand_ins = [WorkerRef(w.name, w.role, RayPathClosed.remote(w.name, w.actor)) for w in (cluster.prefill[0],
                                                                                            cluster.decode[0])]
    yield stand_ins
    for w in stand_ins:
        ray.kill(w.actor)


# (worker calls, Ray's request path closed, the request finishes)
CASES = [("grpc", False, True), ("tcp", False, True), ("ray", False, True), ("grpc", True, True), ("tcp", True, True),
         ("ray", True, False)]


@pytest.mark.parametrize("calls,ray_closed,finishes", CASES)
def test_requests_take_the_configured_path_and_are_exact(cluster, closed, calls, ray_closed, finishes):
    """With ``grpc`` or ``tcp`` a request never needs Ray's request path (it finishes with Ray's closed);
    with ``ray`` it does; whichever path, the tokens are the single engine's."""
    prefill, decode = closed if ray_closed else (cluster.prefill[0], cluster.decode[0])
    router = start_router([prefill], [decode], cluster.model_info, metrics=False, request_timeout_s=120,
                          routing=RoutingConfig(worker_calls=calls),
                          faults=FaultConfig(request_retries=0, retry_wait_s=1.0))
    client = PdServeClient(router.target)
    ids = tokenize(cluster, PromptInput(text=STORY * 3))
    try:
        assert wait_until(lambda: router.server.prefill.live() and router.server.decode.live(), 30)
        reset_caches(cluster)
        request = build_request(prompt=STORY * 3, max_tokens=MAX_TOKENS, ignore_eos=True)
        if not finishes:
            with pytest.raises(grpc.RpcError) as info:
                client.complete(request, timeout_s=120)
            assert "closed" in info.value.details()
            return
        got = client.complete(request, timeout_s=120)
    finally:
        client.close()
        stop_router(router)
    ref = reference(cluster, f"direct-ref-{calls}-{ray_closed}", ids, SamplingSpec(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert got.token_ids == ref.token_ids
    assert got.final.timings.kv_transfer_bytes > 0
    assert wait_until(lambda: idle(cluster), 30), "KV blocks were not returned"


# (metadata token, expected status)
TOKENS = [(None, grpc.StatusCode.PERMISSION_DENIED), ("0" * 32, grpc.StatusCode.PERMISSION_DENIED),
          ("right", grpc.StatusCode.OK)]


@pytest.mark.parametrize("token,status", TOKENS, ids=["none", "wrong", "right"])
def test_the_direct_server_answers_only_its_token(cluster, token, status):
    """A call without the worker's token, or with another, is refused before it reaches the engine."""
    snap = ray.get(cluster.prefill[0].actor.load.remote(), timeout=30)
    assert snap.endpoint and len(snap.endpoint_token) == 32
    metadata = () if token is None else (("x-pdserve-worker-token", snap.endpoint_token if token == "right" else token),)

    async def call() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(snap.endpoint) as channel:
            try:
                await pb_grpc.WorkerStub(channel).Abort(pb.AbortCall(engine_id="nobody"), metadata=metadata, timeout=30)
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

    assert asyncio.run(call()) == status
