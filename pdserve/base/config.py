"""pdserve's configuration: frozen dataclasses, validated on construction.

YAML (``deploy/*.yaml``) and command-line flags both end here through :func:`load`; unknown keys
are rejected with the path of the offending key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pdserve.base.schema import ConfigError, from_dict, require  # noqa: F401 (ConfigError: callers catch config's)
from pdserve.base.worker_config import KV_TRANSPORTS, EngineConfig, KvTransferConfig  # noqa: F401 (re-exported)


WORKER_CALLS = ("grpc", "tcp", "ray")
"""The names ``router.calls`` registers (a test keeps the two equal)."""


@dataclass(frozen=True)
class RoutingConfig:
    """How the router sees prompts and predicts prefill times."""

    block_tokens: int = 0
    """Tokens per router block hash (prefix keys and cache views), independent of the engine's KV
    block. 0: automatic, min(512, max_model_len // 16), a multiple of the engine's block."""
    latency_profile: str = "auto"
    """Latency profile of the prefill predictions: a name under ``deploy/profiles`` (without
    .json), a path, or ``auto`` (the shipped CPU profile; the online refit adapts it)."""
    refit_latency: bool = True
    """Rescale the profile online from observed prefill times, so predictions fit the hardware."""
    split_budget_s: float = 0.1
    """``mode: adaptive``: a request is disaggregated when its predicted prefill exceeds its TPOT SLO,
    or this when it has none, and its engine is decoding (``router.split``)."""
    role_window: int = 50
    """``mode: adaptive``: requests with SLOs whose attainment decides a change of an engine's role
    (``router.roles``): a change comes once they hold more misses of one phase than the SLO target
    allows in a window this long; 0: engines keep their roles."""
    role_cooldown_s: float = 3.0
    """``mode: adaptive``: the least time between two changes of role (only requests that began
    after a change count towards the next)."""
    role_headroom: float = 0.8
    """``mode: adaptive``: a request counts against a phase once its latency passes this fraction
    of its SLO, so a phase short of capacity gets an engine while its attainment still meets the
    target; 1: act on misses only."""
    worker_calls: str = "tcp"
    """How the router's request calls reach the workers: ``tcp`` (msgpack frames on plain TCP
    connections to each worker's own request server, no Ray hop; half the router's added latency of
    ``grpc``, docs/performance.md), ``grpc`` (the same calls to the worker's own gRPC server) or
    ``ray`` (Ray actor calls). Control calls always use Ray."""

    def __post_init__(self) -> None:
        require(self.block_tokens >= 0, "routing.block_tokens must be >= 0 (0: automatic)")
        require(bool(self.latency_profile), "routing.latency_profile must name a profile or be auto")
        require(self.split_budget_s > 0, "routing.split_budget_s must be > 0")
        require(self.worker_calls in WORKER_CALLS, f"routing.worker_calls must be one of {WORKER_CALLS}")
        require(self.role_window >= 0 and self.role_cooldown_s >= 0,
                 "routing.role_window and routing.role_cooldown_s must be >= 0")
        require(0 < self.role_headroom <= 1, "routing.role_headroom must be in (0, 1]")


@dataclass(frozen=True)
class AdmissionConfig:
    """The router-side admission queue in front of the prefill engines (``router/admission.py``)."""

    max_engine_prompts: int = 8
    """Prompts one engine prefills at a time; the rest wait in the router, by priority then arrival.
    (2 cost the disaggregated prefill engine throughput at 13 req/s in docs/performance.md: vLLM
    batches the prefills it has.)"""
    max_engine_tokens: int = 8192
    """Uncached prompt tokens one engine has at a time (a single prompt always fits)."""
    max_queued_requests: int = 512
    """Requests waiting in the router over all instances; past it, RESOURCE_EXHAUSTED."""
    max_queued_tokens: int = 2_000_000
    """Uncached prompt tokens waiting in the router; past it, RESOURCE_EXHAUSTED."""
    max_requests_in_flight: int = 1024
    """Requests between admission and their final message, deployment-wide; past it, RESOURCE_EXHAUSTED."""
    reject_factor: float = 3.0
    """Early rejection: a request whose predicted TTFT exceeds this many times its TTFT SLO gets
    RESOURCE_EXHAUSTED at once (0 disables; requests without an SLO are never rejected this way)."""

    def __post_init__(self) -> None:
        require(min(self.max_engine_prompts, self.max_engine_tokens, self.max_queued_requests,
                     self.max_queued_tokens, self.max_requests_in_flight) >= 1, "admission bounds must be >= 1")
        require(self.reject_factor == 0 or self.reject_factor >= 1, "admission.reject_factor must be 0 or >= 1")


@dataclass(frozen=True)
class FaultConfig:
    """How workers and requests survive failures."""

    max_restarts: int = 3
    """Times Ray restarts a dead worker actor (its engine reloads; it rejoins its pool once it
    answers). -1: without limit."""
    request_retries: int = 2
    """Per request and leg: prefills retried and decodes migrated after a worker failure."""
    retry_wait_s: float = 60.0
    """How long a retry waits for a live instance of its pool (a restarting one, say)."""
    drain_s: float = 30.0
    """On SIGTERM, running requests get this long to finish; the rest end with a final message
    (finish reason ``shutdown``). New requests are refused from the signal on."""
    progress_timeout_s: float = 10.0
    """The progress watchdog: a worker whose engine completes no step for this long while it has
    requests running or waiting is stalled. Its requests fail over and it is replaced (0: off)."""

    def __post_init__(self) -> None:
        require(self.drain_s >= 0, "faults.drain_s must be >= 0")
        require(self.progress_timeout_s >= 0, "faults.progress_timeout_s must be >= 0")
        require(self.max_restarts >= -1, "faults.max_restarts must be >= -1")
        require(self.request_retries >= 0, "faults.request_retries must be >= 0")
        require(self.retry_wait_s > 0, "faults.retry_wait_s must be > 0")


@dataclass(frozen=True)
class SecurityConfig:
    """Transport security and authentication of the router's public APIs (gRPC and HTTP). The
    KV ports are guarded separately, by a per-transfer secret in each handle."""

    tls_cert: str = ""
    """PEM certificate chain of the router (with ``tls_key``): both APIs serve TLS only."""
    tls_key: str = ""
    """PEM private key of ``tls_cert``."""
    tls_client_ca: str = ""
    """PEM CA bundle: clients must present a certificate it signed (mutual TLS)."""
    auth_token_file: str = ""
    """A file holding the bearer token every call must carry (``authorization: Bearer <token>``;
    UNAUTHENTICATED or HTTP 401 otherwise). ``PDSERVE_AUTH_TOKEN`` overrides it. Health checks
    (grpc.health.v1, HTTP /health) stay open to load balancers."""

    def __post_init__(self) -> None:
        require(bool(self.tls_cert) == bool(self.tls_key), "security.tls_cert and security.tls_key go together")
        require(not self.tls_client_ca or bool(self.tls_cert), "security.tls_client_ca needs tls_cert and tls_key")


@dataclass(frozen=True)
class PoolConfig:
    """One worker pool (prefill or decode)."""

    instances: int = 1
    """Number of worker actors (each hosts one engine)."""
    policy: str = "round_robin"
    """Routing policy name (see ``router.policies``). ``ServeConfig`` defaults the prefill pool to
    ``dualmap`` and the decode pool to ``decode_p2c``."""
    ray_resources: dict = field(default_factory=dict)
    """Extra Ray resources each worker of the pool asks for, e.g. ``{"pdserve_prefill": 1}`` to
    place it on the node group that advertises that resource (deploy/ray-cluster.yaml)."""
    policy_params: dict = field(default_factory=dict)
    """Keyword parameters of the policy's class, e.g. ``{slo_aware: false}`` for dualmap."""

    def __post_init__(self) -> None:
        require(self.instances >= 1, "pool instances must be >= 1")
        require(isinstance(self.policy_params, dict), "pool policy_params must be a mapping")
        require(isinstance(self.ray_resources, dict) and all(
            isinstance(v, (int, float)) and v > 0 for v in self.ray_resources.values()),
            "pool ray_resources must map resource names to amounts > 0")


MODES = ("disaggregated", "colocated", "adaptive")
"""Deployment shapes (``ServeConfig.mode``)."""


@dataclass(frozen=True)
class ServeConfig:
    """A whole deployment: the router's endpoint, Ray, the two pools and their engines."""

    name: str = "pdserve"
    """The deployment's name: its engines are the named actors ``<role>-<i>`` in the Ray namespace
    ``pdserve-<name>``, which a restarted ``pdserve serve`` re-attaches to and ``pdserve stop``
    ends."""
    mode: str = "disaggregated"
    """``disaggregated`` (prefill and decode pools, KV transfer), ``colocated`` (the same number of
    engines, prefill.instances + decode.instances, each serving both phases; the baseline) or
    ``adaptive`` (that many ``kv_both`` engines; the router disaggregates per request)."""
    host: str = "127.0.0.1"
    """Address the router's gRPC server binds."""
    port: int = 50051
    """gRPC port of the router (0 picks a free one)."""
    ray_address: str = ""
    """Ray cluster to join; empty starts an embedded local Ray on loopback."""
    prefill: PoolConfig = field(default_factory=lambda: PoolConfig(policy="dualmap"))
    """The prefill pool."""
    decode: PoolConfig = field(default_factory=lambda: PoolConfig(policy="decode_p2c"))
    """The decode pool."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Engine settings for every worker."""
    kv_transfer: KvTransferConfig = field(default_factory=KvTransferConfig)
    """KV-transfer settings."""
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    """Router blocks and the latency model."""
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    """The router-side admission queue and its bounds."""
    faults: FaultConfig = field(default_factory=FaultConfig)
    """Worker restarts and request retries."""
    security: SecurityConfig = field(default_factory=SecurityConfig)
    """TLS, mutual TLS and bearer-token auth of the public APIs (all off by default)."""
    metrics_port: int = 9400
    """Port of the router's Prometheus ``/metrics`` endpoint (0 picks a free one, -1 disables)."""
    http_port: int = 8000
    """Port of the router's OpenAI-compatible HTTP API (``/v1/chat/completions``, ...; 0 picks a
    free one, -1 disables)."""
    reflection: str = "auto"
    """gRPC server reflection on the router's port (``grpcurl``, ``grpcui``): ``on``, ``off``, or
    ``auto``: on when the router binds a loopback address."""
    slo_ttft_ms: float = 0.0
    """TTFT target applied to requests that set none (0: none); counted in the SLO metrics."""
    slo_tpot_ms: float = 0.0
    """TPOT target applied to requests that set none (0: none)."""
    default_max_tokens: int = 64
    """max_tokens used when a request leaves it 0."""
    max_prompt_bytes: int = 0
    """Text prompts (or chat contents) over this many bytes are refused with INVALID_ARGUMENT in
    the router, before anything tokenizes them. 0: 64 bytes per token of the model's context."""
    request_timeout_s: float = 300.0
    """Upper bound on one request's life in the router when the client sets no deadline."""

    def __post_init__(self) -> None:
        require(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", self.name)),
                 f"name must be 1-63 letters, digits, '_', '.', '-', got {self.name!r}")
        require(self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        require(0 <= self.port < 65536, "port must be in 0..65535")
        require(-1 <= self.metrics_port < 65536, "metrics_port must be in -1..65535")
        require(-1 <= self.http_port < 65536, "http_port must be in -1..65535")
        require(self.reflection in ("auto", "on", "off"), f"reflection must be auto, on or off, got {self.reflection!r}")
        require(self.slo_ttft_ms >= 0 and self.slo_tpot_ms >= 0, "slo_ttft_ms and slo_tpot_ms must be >= 0")
        require(self.default_max_tokens >= 1, "default_max_tokens must be >= 1")
        require(self.max_prompt_bytes >= 0, "max_prompt_bytes must be >= 0 (0: automatic)")
        require(self.request_timeout_s > 0, "request_timeout_s must be > 0")


def load(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ServeConfig:
    """Read a YAML file (optional) and apply ``overrides`` (nested dict, e.g. from CLI flags)."""
    data: dict[str, Any] = {}
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return from_dict(ServeConfig, data)
