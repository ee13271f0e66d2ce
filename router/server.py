"""``RouterServer``: the router process's parts wired together. It builds the pools, the admission
queues, the latency model, the dispatcher and its front ends (the gRPC API, ``router.grpc_api``;
the OpenAI HTTP API, ``router.http_api``; standard health; Prometheus), and polls the pools' load
in the background (rebalancing and role changes ride on the poll).

Started by ``pdserve serve`` and the test fixtures with the workers of a ``Cluster``.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any, Sequence

import grpc

from pdserve.base.types import ModelInfo, RouteDecision
from router.admission import AdmissionQueue
from router.dispatch import Dispatcher
from router.grpc_api import PdServeService, add_service
from router.health import HealthReporter
from router.http_api import HttpFrontEnd
from router.legs import router_block_tokens
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
MAX_PENDING_CALLS = 10_000
"""Calls gRPC may hold before the router's handlers take them. gRPC core's default (1,000)
answers a burst beyond it with CANCELLED before pdserve sees the calls; pdserve's own admission
bounds (RESOURCE_EXHAUSTED, with a retry hint) are meant to be the ones that shed overload."""
POLL_INTERVAL_S = 0.25
MAX_MESSAGE_BYTES = 16 * 2**20
"""gRPC's own cap on a request message (RESOURCE_EXHAUSTED beyond); prompts are refused far
below it, by ``max_prompt_bytes``."""


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
                            ttft_slo_ms=settings.slo_ttft_ms, replica=secrets.randbits(31))
        self.roles = RoleBalancer([w.name for w in prefill], window=settings.routing.role_window,
                                  cooldown_s=settings.routing.role_cooldown_s,
                                  headroom=settings.routing.role_headroom) if settings.mode == "adaptive" else None
        self.prefill, self.decode = self._pools(prefill, decode, settings, ctx)
        split = SplitRule(self.latency, settings.routing.split_budget_s) if self.roles is not None else None
        self.dispatcher = Dispatcher(self.prefill, self.decode, model, settings.default_max_tokens,
                                     self.stats.record_request, block, settings.faults.request_retries,
                                     settings.faults.retry_wait_s, settings.kv_lease_s,
                                     _tokenizer(model) if settings.tokenize_in_router else None, split,
                                     settings.routing.worker_calls)
        self._front_ends(model, settings)
        self._server: grpc.aio.Server | None = None
        self._poller: asyncio.Task | None = None

    def _pools(self, prefill: Sequence[Any], decode: Sequence[Any], settings: ServiceSettings,
               ctx: PolicyContext) -> tuple[WorkerPool, WorkerPool | None]:
        """The prefill pool (with its admission queue) and the decode pool (None when colocated;
        in adaptive mode one set of kv_both engines behind both, split by ``self.roles``)."""
        role = "colocated" if settings.mode == "colocated" else "prefill"
        policy = make_policy(settings.prefill_policy, ctx, **settings.prefill_params)
        admission = AdmissionQueue(settings.admission, self.latency, policy, role, self.stats.record_decision)
        watchdog, roles = settings.faults.progress_timeout_s, self.roles
        pool = WorkerPool(role, prefill, policy, self.stats.record_decision, admission, watchdog,
                          roles.takes_prompts if roles else None)
        if settings.mode == "colocated":
            return pool, None
        return pool, WorkerPool("decode", prefill if roles else decode, make_policy(settings.decode_policy, ctx),
                                self.stats.record_decision, progress_timeout_s=watchdog,
                                eligible=roles.takes_decodes if roles else None)

    def _front_ends(self, model: ModelInfo, settings: ServiceSettings) -> None:
        """The metrics exporter, the gRPC service, health, the guard and the HTTP API, wired to
        the dispatcher and the stats."""
        self.exporter = PrometheusExporter(self.dispatcher.pools, self.prefill.admission, self.latency)
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
        add_service(self.service, self._server)
        reflect = self.reflection == "on" or (self.reflection == "auto" and _loopback(host))
        self.health.add_to(self._server, reflect)
        credentials = self.guard.grpc_credentials()
        bound = (self._server.add_secure_port(f"{host}:{port}", credentials) if credentials
                 else self._server.add_insecure_port(f"{host}:{port}"))
        if bound == 0:
            raise OSError(f"cannot bind {host}:{port}")
        await asyncio.gather(*(p.refresh() for p in self.dispatcher.pools))
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
            await asyncio.gather(*(p.refresh() for p in self.dispatcher.pools))
            await self.health.update()
            self._change_roles()
            self.prefill.admission.rebalance({s.instance for s in self.prefill.live()
                                              if self.prefill.serves(s.instance)})
            await asyncio.sleep(POLL_INTERVAL_S)

    def _change_roles(self) -> None:
        """Adaptive mode: apply the role balancer's changes, if any; each logged and counted as a decision."""
        for change in self.roles.rebalance(self.prefill.live(), time.monotonic()) if self.roles is not None else ():
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
        await self.dispatcher.calls.close()
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
