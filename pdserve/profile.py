"""``pdserve profile``: measure one real engine and write the latency profile the router and the
simulator fit their ``LatencyModel`` to.

Prefill: wall time of a 1-token request vs. prompt length, prefix cache reset before each run.
Decode: the median gap between streamed tokens of B concurrent requests of a given context.
Runs the engine in this process (pinned to one core, one thread, as a worker would be).
"""
from __future__ import annotations

import asyncio
import json
import platform
import statistics
import time
from pathlib import Path

from pdserve.base import env
from pdserve.base.config import EngineConfig
from pdserve.base.types import SamplingSpec

PREFILL_TOKENS = (32, 64, 128, 256, 512, 768, 1024, 1536, 2000)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32)
DECODE_CONTEXTS = (128, 1024)
DECODE_STEPS = 24
REPEATS = 3


async def measure(cfg: EngineConfig, model: str, contention: bool = False) -> dict:
    """Profile points of one engine built from ``cfg``; with ``contention``, also its slowdown
    beside a second engine on the other core (``pdserve.contention``)."""
    from pdserve import contention as contention_mod
    from pdserve.engine.host import EngineHost

    host = EngineHost(cfg, model, "colocated")
    try:
        prefill = [(n, await _prefill_s(host, n)) for n in PREFILL_TOKENS if n < cfg.max_model_len]
        decode = [(b, c, await _decode_step_s(host, b, c)) for c in DECODE_CONTEXTS for b in DECODE_BATCHES
                  if c + DECODE_STEPS < cfg.max_model_len]
        shared = {"contention": await contention_mod.measure(host, cfg, model)} if contention else {}
    finally:
        host.shutdown()
    return {"prefill": prefill, "decode": decode, **shared}


async def _prefill_s(host, tokens: int) -> float:
    times = []
    for r in range(REPEATS):
        await host.engine.reset_prefix_cache()
        ids = [(7 * i + r) % 30000 + 100 for i in range(tokens)]
        start = time.perf_counter()
        async for _ in host.stream(f"prefill-{tokens}-{r}", ids, SamplingSpec(max_tokens=1), 1):
            pass
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def _decode_step_s(host, batch: int, context: int) -> float:
    spec = SamplingSpec(max_tokens=DECODE_STEPS, ignore_eos=True)

    async def one(i: int) -> list[float]:
        ids = [(13 * j + i) % 30000 + 100 for j in range(context)]
        stamps = []
        async for chunk in host.stream(f"decode-{batch}-{context}-{i}", ids, spec, DECODE_STEPS):
            stamps += [time.perf_counter()] * max(1, len(chunk.token_ids))
        return [b - a for a, b in zip(stamps[8:], stamps[9:])]  # steady state: all requests decoding

    gaps = [g for gs in await asyncio.gather(*(one(i) for i in range(batch))) for g in gs if g > 0]
    return statistics.median(gaps)


def run(cfg: EngineConfig, model: str, out: Path, contention: bool = False) -> dict:
    """Measure and write the profile JSON to ``out``; returns it."""
    env.apply(env.worker_process_env(0, cfg.kv_cache_gib))
    points = asyncio.run(measure(cfg, model, contention))
    profile = {
        "origin": f"measured by `pdserve profile` on a {env.cpu_count()}-core {platform.machine()} CPU: vLLM {_vllm_version()} "
                  f"CPU backend, {Path(model).name}, {cfg.dtype}, 1 core / 1 thread, eager, block {cfg.block_size}",
        "device": "cpu",
        "date": time.strftime("%Y-%m-%d"),
        **points,
    }
    from router.latency import LatencyModel

    profile["fit"] = LatencyModel.fit(points["prefill"], points["decode"], profile["origin"]).to_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile, indent=2) + "\n")
    return profile


def _vllm_version() -> str:
    import vllm

    return vllm.__version__
