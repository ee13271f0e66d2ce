"""``DirectServer``: a worker's gRPC server for the router's request path (``protos/worker_v1``,
``routing.worker_calls: grpc``; ``tcp_server`` serves the same calls as TCP frames).

The router's prefill, decode and whole-request calls reach the worker here without a Ray hop
(Ray stays the control plane: creation, load polls, restarts). The server runs on the actor's own
event loop, the engine's, so a call reaches the engine with no thread hop. Started by the worker
actor on its first async call; its address and token travel to the router in the worker's load
snapshot (``LoadSnapshot.endpoint``), so a restarted worker's new server is found at the next poll.
"""
from __future__ import annotations

import json
import secrets
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc

from pdserve.base.net import WORKER_CHANNEL_OPTIONS, WORKER_TOKEN_KEY
from pdserve.base.types import DecodeChunk, InvalidRequestError, PrefillResult, SamplingSpec, WorkerError
from protos import worker_v1_pb2 as pb
from protos import worker_v1_pb2_grpc as pb_grpc


class DirectServer(pb_grpc.WorkerServicer):
    """Serves ``worker``'s request methods (``prefill``, ``decode``, ``generate``, ``abort``: the
    Ray actor's own, so both paths run the same code) to callers holding ``token``."""

    def __init__(self, worker: Any, host: str) -> None:
        self.worker, self.host = worker, host
        self.token = secrets.token_hex(16)
        self.endpoint = ""
        """``host:port`` once ``start`` returned."""
        self._server: grpc.aio.Server | None = None

    async def start(self) -> str:
        """Bind a fresh port on ``host`` (no SO_REUSEPORT: a collision fails instead of sharing)
        and serve; returns the endpoint. Called once, on the actor's event loop."""
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *WORKER_CHANNEL_OPTIONS])
        pb_grpc.add_WorkerServicer_to_server(self, server)
        port = server.add_insecure_port(f"{self.host}:0")
        await server.start()
        self._server, self.endpoint = server, f"{self.host}:{port}"
        return self.endpoint

    async def Prefill(self, call: pb.PrefillCall, context: grpc.aio.ServicerContext) -> pb.PrefillReply:
        await self._check(context)
        result: PrefillResult = await self._answer(context, lambda: self.worker.prefill(
            call.engine_id, list(call.prompt_ids), sampling_spec(call.sampling), call.remote_decode, call.fault))
        return pb.PrefillReply(token_id=result.token_id, text=result.text, finish_reason=result.finish_reason or "",
                               kv_params_json=json.dumps(result.kv_params) if result.kv_params else "",
                               num_prompt_tokens=result.num_prompt_tokens, num_cached_tokens=result.num_cached_tokens,
                               prefill_ms=result.prefill_ms)

    async def Decode(self, call: pb.DecodeCall, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Chunk]:
        await self._check(context)
        kv_params = json.loads(call.kv_params_json) if call.kv_params_json else None
        stream = self.worker.decode(call.engine_id, list(call.prompt_ids), call.first_token,
                                    sampling_spec(call.sampling), kv_params)
        async for chunk in self._chunks(context, stream):
            yield chunk

    async def Generate(self, call: pb.GenerateCall, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Chunk]:
        await self._check(context)
        stream = self.worker.generate(call.engine_id, list(call.prompt_ids), sampling_spec(call.sampling))
        async for chunk in self._chunks(context, stream):
            yield chunk

    async def Abort(self, call: pb.AbortCall, context: grpc.aio.ServicerContext) -> pb.AbortReply:
        await self._check(context)
        await self._answer(context, lambda: self.worker.abort(call.engine_id))
        return pb.AbortReply()

    async def _check(self, context: grpc.aio.ServicerContext) -> None:
        presented = dict(context.invocation_metadata() or ()).get(WORKER_TOKEN_KEY, "")
        if not secrets.compare_digest(presented.encode(), self.token.encode()):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "this worker's token is required")

    @staticmethod
    async def _answer(context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await call()
        except Exception as err:
            await context.abort(*_status(err))

    @staticmethod
    async def _chunks(context: grpc.aio.ServicerContext, stream: AsyncIterator[DecodeChunk]) -> AsyncIterator[pb.Chunk]:
        """``stream`` as wire chunks; an error ends the call with its status. The client cancelling
        the call closes ``stream``, which aborts the request on the engine."""
        try:
            async for chunk in stream:
                yield pb.Chunk(token_ids=chunk.token_ids, text=chunk.text, finish_reason=chunk.finish_reason or "",
                               kv_report_json=json.dumps(chunk.kv) if chunk.kv else "")
        except Exception as err:
            await context.abort(*_status(err))

    async def stop(self) -> None:
        """Stop serving (bounded grace for calls in flight)."""
        if self._server is not None:
            await self._server.stop(1.0)


def describe_error(err: Exception) -> tuple[str, str]:
    """A worker's error as its kind (``pdserve.base.frames.ERROR_KINDS``: ``invalid`` or
    ``failed``) and one line (its own errors are one line already). Both request servers use it."""
    if isinstance(err, InvalidRequestError):
        return "invalid", str(err)
    if isinstance(err, WorkerError):
        return "failed", str(err)
    return "failed", f"{type(err).__name__}: {err}".splitlines()[0][:500]


def _status(err: Exception) -> tuple[grpc.StatusCode, str]:
    """The status a call ends with for the worker's error."""
    kind, message = describe_error(err)
    return (grpc.StatusCode.INVALID_ARGUMENT if kind == "invalid" else grpc.StatusCode.INTERNAL), message


def sampling_spec(wire: pb.Sampling) -> SamplingSpec:
    """The sampling settings of a call (the router validated them)."""
    return SamplingSpec(max_tokens=wire.max_tokens, temperature=wire.temperature, top_p=wire.top_p, top_k=wire.top_k,
                        seed=wire.seed if wire.HasField("seed") else None, stop=tuple(wire.stop),
                        ignore_eos=wire.ignore_eos)
