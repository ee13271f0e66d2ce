"""A routing study: every policy's effective request capacity on one workload (found by search),
its metrics at a common load, and the files that report them (JSON, markdown table, PNG plots).
Called by ``pdserve simulate``."""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from pdserve.sim.cluster import ClusterSim, RunResult, SimConfig
from pdserve.sim.traces import TraceRequest
from router.latency import LatencyModel
from router.policies.base import cached_tokens

TARGET = 0.9


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def capacity(sim: ClusterSim, requests: list[TraceRequest], guess: float, iters: int = 6) -> tuple[float, list]:
    """Largest time-compression scale with TTFT attainment >= 90%, by bracketing then bisection in
    log space; also every (scale, attainment) tried. 0.0 if even 1/64 of the guess fails."""
    points: list[tuple[float, float]] = []

    def ok(scale: float) -> bool:
        result = sim.run(requests, scale)
        points.append((scale, result.attainment))
        return result.attainment >= TARGET

    lo = hi = guess
    if ok(guess):
        while ok(hi * 2) and hi < guess * 64:
            hi *= 2
        lo, hi = hi, hi * 2
    else:
        while not ok(lo / 2):
            lo /= 2
            if lo < guess / 64:
                return 0.0, sorted(points)
        lo, hi = lo / 2, lo
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo, sorted(points)


def capacity_bound_rps(requests: list[TraceRequest], latency: LatencyModel, instances: int, block_size: int) -> float:
    """An upper bound on any policy's goodput: every prompt served from one infinite shared prefix
    cache (the most reuse the workload holds) by instances busy 100% of the time, SLO ignored."""
    seen: set[int] = set()
    work = 0.0
    for r in requests:
        hit = next((i for i, h in enumerate(r.hashes) if h not in seen), len(r.hashes))
        cached = cached_tokens(r.input_len, hit, block_size)
        work += latency.prefill_s(r.input_len - cached, cached)
        seen.update(r.hashes)
    return instances * len(requests) / work


def summarize(result: RunResult, base_rate: float) -> dict:
    """The reported metrics of one run."""
    return {
        "rate_rps": result.scale * base_rate,
        "ttft_s": {f"p{q}": percentile(result.ttft_s, q) for q in (50, 90, 99)},
        "tpot_s": {f"p{q}": percentile(result.tpot_s, q) for q in (50, 90, 99)},
        "slo_attainment": result.attainment,
        "prefix_hit_ratio": result.hit_ratio,
        "imbalance_cv": result.imbalance_cv,
        "decisions": dict(result.decisions),
    }


ABLATIONS = {"dualmap": {}, "no adaptive key": {"adaptive_key": False}, "no SLO-aware choice": {"slo_aware": False},
             "old TTFT estimate": {"queue_estimate": False}, "no rebalancing": {"rebalance_on": False},
             "cache view not moved": {"follow_moves": False}, "no owner candidate": {"follow_owner": False},
             "no SLO fallback": {"slo_fallback": 0},
             "as published (no owner, no fallback)": {"follow_owner": False, "slo_fallback": 0}}
"""DualMap with each mechanism off in turn (keyword parameters of ``DualMapPolicy``)."""
CANDIDATE = "dualmap"
"""The policy the study measures against the baselines (every other policy)."""


def run_study(name: str, requests: list[TraceRequest], cfg: SimConfig, latency: LatencyModel,
              policies: list[str], out: Path, params: dict[str, dict] | None = None,
              fixed_rates: tuple[float, ...] = (), ablation: bool = False) -> dict:
    """Search every policy's goodput (capacity), compare at the best baseline's, report attainment at
    ``fixed_rates`` (multiples of the best baseline's goodput) and, with ``ablation``, DualMap with
    each mechanism off; write results.json, table.md and the plots to ``out``. ``params`` maps a
    policy name to keyword parameters of its class."""
    params, started = params or {}, time.perf_counter()
    base_rate = len(requests) / (requests[-1].arrival_s - requests[0].arrival_s)
    mean_prefill = statistics.fmean(latency.prefill_s(r.input_len) for r in requests)
    guess = min(1.0, cfg.prefill / mean_prefill / base_rate)

    def sim(policy: str, extra: dict | None = None) -> ClusterSim:
        return ClusterSim(cfg, latency, policy, policy_params={**params.get(policy, {}), **(extra or {})})

    caps, curves = {}, {}
    for policy in policies:
        caps[policy], curves[policy] = capacity(sim(policy), requests, guess)
    baselines = [p for p in policies if p != CANDIDATE]
    best = max(baselines, key=caps.get) if baselines else policies[0]
    reference = caps[best] or guess
    at_ref = {p: summarize(sim(p).run(requests, reference), base_rate) for p in policies}
    at_rates = {f"{m:g}x": {p: sim(p).run(requests, m * reference).attainment for p in policies} for m in fixed_rates}
    results = {
        "workload": name, "requests": len(requests), "policy_params": params, "trace_rate_rps": base_rate,
        "config": asdict(cfg), "latency_model": latency.to_dict(), "target_attainment": TARGET,
        "capacity_rps": {p: caps[p] * base_rate for p in policies}, "capacity_scale": caps,
        "best_baseline": best, "reference_rate_rps": reference * base_rate, "at_reference_rate": at_ref,
        "attainment_at_rates": at_rates,
        "bound_rps": capacity_bound_rps(requests, latency, cfg.prefill, cfg.block_size),
        "curves": {p: [(s * base_rate, a) for s, a in pts] for p, pts in curves.items()},
        "dualmap_capacity_ratio": {p: (caps[CANDIDATE] / caps[p] if caps.get(p) else None)
                                   for p in baselines} if CANDIDATE in caps else {},
    }
    if ablation:
        results["ablation_rps"] = {label: capacity(sim(CANDIDATE, extra), requests, guess)[0] * base_rate
                                   for label, extra in ABLATIONS.items()}
    results["seconds"] = time.perf_counter() - started
    _save(results, out)
    return results


def _save(results: dict, out: Path) -> None:
    """results.json, table.md and the plots, in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(markdown_table(results) + "\n")
    plot(results, out)


def markdown_table(results: dict) -> str:
    """One row per policy: capacity, ratio, and the metrics at the reference rate."""
    head = ("| policy | capacity (req/s) | DualMap / policy | TTFT p50 / p90 / p99 (s) | TPOT p50 / p99 (ms) "
            "| attainment | prefix hit | imbalance (CV) |\n|---|---:|---:|---|---|---:|---:|---:|")
    rows = []
    for p, cap in sorted(results["capacity_rps"].items(), key=lambda kv: -kv[1]):
        m, ratio = results["at_reference_rate"][p], results["dualmap_capacity_ratio"].get(p)
        t, d = m["ttft_s"], m["tpot_s"]
        rows.append(f"| {p} | {cap:.4f} | {f'{ratio:.2f}x' if ratio else '-'} | {t['p50']:.1f} / {t['p90']:.1f} / "
                    f"{t['p99']:.1f} | {1e3 * d['p50']:.0f} / {1e3 * d['p99']:.0f} | {m['slo_attainment']:.1%} | "
                    f"{m['prefix_hit_ratio']:.1%} | {m['imbalance_cv']:.3f} |")
    bound = results.get("bound_rps")
    note = [f"\nUpper bound on any policy (one infinite shared cache, instances 100% busy, no SLO): {bound:.4f} "
            f"req/s; the best policy reaches {max(results['capacity_rps'].values()) / bound:.0%} of it."] if bound else []
    return "\n".join([head, *rows, *note, *_rates_table(results), *_ablation_table(results)])


def _rates_table(results: dict) -> list[str]:
    """Attainment of every policy at fixed multiples of the best baseline's goodput."""
    rates = results.get("attainment_at_rates") or {}
    if not rates:
        return []
    policies = sorted(results["capacity_rps"], key=lambda p: -results["capacity_rps"][p])
    ref = results["reference_rate_rps"]
    head = [f"\nAttainment at fixed rates (multiples of {results['best_baseline']}'s goodput, {ref:.4f} req/s):\n",
            "| policy | " + " | ".join(f"{m} ({float(m[:-1]) * ref:.3f} req/s)" for m in rates) + " |",
            "|---|" + "---:|" * len(rates)]
    return head + [f"| {p} | " + " | ".join(f"{rates[m][p]:.1%}" for m in rates) + " |" for p in policies]


def _ablation_table(results: dict) -> list[str]:
    """DualMap's goodput with each mechanism off, against the full policy."""
    ablation = results.get("ablation_rps")
    if not ablation:
        return []
    full = ablation["dualmap"]
    rows = [f"| {label} | {rps:.4f} | {rps / full:.2f}x |" if full else f"| {label} | {rps:.4f} | - |"
            for label, rps in ablation.items()]
    return ["\nAblation (DualMap's goodput with one mechanism off):\n", "| variant | goodput (req/s) | vs. full |",
            "|---|---:|---:|", *rows]


def plot(results: dict, out: Path) -> None:
    """attainment.png (attainment vs. rate per policy) and hit_vs_imbalance.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p, pts in sorted(results["curves"].items()):
        ax.plot([r for r, _ in pts], [a for _, a in pts], marker="o", ms=3, label=p, lw=2.5 if p == "dualmap" else 1.2)
    ax.axhline(TARGET, color="grey", ls="--", lw=0.8)
    ax.set(xscale="log", xlabel="request rate (req/s, trace time-compressed)", ylabel="TTFT SLO attainment",
           title=f"{results['workload']}: attainment vs. rate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "attainment.png", dpi=110)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for p, m in sorted(results["at_reference_rate"].items()):
        ax.scatter(m["imbalance_cv"], m["prefix_hit_ratio"], s=60 if p == "dualmap" else 30)
        ax.annotate(p, (m["imbalance_cv"], m["prefix_hit_ratio"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set(xlabel="load imbalance (CV of per-instance prefill time)", ylabel="prefix-cache hit ratio",
           title=f"{results['workload']} at {results['reference_rate_rps']:.3f} req/s")
    fig.tight_layout()
    fig.savefig(out / "hit_vs_imbalance.png", dpi=110)
    plt.close("all")
