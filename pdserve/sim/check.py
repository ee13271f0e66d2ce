"""``pdserve sim-check``: the simulator against a live ``pdserve bench`` run. Each recorded run is
replayed in ``ServingSim`` with the same arrivals (the bench's seeded Poisson offsets), the same
prompt and output lengths (as the engines counted them) and the deployment's shape, and the TTFT and
TPOT percentiles of both are written side by side with their ratio."""
from __future__ import annotations

import json
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
        out.append(row)
    return {"bench": str(bench_path), "placement": placement.label(), "runs": out}


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
    return "\n".join(head + rows)
