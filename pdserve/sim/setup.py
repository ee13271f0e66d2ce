"""``SimSetup``: a named simulator regime, kept as a YAML file under ``deploy/sim/`` and selected with
``pdserve simulate --setup NAME`` (or a path). It fixes everything a routing result depends on:
the workload slice, the cluster, the caches, the latency profile and the SLO."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pdserve.base.schema import ConfigError, from_dict
from router.latency import DEFAULT_KV_BANDWIDTH_BPS, DEFAULT_KV_BYTES_PER_TOKEN, profile_path

SETUPS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "sim"


@dataclass(frozen=True)
class SimSetup:
    """One simulator regime (see ``deploy/sim/*.yaml``)."""

    description: str = ""
    """What the regime stands for, in one sentence."""
    trace: str = "mooncake"
    """Workload: mooncake, azure-conv, azure-code or synthetic."""
    offset: int = 0
    """Requests of the trace skipped before the slice starts (a different slice to tune on)."""
    limit: int = 0
    """This many requests of the trace from ``offset`` on (0: all)."""
    warmup: int = 0
    """Leading requests run but not scored (cache warm-up)."""
    max_input_tokens: int = 0
    """Prompts are truncated to this many tokens (0: none)."""
    requests: int = 5000
    """Synthetic workload: number of requests."""
    rate: float = 2.0
    """Synthetic workload: Poisson rate (req/s) before time compression."""
    prefill: int = 16
    """Prefill instances."""
    decode: int = 16
    """Decode instances."""
    cache_blocks: int = 600
    """Prefix-cache capacity per prefill instance, in 512-token blocks."""
    profile: str = "cpu-smollm2-135m"
    """Latency profile: a file name under ``deploy/profiles`` (without .json) or a path."""
    ttft_slo_s: float = 0.0
    """TTFT SLO; 0: the idle-cluster prefill time of the workload's p95 prompt."""
    kv_bytes_per_token: int = DEFAULT_KV_BYTES_PER_TOKEN
    """KV bytes per token of the profiled model (moved prefill -> decode)."""
    kv_bandwidth_bps: float = DEFAULT_KV_BANDWIDTH_BPS
    """KV transfer bandwidth."""
    fixed_rates: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)
    """Rates, as multiples of the best baseline's goodput, at which every policy's attainment is
    reported (the paper's second metric)."""
    seed: int = 0
    """Seed of the synthetic workload and of every policy."""
    routers: int = 1
    """Router replicas (``SimConfig.routers``)."""
    policy_params: dict = field(default_factory=dict)
    """Per-policy parameters, e.g. ``{cache_aware: {balance_abs_tokens: 32768}}``."""

    def __post_init__(self) -> None:
        if self.trace not in ("mooncake", "azure-conv", "azure-code", "synthetic"):
            raise ConfigError(f"setup trace: unknown {self.trace!r}")
        if min(self.prefill, self.decode, self.cache_blocks) < 1:
            raise ConfigError("setup prefill, decode and cache_blocks must be >= 1")
        if min(self.offset, self.limit, self.warmup, self.max_input_tokens, self.ttft_slo_s, self.routers - 1) < 0:
            raise ConfigError("setup offset, limit, warmup, max_input_tokens and ttft_slo_s must be >= 0, routers >= 1")

    def profile_path(self) -> Path:
        """The latency profile's file."""
        return profile_path(self.profile)


def load_setup(name_or_path: str, overrides: dict | None = None) -> SimSetup:
    """A setup by name (``deploy/sim/NAME.yaml``) or path, with ``overrides`` applied on top."""
    path = SETUPS_DIR / f"{name_or_path}.yaml"
    path = path if path.is_file() else Path(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SETUPS_DIR.glob("*.yaml")))
        raise ConfigError(f"no simulator setup {name_or_path!r} (known: {known})")
    data = {**(yaml.safe_load(path.read_text()) or {}), **(overrides or {})}
    if "fixed_rates" in data:
        data["fixed_rates"] = tuple(data["fixed_rates"])
    return from_dict(SimSetup, data)
