"""``GrpcCalls``: request calls straight to each worker's direct server (``protos/worker_v1``,
served by ``pdserve.engine.direct``), without a Ray hop. A worker whose load snapshot names no
server (not polled yet, or a stand-in at the actor boundary) is called through Ray.

One channel per worker incarnation (its endpoint and token, from its last load snapshot); a
restarted worker reports a new endpoint and gets a new channel, and the old one is closed.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Callable

import grpc

from pdserve.base.net import WORKER_CHANNEL_OPTIONS, WORKER_TOKEN_KEY
from pdserve.base.types import DecodeChunk, InvalidRequestError, LoadSnapshot, PrefillResult, SamplingSpec
from protos import worker_v1_pb2 as pb
from protos import worker_v1_pb2_grpc as pb_grpc
from router.calls.base import Answer, WorkerCalls
from router.calls.ray_calls import RayCalls
from router.legs import WorkerFailedError, WorkerUnreachableError

_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class GrpcCalls(WorkerCalls):
    name = "grpc"

    def __init__(self, snapshot: Callable[[str], LoadSnapshot]) -> None:
        self._snapshot = snapshot
        self._ray = RayCalls()
        self._channels: dict[str, tuple[str, grpc.aio.Channel, pb_grpc.WorkerStub]] = {}
        self._closing: set[asyncio.Future] = set()

    def prefill(self, worker: Any, engine_id: str, ids: list[int], spec: SamplingSpec,
                remote_decode: bool) -> Any:
        stub, meta = self._stub(worker.name)
        if stub is None:
            return self._ray.prefill(worker, engine_id, ids, spec, remote_decode)
        call = pb.PrefillCall(engine_id=engine_id, prompt_ids=ids, sampling=_sampling(spec), remote_decode=remote_decode)
        return Answer(asyncio.ensure_future(_prefill(worker.name, stub.Prefill(call, metadata=meta))))

    def generate(self, worker: Any, engine_id: str, ids: list[int], spec: SamplingSpec) -> AsyncIterator[DecodeChunk]:
        stub, meta = self._stub(worker.name)
        if stub is None:
            return self._ray.generate(worker, engine_id, ids, spec)
        call = pb.GenerateCall(engine_id=engine_id, prompt_ids=ids, sampling=_sampling(spec))
        return _chunks(worker.name, stub.Generate(call, metadata=meta))

    def decode(self, worker: Any, engine_id: str, prompt: list[int], first: int, spec: SamplingSpec,
               kv_params: dict[str, Any] | None) -> AsyncIterator[DecodeChunk]:
        stub, meta = self._stub(worker.name)
        if stub is None:
            return self._ray.decode(worker, engine_id, prompt, first, spec, kv_params)
        call = pb.DecodeCall(engine_id=engine_id, prompt_ids=prompt, first_token=first, sampling=_sampling(spec),
                             kv_params_json=json.dumps(kv_params) if kv_params else "")
        return _chunks(worker.name, stub.Decode(call, metadata=meta))

    async def abort(self, worker: Any, engine_id: str) -> None:
        stub, meta = self._stub(worker.name)
        if stub is None:
            return await self._ray.abort(worker, engine_id)
        await _unary(worker.name, stub.Abort(pb.AbortCall(engine_id=engine_id), metadata=meta))

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        await asyncio.gather(*(channel.close() for _, channel, _ in channels.values()))

    def _stub(self, name: str) -> tuple[pb_grpc.WorkerStub | None, tuple]:
        """The stub and call metadata of the worker's current incarnation; (None, ()) without one."""
        snap = self._snapshot(name)
        if not snap.endpoint:
            return None, ()
        key = f"{snap.endpoint}/{snap.endpoint_token}"
        known = self._channels.get(name)
        if known is None or known[0] != key:
            if known is not None:  # calls still on the old incarnation's channel may end
                closing = asyncio.ensure_future(known[1].close(grace=30.0))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
            channel = grpc.aio.insecure_channel(snap.endpoint, options=WORKER_CHANNEL_OPTIONS)
            known = self._channels[name] = (key, channel, pb_grpc.WorkerStub(channel))
        return known[2], ((WORKER_TOKEN_KEY, snap.endpoint_token),)


async def _unary(name: str, call: Any) -> Any:
    try:
        return await call
    except grpc.aio.AioRpcError as err:
        raise _own(name, err) from None


async def _prefill(name: str, call: Any) -> PrefillResult:
    reply = await _unary(name, call)
    return PrefillResult(token_id=reply.token_id, text=reply.text, finish_reason=reply.finish_reason or None,
                         kv_params=json.loads(reply.kv_params_json) if reply.kv_params_json else None,
                         num_prompt_tokens=reply.num_prompt_tokens, num_cached_tokens=reply.num_cached_tokens,
                         prefill_ms=reply.prefill_ms)


async def _chunks(name: str, call: Any) -> AsyncIterator[DecodeChunk]:
    """A streaming call's chunks; closing the iteration early cancels the call."""
    try:
        async for chunk in call:
            yield DecodeChunk(tuple(chunk.token_ids), chunk.text, chunk.finish_reason or None,
                              json.loads(chunk.kv_report_json) if chunk.kv_report_json else {})
    except grpc.aio.AioRpcError as err:
        raise _own(name, err) from None
    finally:
        call.cancel()


def _own(name: str, err: grpc.aio.AioRpcError) -> Exception:
    code, detail = err.code(), (err.details() or "").splitlines()[0:1]
    detail = detail[0] if detail else code.name
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(detail)
    if code in _UNREACHABLE:
        return WorkerUnreachableError(f"{name} is unavailable: {detail}")
    return WorkerFailedError(f"{name} failed: {detail}")


def _sampling(spec: SamplingSpec) -> pb.Sampling:
    return pb.Sampling(max_tokens=spec.max_tokens, temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k,
                       seed=spec.seed, stop=spec.stop, ignore_eos=spec.ignore_eos)
