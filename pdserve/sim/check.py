"""``pdserve sim-check``: the simulator against a live ``pdserve bench`` run. Each recorded run is
replayed in ``ServingSim`` with the same arrivals (the bench's seeded Poisson offsets), the same
prompt and output lengths (as the engines counted them) and the deployment's shape, and the TTFT and
TPOT percentiles of both are written side by side with their ratio.

Where the bench recorded the router's own account of each request (its queue and its prefill
call), the medians of the TTFT's parts are set beside the simulator's (its wait for a pass and
the pass), with the prefill call's time against the engine's isolated profile: the simulator's
error at the median is split into the router and hops, waiting, and the engine's own speed."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from pdserve.sim.serving import EngineSpec, Placement, ServingConfig, ServingSim
from pdserve.sim.study import percentile
from pdserve.sim.traces import TraceRequest

QUANTILES = (50, 90, 99)


def replay(bench: dict, run: dict) -> list[TraceRequest]:
    """The requests of one recorded bench run (failed ones dropped), at their send offsets."""
    from pdserve.bench.runner import arrival_times

    if bench["arrival"] != "poisson":
        raise ValueError(f"sim-check replays Poisson bench runs; this one used {bench['arrival']!r} arrivals")
    rows = run["requests"]
    offsets = arrival_times(rows, "poisson", run["setting"], 1.0, bench["seed"])
    return [TraceRequest(t, r["prompt_tokens"], max(1, r["output_tokens"]), ())
            for t, r in zip(offsets, rows) if r["ok"]]


def compare(bench_path: Path, placement: Placement, engine: EngineSpec, cfg: ServingConfig) -> dict:
    """Measured and simulated TTFT/TPOT percentiles per run of the bench file."""
    bench = json.loads(bench_path.read_text())
    out = []
    for run in bench["runs"]:
        requests = replay(bench, run)
        sim = ServingSim(placement, {placement.prefill_tp: engine, placement.decode_tp: engine}, cfg).run(requests)
        live = [r for r in run["requests"] if r["ok"]]
        row = {"setting": run["setting"], "rate_rps": run["rate_rps"], "requests": len(live)}
        for metric, measured, simulated in (("ttft_s", [r["ttft_s"] for r in live], sim.ttft_s),
                                            ("tpot_s", [r["tpot_s"] for r in live if r["output_tokens"] > 1],
                                             [t for t, r in zip(sim.tpot_s, requests) if r.output_len > 1])):
            row[metric] = {f"p{q}": {"live": percentile(measured, q), "sim": percentile(simulated, q)}
                           for q in QUANTILES}
        if all(r.get("prefill_ms") is not None for r in live):
            row["ttft_parts_ms"] = ttft_parts(live, sim.ttft_s, sim.wait_s, engine)
        out.append(row)
    return {"bench": str(bench_path), "placement": placement.label(), "runs": out}


def ttft_parts(live: list[dict], sim_ttft: list[float], sim_wait: list[float], engine: EngineSpec) -> dict:
    """Medians, ms: live, the router's queue, its prefill call and the rest of the client's TTFT
    (the hops between client, router and engine); simulated, the wait for a pass and the pass; and
    the median ratio of each live prefill call to the profile's isolated prefill of its prompt."""
    med = statistics.median
    return {"live": {"router_queue": med(r["queue_ms"] for r in live),
                     "prefill_call": med(r["prefill_ms"] for r in live),
                     "hops": med(1e3 * r["ttft_s"] - r["queue_ms"] - r["prefill_ms"] for r in live)},
            "sim": {"wait": 1e3 * med(sim_wait), "pass": 1e3 * med(t - w for t, w in zip(sim_ttft, sim_wait))},
            "prefill_call_vs_profile": med(r["prefill_ms"] / (1e3 * engine.latency.prefill_s(r["prompt_tokens"]))
                                           for r in live)}


def markdown(report: dict) -> str:
    """One row per run: live / simulated percentiles and their ratio."""
    head = ["| rate (req/s) | " + " | ".join(f"{m} {q}: live / sim" for m in ("TTFT", "TPOT") for q in ("p50", "p90"))
            + " |", "|---:|" + "---|" * 4]
    rows = []
    for run in report["runs"]:
        cells = []
        for metric in ("ttft_s", "tpot_s"):
            for q in ("p50", "p90"):
                v = run[metric][q]
                cells.append(f"{1e3 * v['live']:.0f} / {1e3 * v['sim']:.0f} ms ({v['sim'] / v['live']:.2f}x)")
        rows.append(f"| {run['rate_rps']:.2f} | " + " | ".join(cells) + " |")
    parts = _parts_markdown(report["runs"])
    return "\n".join(head + rows + ([""] + parts if parts else []))


def _parts_markdown(runs: list[dict]) -> list[str]:
    """The TTFT's parts at the median, one row per run that recorded them (none: no lines)."""
    rows = [f"| {run['rate_rps']:.2f} | {p['live']['router_queue']:.1f} | {p['live']['prefill_call']:.0f} | "
            f"{p['live']['hops']:.1f} | {p['sim']['wait']:.1f} | {p['sim']['pass']:.0f} | "
            f"{p['prefill_call_vs_profile']:.2f}x |" for run in runs if (p := run.get("ttft_parts_ms"))]
    head = ["| rate (req/s) | live: router queue | prefill call | hops | sim: wait | pass | "
            "prefill call / isolated profile |", "|---:|---:|---:|---:|---:|---:|---:|"]
    return head + rows if rows else []
