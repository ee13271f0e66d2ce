"""Every environment variable pdserve reads, in one place.

Other modules call these functions; none reads ``os.environ`` itself.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``PDSERVE_CACHE_DIR``: where prepared models live (default ``~/.cache/pdserve``)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdserve"
    return Path(os.environ.get("PDSERVE_CACHE_DIR", default))


def state_dir() -> Path:
    """``PDSERVE_STATE_DIR``: where running deployments' Ray heads publish their address (default
    ``<cache_dir>/state``)."""
    return Path(os.environ.get("PDSERVE_STATE_DIR") or cache_dir() / "state")


def model_dir_override() -> str | None:
    """``PDSERVE_MODEL``: a local Hugging Face folder to serve instead of the bundled model."""
    return os.environ.get("PDSERVE_MODEL") or None


def ray_address() -> str | None:
    """``PDSERVE_RAY_ADDRESS``: an existing Ray cluster to join (default: embedded local Ray)."""
    return os.environ.get("PDSERVE_RAY_ADDRESS") or None


def auth_token() -> str | None:
    """``PDSERVE_AUTH_TOKEN``: the bearer token, for the router (overrides
    ``security.auth_token_file``) and for the CLI's client commands."""
    return os.environ.get("PDSERVE_AUTH_TOKEN") or None


def worker_process_env(cpu_core: int | None, kv_cache_gib: int) -> dict[str, str]:
    """The environment a worker actor sets before its vLLM engine starts.

    One compute thread per worker (two busy 2-thread processes on 2 cores ran 3.6x slower), the
    vLLM CPU backend bound to ``cpu_core`` when given, and the CPU KV-cache size in GiB.

    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` makes the engine-core process run the model itself (vLLM's
    single-process executor; the engine core stays a process of its own). With it on, vLLM's CPU
    backend adds a worker process, and the two spin on a shared-memory queue for a second after
    every message: measured here, twice the CPU time for the same tokens (docs/performance.md).
    Engines have one device each (no tensor parallelism), so nothing needs the extra process.
    """
    env = {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    if cpu_core is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(cpu_core)
    return env


def embedded_ray_env() -> dict[str, str]:
    """Settings that keep an embedded local Ray on loopback and without token auth files.

    Ray reads them when it is first imported: apply them (``apply``) before ``import ray``.
    """
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0"}


def apply(env: dict[str, str]) -> None:
    """Set ``env`` in this process (the one place pdserve writes the environment)."""
    os.environ.update(env)


def cpu_count() -> int:
    """Usable CPU cores of this process."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
