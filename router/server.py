"""The router's gRPC server (``pdserve.v1.PdServe``): maps requests to the dispatcher and errors
to gRPC statuses, and polls the pools' load in the background.

Started by ``pdserve serve`` and the test fixtures with the workers of a ``Cluster``.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, AsyncIterator, Sequence

import grpc

from pdserve.base.types import (InvalidRequestError, ModelInfo, NoInstanceError, Outcome, OverloadedError, RequestRecord,
                                RouteDecision)
from protos import pdserve_v1_pb2 as pb
from protos import pdserve_v1_pb2_grpc as pb_grpc
from router.admission import AdmissionQueue
from router.dispatch import Dispatcher
from router.health import API_SERVICE, HealthReporter, pools_status
from router.http_api import HttpFrontEnd
from router.legs import FinalEvent, TokenEvent, router_block_tokens
from router.metrics import PrometheusExporter
from router.policies import PolicyContext, make_policy
from router.pools import WorkerPool
from router.roles import RoleBalancer
from router.security import BearerAuth, Guard
from router.settings import ServiceSettings, latency_model
from router.split import SplitRule
from router.stats import RouterStats
from router.tokenizer import PromptTokenizer

log = logging.getLogger("pdserve.router")
STOP_GRACE_S = 5.0
"""After the drain, how long gRPC calls get to write their last message (a cut stream's final one)
before the server cancels them; it returns as soon as every call has ended."""
VERSION = "0.1.0"
MAX_PENDING_CALLS = 10_000
"""Calls gRPC may hold before the router's handlers take them. gRPC core's default (1,000)
answers a burst beyond it with CANCELLED before pdserve sees the calls; pdserve's own admission
bounds (RESOURCE_EXHAUSTED, with a retry hint) are meant to be the ones that shed overload."""
POLL_INTERVAL_S = 0.25
POLL_TIMEOUT_S = 2.0
MAX_MESSAGE_BYTES = 16 * 2**20
"""gRPC's own cap on a request message (RESOURCE_EXHAUSTED beyond); prompts are refused far
below it, by ``max_prompt_bytes``."""


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
        sent = 0
        try:
            async with asyncio.timeout(self._timeout(context)):
                async for event in self.dispatcher.run(req):
                    sent += len(getattr(event, "token_ids", ()))
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
        except asyncio.CancelledError:
            if not self.dispatcher.cutting:
                raise
            asyncio.current_task().uncancel()  # cut by the shutdown: end the stream cleanly
            yield _to_proto(req.request_id, FinalEvent.cut(sent))
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
        await asyncio.gather(*(p.refresh(POLL_TIMEOUT_S) for p in pools))
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


def _add_service(service: PdServeService, server: grpc.aio.Server) -> None:
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


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class RouterServer:
    """The gRPC server, the load poller and the metrics endpoint; one per deployment."""

    def __init__(self, prefill: Sequence[Any], decode: Sequence[Any], model: ModelInfo,
                 settings: ServiceSettings = ServiceSettings()) -> None:
        self.stats = RouterStats()
        block = router_block_tokens(model, settings.routing.block_tokens)
        self.latency = latency_model(settings.routing)
        cache_blocks = max(1, (model.cache_blocks or 1024) * model.block_size // block)
        ctx = PolicyContext(block_size=block, cache_blocks=cache_blocks, latency=self.latency,
                            ttft_slo_ms=settings.slo_ttft_ms)
        colocated = settings.mode == "colocated"
        role = "colocated" if colocated else "prefill"
        policy = make_policy(settings.prefill_policy, ctx, **settings.prefill_params)
        admission = AdmissionQueue(settings.admission, self.latency, policy, role, self.stats.record_decision)
        watchdog = settings.faults.progress_timeout_s
        adaptive = settings.mode == "adaptive"  # one set of kv_both engines behind both pools
        self.roles = RoleBalancer([w.name for w in prefill], window=settings.routing.role_window,
                                  cooldown_s=settings.routing.role_cooldown_s) if adaptive else None
        self.prefill = WorkerPool(role, prefill, policy, self.stats.record_decision, admission, watchdog,
                                  self.roles.takes_prompts if adaptive else None)
        self.decode = None if colocated else WorkerPool(
            "decode", prefill if adaptive else decode, make_policy(settings.decode_policy, ctx),
            self.stats.record_decision, progress_timeout_s=watchdog,
            eligible=self.roles.takes_decodes if adaptive else None)
        split = SplitRule(self.latency, settings.routing.split_budget_s) if adaptive else None
        self.dispatcher = Dispatcher(self.prefill, self.decode, model, settings.default_max_tokens,
                                     self.stats.record_request, block, settings.faults.request_retries,
                                     settings.faults.retry_wait_s, settings.kv_lease_s,
                                     _tokenizer(model) if settings.tokenize_in_router else None, split)
        self.exporter = PrometheusExporter(self.dispatcher.pools, admission, self.latency)
        self.stats.listeners.append(self.exporter)
        if self.roles is not None:
            self.stats.listeners.append(self.roles)
        self.service = PdServeService(self.dispatcher, model, self.stats, settings)
        self.health = HealthReporter(self.dispatcher.pools)
        self.guard = Guard.load(settings.security)
        self.http = HttpFrontEnd(self.dispatcher, model, settings, self.stats.record_request, self.exporter.registry,
                                 self.guard)
        self.http_port = settings.http_port
        """The HTTP API's bound port once started (-1: off)."""
        self.reflection = settings.reflection
        self._server: grpc.aio.Server | None = None
        self._poller: asyncio.Task | None = None

    async def start(self, host: str, port: int, metrics_port: int = -1) -> int:
        """Bind and start serving (and ``/metrics`` unless ``metrics_port`` is -1); returns the
        bound gRPC port (the metrics port is ``service.metrics_port``)."""
        if metrics_port >= 0:
            self.service.metrics_port = self.exporter.serve(host, metrics_port)
        interceptors = [BearerAuth(self.guard)] if self.guard.token else []
        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                                ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
                                                ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_CALLS)],
                                       interceptors=interceptors)
        _add_service(self.service, self._server)
        reflect = self.reflection == "on" or (self.reflection == "auto" and _loopback(host))
        self.health.add_to(self._server, reflect)
        credentials = self.guard.grpc_credentials()
        bound = (self._server.add_secure_port(f"{host}:{port}", credentials) if credentials
                 else self._server.add_insecure_port(f"{host}:{port}"))
        if bound == 0:
            raise OSError(f"cannot bind {host}:{port}")
        await asyncio.gather(*(p.refresh(POLL_TIMEOUT_S) for p in self.dispatcher.pools))
        await self.health.update()
        await self._server.start()
        if self.http_port >= 0:
            self.http_port = await self.http.start(host, self.http_port)
        self._poller = asyncio.create_task(self._poll())
        log.info("router serving on %s:%d", host, bound)
        return bound

    async def _poll(self) -> None:
        """Refresh every pool's load, then let the prefill policy rebalance the router's queue."""
        while True:
            await asyncio.gather(*(p.refresh(POLL_TIMEOUT_S) for p in self.dispatcher.pools))
            await self.health.update()
            self._change_roles()
            self.prefill.admission.rebalance({s.instance for s in self.prefill.live()
                                              if self.prefill.serves(s.instance)})
            await asyncio.sleep(POLL_INTERVAL_S)

    def _change_roles(self) -> None:
        """Adaptive mode: apply the role balancer's change, if any; logged and counted as a decision."""
        change = self.roles.rebalance(self.prefill.live(), time.monotonic()) if self.roles is not None else None
        if change is not None:
            log.info("engine %s: role %s -> %s (%s: attainment %.2f)", change.instance, change.old, change.new,
                     change.reason, change.attainment)
            self.stats.record_decision(RouteDecision("roles", "balancer", change.instance,
                                                     f"{change.old}->{change.new}:{change.reason}"))

    async def stop(self, grace_s: float = 5.0) -> None:
        """Drain: health NOT_SERVING and new requests refused at once, running ones given
        ``grace_s`` to finish, the rest ended with a final message (finish reason ``shutdown``);
        then stop serving and polling. Called once (SIGTERM in ``pdserve serve``)."""
        if self._server is not None:
            await self.health.shutdown()
        cut = await self.dispatcher.drain(grace_s)
        if cut:
            log.warning("shutdown: %d request(s) still running after %.0f s were cut", cut, grace_s)
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._server is not None:
            await asyncio.gather(self._server.stop(STOP_GRACE_S), self.http.stop())
        self.exporter.stop()


def _tokenizer(model: ModelInfo) -> PromptTokenizer | None:
    """The router's own tokenizer of ``model``, or None (logged) where its files cannot be read."""
    try:
        tokenizer = PromptTokenizer.load(model.model, model.max_model_len)
    except Exception as err:  # unreadable or malformed files: the workers tokenize, as before
        log.warning("tokenizing on the prefill workers: the model's tokenizer files did not load (%s)", err)
        return None
    log.info("tokenizing in the router" if tokenizer else "tokenizing on the prefill workers (no tokenizer.json here)")
    return tokenizer
