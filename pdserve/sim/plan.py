"""``pdserve plan``: the deployment with the highest goodput per device for a workload under TTFT
and TPOT SLOs (DistServe's method). Every placement the budget allows (each P:D split, each phase's
tensor-parallel degree, and colocated engines) is simulated with ``ServingSim`` and its goodput
found by the same search as the routing study's: the highest rate at which at least 90% of requests
meet both SLOs. Writes results.json, table.md, goodput.png and plan.yaml (a ``pdserve serve
--config`` file with the recommended instances)."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from pdserve.sim.host import Contention
from pdserve.sim.serving import EngineSpec, Placement, ServingConfig, ServingSim
from pdserve.sim.study import capacity, percentile
from pdserve.sim.traces import TraceRequest
from router.latency import (DEFAULT_KV_BANDWIDTH_BPS, DEFAULT_KV_BYTES_PER_TOKEN, DEFAULT_KV_TOKENS, LatencyModel,
                            profile_path)


def load_engines(profile: str, tps: Sequence[int]) -> tuple[dict[int, EngineSpec], dict]:
    """The instance spec per tensor-parallel degree: ``profile`` for TP1, ``profile-tpN`` for N, and
    the profile's KV facts (bytes per token, prefill -> decode bandwidth)."""
    engines, facts = {}, {}
    for tp in tps:
        path = profile_path(profile if tp == 1 else f"{profile}-tp{tp}")
        if not path.is_file():
            raise FileNotFoundError(f"no latency profile {path} for tensor parallel {tp}")
        data = json.loads(path.read_text())
        engines[tp] = EngineSpec(LatencyModel.load(path), int(data.get("kv_capacity_tokens", DEFAULT_KV_TOKENS)), tp)
        facts = {"kv_bytes_per_token": int(data.get("kv_bytes_per_token", DEFAULT_KV_BYTES_PER_TOKEN)),
                 "kv_bandwidth_bps": float(data.get("kv_bandwidth_bps", DEFAULT_KV_BANDWIDTH_BPS))}
    return engines, facts


def load_contention(profile: str) -> Contention | None:
    """The profile's measured slowdown beside a second engine on the host (``pdserve profile
    --contention``), or None when it has none."""
    section = json.loads(profile_path(profile).read_text()).get("contention")
    return Contention.from_dict(section) if section else None


def placements(budget: int, tps: Sequence[int]) -> list[Placement]:
    """Every placement that fills ``budget`` devices as far as it can: each (prefill TP, decode TP)
    and number of decode instances, with as many prefill instances as the rest holds; and colocated
    engines of each TP."""
    out = [Placement(budget // tp, prefill_tp=tp, colocated=True) for tp in tps if budget // tp >= 1]
    for tp_p in tps:
        for tp_d in tps:
            for d in range(1, budget // tp_d + 1):
                p = (budget - d * tp_d) // tp_p
                if p >= 1:
                    out.append(Placement(p, d, tp_p, tp_d))
    return out


@dataclass(frozen=True)
class PlanResult:
    """One placement's goodput and its latencies at that rate."""

    placement: Placement
    goodput_rps: float
    per_gpu_rps: float
    ttft_p90_s: float
    tpot_p90_s: float


def evaluate(placement: Placement, engines: dict[int, EngineSpec], cfg: ServingConfig,
             requests: list[TraceRequest]) -> PlanResult:
    """``placement``'s goodput on ``requests`` (arrivals at 1 req/s, compressed by the search)."""
    sim = ServingSim(placement, engines, cfg)
    rate, _ = capacity(sim, requests, guess=float(placement.gpus))
    if not rate:
        return PlanResult(placement, 0.0, 0.0, float("nan"), float("nan"))
    at = sim.run(requests, rate)
    return PlanResult(placement, rate, rate / placement.gpus, percentile(at.ttft_s, 90), percentile(at.tpot_s, 90))


def run_plan(requests: list[TraceRequest], engines: dict[int, EngineSpec], cfg: ServingConfig, budget: int,
             out: Path, meta: dict) -> dict:
    """Evaluate every placement of ``budget`` devices; write the reports to ``out``; return them."""
    started = time.perf_counter()
    results = [evaluate(p, engines, cfg, requests) for p in placements(budget, sorted(engines))]
    disagg = [r for r in results if not r.placement.colocated]
    coloc = [r for r in results if r.placement.colocated]
    best_d = max(disagg, key=lambda r: r.per_gpu_rps, default=None)
    best_c = max(coloc, key=lambda r: r.per_gpu_rps, default=None)
    best = max([r for r in (best_d, best_c) if r], key=lambda r: r.per_gpu_rps)
    report = {
        **meta, "budget_gpus": budget, "serving": asdict(cfg), "requests": len(requests),
        "placements": [{**asdict(r), "label": r.placement.label(), "gpus": r.placement.gpus} for r in results],
        "best": best.placement.label(), "best_disaggregated": best_d.placement.label() if best_d else None,
        "best_colocated": best_c.placement.label() if best_c else None,
        "disaggregated_over_colocated": (best_d.per_gpu_rps / best_c.per_gpu_rps
                                         if best_d and best_c and best_c.per_gpu_rps else None),
        "seconds": time.perf_counter() - started,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "table.md").write_text(markdown(results, report) + "\n")
    (out / "plan.yaml").write_text(config_yaml(best.placement, cfg, report))
    plot(results, out / "goodput.png", meta.get("title", ""))
    return report


def markdown(results: list[PlanResult], report: dict) -> str:
    """One row per placement, best per device first."""
    rows = ["| placement | devices | goodput (req/s) | per device | TTFT p90 (s) | TPOT p90 (ms) |",
            "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: -r.per_gpu_rps):
        rows.append(f"| {r.placement.label()} | {r.placement.gpus} | {r.goodput_rps:.3f} | {r.per_gpu_rps:.3f} | "
                    f"{r.ttft_p90_s:.3f} | {1e3 * r.tpot_p90_s:.1f} |")
    ratio = report["disaggregated_over_colocated"]
    rows.append(f"\nBest: {report['best']}. Best disaggregated {report['best_disaggregated']} against best colocated "
                f"{report['best_colocated']}: {f'{ratio:.2f}x' if ratio else '-'} goodput per device.")
    return "\n".join(rows)


def config_yaml(p: Placement, cfg: ServingConfig, report: dict) -> str:
    """A ``pdserve serve --config`` file with the recommended instances and the SLOs planned for.
    pdserve's engines have no tensor-parallel setting yet, so a TP above 1 is stated in a comment."""
    colocated_split = (max(1, p.prefill - p.prefill // 2), max(1, p.prefill // 2))
    prefill, decode = colocated_split if p.colocated else (p.prefill, p.decode)
    return "\n".join([
        f"# pdserve plan: {p.label()} has the highest goodput per device ({report['workload']}, "
        f"TTFT <= {cfg.ttft_slo_s:g} s, TPOT <= {cfg.tpot_slo_s:g} s, profile {report['profile']}).",
        f"# Tensor parallel: prefill {p.prefill_tp}, decode {p.decode_tp} (set it in the engines' deployment;"
        " pdserve's engine config has no TP option yet).",
        f"mode: {'colocated' if p.colocated else 'disaggregated'}",
        "prefill:", f"  instances: {prefill}", "decode:", f"  instances: {decode}",
        f"slo_ttft_ms: {cfg.ttft_slo_s * 1e3:g}", f"slo_tpot_ms: {cfg.tpot_slo_s * 1e3:g}", ""])


def plot(results: list[PlanResult], path: Path, title: str) -> None:
    """Goodput per device against the share of devices given to prefill, one line per (prefill TP,
    decode TP); colocated engines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[int, int], list[PlanResult]] = {}
    for r in results:
        if r.placement.colocated:
            ax.axhline(r.per_gpu_rps, ls="--", lw=1, label=r.placement.label(), color=f"C{r.placement.prefill_tp % 10}")
        else:
            series.setdefault((r.placement.prefill_tp, r.placement.decode_tp), []).append(r)
    for (tp_p, tp_d), rs in sorted(series.items()):
        rs.sort(key=lambda r: r.placement.prefill * tp_p / r.placement.gpus)
        ax.plot([r.placement.prefill * tp_p / r.placement.gpus for r in rs], [r.per_gpu_rps for r in rs],
                marker="o", ms=3, label=f"P TP{tp_p} / D TP{tp_d}")
    ax.set(xlabel="share of devices running prefill", ylabel="goodput per device (req/s)", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
