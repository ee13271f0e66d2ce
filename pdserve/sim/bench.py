"""Routing benchmarks (``make bench-routing``): router decision speed for 8k-token prompts and
simulator speed on the Mooncake trace. Results go to a JSON file; no test asserts a speed."""
from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from pdserve.base.types import LoadSnapshot
from pdserve.sim import workloads
from pdserve.sim.cluster import ClusterSim, SimConfig
from pdserve.sim.study import percentile
from router.latency import LatencyModel
from router.policies import PREFILL_POLICIES, PolicyContext, RouteRequest, block_hashes, make_policy
from router.policies.base import ROUTER_BLOCK_TOKENS

PROMPT_TOKENS, BLOCK, INSTANCES, DECISIONS = 8192, ROUTER_BLOCK_TOKENS, 16, 3000


def decision_bench(seed: int = 0, rounds: int = 3) -> dict:
    """Per policy: decisions/s (the median of ``rounds`` rounds of DECISIONS) and p50/p99 latency of
    one decision, 16 candidates with random load. The time includes hashing the 8k-token prompt
    (an int32 array, as the router holds it) on 512-token router blocks for the policies that read
    the hashes, as the live router does it."""
    rng = random.Random(seed)
    gen = np.random.default_rng(seed)
    prefixes = [gen.integers(0, 49152, PROMPT_TOKENS // 2, dtype=np.int32) for _ in range(64)]
    prompts = [np.concatenate([prefixes[rng.randrange(64)], gen.integers(0, 49152, PROMPT_TOKENS // 2, dtype=np.int32)])
               for _ in range(256)]
    names = [f"prefill-{i}" for i in range(INSTANCES)]
    ctx = PolicyContext(block_size=BLOCK, cache_blocks=2000, latency=LatencyModel.load(), ttft_slo_ms=5000, seed=seed)
    out = {}
    for name in PREFILL_POLICIES:
        policy, lat, rates = make_policy(name, ctx), [], []
        for _ in range(rounds):
            round_lat = []
            for i in range(DECISIONS):
                snaps = [LoadSnapshot(n, pending_prefill_tokens=(t := rng.randrange(100_000)), queued_prefill_s=t * 2e-4)
                         for n in names]
                start = time.perf_counter()
                ids = prompts[i % len(prompts)]
                hashes = block_hashes(ids, BLOCK) if policy.uses_prefix else ()
                policy.select(RouteRequest(str(i), hashes, len(ids), 128), snaps)
                round_lat.append(time.perf_counter() - start)
            rates.append(len(round_lat) / sum(round_lat))
            lat += round_lat
        out[name] = {"decisions_per_s": statistics.median(rates), "p50_us": percentile(lat, 50) * 1e6,
                     "p99_us": percentile(lat, 99) * 1e6}
    return out


def simulator_bench() -> dict:
    """Per policy: wall time and simulated requests/s of the whole Mooncake trace on 16 + 16."""
    requests = workloads.load("mooncake", None, None, 0, 0.0, 0)
    cfg, latency, out = SimConfig(prefill=16, decode=16), LatencyModel.load(), {}
    for name in PREFILL_POLICIES:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            ClusterSim(cfg, latency, name).run(requests, 0.1)
            times.append(time.perf_counter() - start)
        out[name] = {"requests": len(requests), "instances": 32, "median_s": statistics.median(times),
                     "requests_per_s": len(requests) / statistics.median(times)}
    return out


def main(out: str = "docs/results/bench-routing.json") -> None:
    """Run both benchmarks and write their results."""
    results = {"date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0],
               "decision": decision_bench(), "simulator": simulator_bench()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    for kind in ("decision", "simulator"):
        for name, row in results[kind].items():
            print(kind, name, {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})


if __name__ == "__main__":
    main(*sys.argv[1:])
