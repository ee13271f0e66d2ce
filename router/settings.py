"""``ServiceSettings``: what the router's front ends (gRPC, HTTP) and request path take from a
deployment's config, and the live latency model it names. Built by ``pdserve serve`` from
``ServeConfig``, or directly by tests."""
from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.base.config import AdmissionConfig, FaultConfig, RoutingConfig, SecurityConfig, ServeConfig
from pdserve.base.types import ModelInfo
from protos import pdserve_v1_pb2 as pb
from router.latency import DEFAULT_PROFILE, LatencyModel, OnlineLatencyModel, profile_path
from router.request import RouterRequest
from router.validate import parse_request


@dataclass(frozen=True)
class ServiceSettings:
    """The router's request-handling settings (from ``ServeConfig``)."""

    prefill_policy: str = "dualmap"
    decode_policy: str = "decode_p2c"
    default_max_tokens: int = 64
    request_timeout_s: float = 300.0
    slo_ttft_ms: float = 0.0
    slo_tpot_ms: float = 0.0
    mode: str = "disaggregated"
    prefill_params: dict = field(default_factory=dict)
    """Keyword parameters of the prefill policy's class."""
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    reflection: str = "auto"
    """gRPC server reflection: on, off, or auto (on when the router binds a loopback address)."""
    http_port: int = -1
    """The OpenAI-compatible HTTP front end's port (0: a free one; -1: off)."""
    max_prompt_bytes: int = 0
    """Text prompts over this many bytes are refused before tokenizing (0: 64 x the context)."""
    faults: FaultConfig = field(default_factory=FaultConfig)
    kv_lease_s: float = 60.0
    """The prefill side's KV lease; the router renews holds it owns every third of it."""
    security: SecurityConfig = field(default_factory=SecurityConfig)
    """TLS, mutual TLS and the bearer token of the public APIs."""
    tokenize_in_router: bool = True
    """Tokenize prompts in the router when the model's tokenizer files are readable here (no Ray
    call before routing); off, or where they are not, a prefill worker tokenizes."""

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> ServiceSettings:
        """The subset of a deployment's config the router uses."""
        return cls(cfg.prefill.policy, cfg.decode.policy, cfg.default_max_tokens, cfg.request_timeout_s,
                   cfg.slo_ttft_ms, cfg.slo_tpot_ms, cfg.mode, dict(cfg.prefill.policy_params), cfg.routing,
                   cfg.admission, cfg.reflection, cfg.http_port, cfg.max_prompt_bytes, cfg.faults,
                   cfg.kv_transfer.lease_s, cfg.security)

    def parse(self, msg: pb.GenerateRequest, model: ModelInfo) -> RouterRequest:
        """Validate a request against this deployment's limits (``router.validate``) and give it
        the deployment's SLO targets where it set none. Raises InvalidRequestError."""
        req = parse_request(msg, self.max_prompt_bytes or 64 * model.max_model_len, model.max_model_len)
        req.ttft_slo_ms = req.ttft_slo_ms or self.slo_ttft_ms
        req.tpot_slo_ms = req.tpot_slo_ms or self.slo_tpot_ms
        return req


def latency_model(routing: RoutingConfig) -> OnlineLatencyModel:
    """The live latency model: the configured profile (``auto``: the shipped CPU one), refitted
    online from observed prefill times unless ``refit_latency`` is off."""
    name = routing.latency_profile
    path = DEFAULT_PROFILE if name == "auto" else profile_path(name)
    if not path.is_file():
        raise ValueError(f"latency profile {name!r} not found (a name under {DEFAULT_PROFILE.parent} or a path)")
    return OnlineLatencyModel(LatencyModel.load(path), refit=routing.refit_latency)
