"""``PdServeService``: the public gRPC API (``pdserve.v1.PdServe``) over one dispatcher. It maps
each request to ``Dispatcher.run`` and the dispatcher's errors to gRPC statuses: INVALID_ARGUMENT
(bad input, malformed bytes), ALREADY_EXISTS (a running request id), UNAVAILABLE (no live
instance), RESOURCE_EXHAUSTED (admission refused, with a ``retry-after-s`` trailer),
DEADLINE_EXCEEDED, INTERNAL (a bug, logged). The HTTP front end beside it is ``router.http_api``.

Built and registered on the gRPC server by ``router.server.RouterServer``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

import grpc

from pdserve.base.types import InvalidRequestError, ModelInfo, NoInstanceError, Outcome, OverloadedError, RequestRecord
from protos import pdserve_v1_pb2 as pb
from protos import pdserve_v1_pb2_grpc as pb_grpc
from router.dispatch import Dispatcher
from router.health import API_SERVICE, pools_status
from router.legs import FinalEvent, TokenEvent
from router.pools import WorkerPool
from router.settings import ServiceSettings
from router.stats import RouterStats

log = logging.getLogger("pdserve.router")
VERSION = "0.1.0"


class RateLimitedLog:
    """At most one warning per ``interval_s``, counting what it did not log."""

    def __init__(self, what: str, interval_s: float = 10.0) -> None:
        self.what, self.interval_s, self._count, self._last = what, interval_s, 0, -interval_s

    def hit(self) -> None:
        """Count one occurrence; log the count if the interval has passed."""
        self._count += 1
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            log.warning("%d %s", self._count, self.what)
            self._count, self._last = 0, now


class PdServeService(pb_grpc.PdServeServicer):
    """The public API over one dispatcher."""

    def __init__(self, dispatcher: Dispatcher, model: ModelInfo, stats: RouterStats, settings: ServiceSettings) -> None:
        self.dispatcher, self.model, self.stats, self.settings = dispatcher, model, stats, settings
        self.metrics_port = 0
        self._in_flight: set[str] = set()
        self._malformed = RateLimitedLog("malformed GenerateRequest(s) refused")

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        if isinstance(request, _Malformed):
            self._malformed.hit()
            self.stats.record_request(RequestRecord(Outcome.REJECTED))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed GenerateRequest (not a pdserve.v1 message)")
        try:
            req = self.settings.parse(request, self.model)
        except InvalidRequestError as err:
            self.stats.record_request(RequestRecord(Outcome.REJECTED))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if req.request_id in self._in_flight:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request {req.request_id} is already running")
        self._in_flight.add(req.request_id)
        try:
            async with asyncio.timeout(self._timeout(context)):
                async for event in self.dispatcher.run(req):
                    yield _to_proto(req.request_id, event)
        except InvalidRequestError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except NoInstanceError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        except OverloadedError as err:
            context.set_trailing_metadata((("retry-after-s", f"{err.retry_after_s:.0f}"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{err}; retry after {err.retry_after_s:.0f} s")
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"request {req.request_id} timed out")
        except grpc.aio.AbortError:
            raise
        except Exception as err:  # a bug must not take the server down: log it, answer INTERNAL
            log.exception("request %s failed", req.request_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}".splitlines()[0])
        finally:
            self._in_flight.discard(req.request_id)

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining, limit = context.time_remaining(), self.settings.request_timeout_s
        return min(remaining, limit) if remaining is not None else limit

    async def Health(self, request: pb.HealthRequest, context: Any) -> pb.HealthResponse:
        pools = self.dispatcher.pools
        await asyncio.gather(*(p.refresh() for p in pools))
        serving, detail = pools_status(pools)
        if self.dispatcher.draining:
            serving, detail = False, "shutting down"
        status = pb.HealthResponse.SERVING if serving else pb.HealthResponse.NOT_SERVING
        return pb.HealthResponse(status=status, detail=detail)

    async def ServerInfo(self, request: pb.ServerInfoRequest, context: Any) -> pb.ServerInfoResponse:
        pools = [_pool_info(p, self.stats) for p in self.dispatcher.pools]
        return pb.ServerInfoResponse(version=VERSION, model=self.model.model, max_model_len=self.model.max_model_len,
                                     block_size=self.model.block_size, pools=pools, metrics_port=self.metrics_port)


def _pool_info(pool: WorkerPool, stats: RouterStats) -> pb.PoolInfo:
    instances = []
    for s in pool.snapshots():
        ttft_ms, tpot_ms = stats.recent_ms(s.instance)
        instances.append(pb.InstanceInfo(
            name=s.instance, role=pool.role, alive=s.alive, waiting=s.waiting, running=s.running,
            kv_cache_usage=s.kv_cache_usage, prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits, recent_ttft_ms=ttft_ms, recent_tpot_ms=tpot_ms))
    return pb.PoolInfo(role=pool.role, policy=pool.policy.name, instances=instances)


def _to_proto(request_id: str, event: TokenEvent | FinalEvent) -> pb.GenerateResponse:
    if isinstance(event, TokenEvent):
        return pb.GenerateResponse(request_id=request_id, token_ids=event.token_ids, text=event.text)
    e = event
    return pb.GenerateResponse(
        request_id=request_id, final=True, finish_reason=e.finish_reason,
        usage=pb.Usage(prompt_tokens=e.prompt_tokens, completion_tokens=e.completion_tokens,
                       cached_prompt_tokens=e.cached_tokens),
        timings=pb.Timings(queue_ms=e.queue_ms, prefill_ms=e.prefill_ms, kv_transfer_ms=e.kv_transfer_ms,
                           ttft_ms=e.ttft_ms, e2e_ms=e.e2e_ms, kv_transfer_bytes=e.kv_transfer_bytes),
        prefill_instance=e.prefill_instance, decode_instance=e.decode_instance, prefill_reason=e.prefill_reason,
        prefill_retries=e.prefill_retries, decode_migrations=e.decode_migrations)


class _Malformed:
    """What a GenerateRequest that does not parse becomes (answered INVALID_ARGUMENT)."""


def _lenient(data: bytes) -> pb.GenerateRequest | _Malformed:
    try:
        return pb.GenerateRequest.FromString(data)
    except Exception:  # DecodeError and friends: the client's fault, not the server's
        return _Malformed()


def add_service(service: PdServeService, server: grpc.aio.Server) -> None:
    """``pdserve.v1.PdServe`` on ``server``, as the generated ``add_PdServeServicer_to_server`` but
    with a Generate deserializer that turns malformed bytes into INVALID_ARGUMENT, not UNKNOWN."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate, request_deserializer=_lenient, response_serializer=pb.GenerateResponse.SerializeToString),
        "Health": grpc.unary_unary_rpc_method_handler(
            service.Health, request_deserializer=pb.HealthRequest.FromString,
            response_serializer=pb.HealthResponse.SerializeToString),
        "ServerInfo": grpc.unary_unary_rpc_method_handler(
            service.ServerInfo, request_deserializer=pb.ServerInfoRequest.FromString,
            response_serializer=pb.ServerInfoResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(API_SERVICE, handlers),))
    server.add_registered_method_handlers(API_SERVICE, handlers)
