"""Recorded bench results scored again (pure): any SLO set applied to the per-request timings that a
``pdserve bench --out`` file keeps, and one markdown table of several files' attainment and goodput.
Called by ``pdserve bench-compare --slo``."""
from __future__ import annotations

import copy
from typing import Sequence

from pdserve.bench.stats import RequestTiming, Slo, max_goodput_rate

TARGET = 0.9
"""The attainment a rate must reach to count toward goodput (DistServe's 90%)."""


def rescore(result: dict, slos: Sequence[Slo]) -> dict:
    """A copy of ``result`` whose per-run SLO attainment and goodput use ``slos`` instead."""
    out = copy.deepcopy(result)
    out["slos"] = [{"name": s.name, "ttft_s": s.ttft_s, "tpot_s": s.tpot_s} for s in slos]
    for run in out["runs"]:
        timings = [RequestTiming(**r) for r in run["requests"]]
        duration = run["summary"]["duration_s"]
        run["summary"]["slo"] = {s.name: _scored(s, timings, duration) for s in slos}
    out["max_goodput_rps"] = {s.name: max_goodput_rate(_points(out, s.name), TARGET) for s in slos}
    return out


def sustained_goodput(points: Sequence[tuple[float, float]], target: float = TARGET) -> float:
    """The highest rate up to which every measured rate reached ``target`` (0.0 if the lowest did
    not): unlike ``max_goodput_rate``, a pass above a failed rate does not count."""
    best = 0.0
    for rate, attainment in sorted(points):
        if attainment < target:
            break
        best = rate
    return best


def table(results: Sequence[dict]) -> str:
    """Markdown: attainment (%) per offered rate, one column per file with its SLO sets joined by
    ' / ', then each file's goodput per SLO set, sustained and highest passing. Rows follow the
    file with the most rates (the sweeps are assumed to share their rates); '-' where a file has
    fewer."""
    names = [s["name"] for s in results[0]["slos"]]
    labels = [r["label"] for r in results]
    labels = [f"{l} ({labels[:i].count(l) + 1})" if labels.count(l) > 1 else l for i, l in enumerate(labels)]
    lines = ["| offered rate | " + " | ".join(labels) + " |",
             "|---:|" + "---|" * len(results)]
    longest = max(results, key=lambda r: len(r["runs"]))
    for i, run in enumerate(longest["runs"]):
        cells = [" / ".join(f"{r['runs'][i]['summary']['slo'][n]['attainment'] * 100:.0f}" for n in names)
                 if i < len(r["runs"]) else "-" for r in results]
        lines.append(f"| {run['rate_rps']:.3g} req/s | " + " | ".join(cells) + " |")
    for n in names:
        cells = [f"{sustained_goodput(_points(r, n)):.3g} / {max_goodput_rate(_points(r, n), TARGET):.3g}"
                 for r in results]
        lines.append(f"| goodput {n}, sustained / highest (req/s) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _scored(slo: Slo, timings: Sequence[RequestTiming], duration_s: float) -> dict:
    met = sum(slo.met(t) for t in timings)
    return {"name": slo.name, "ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s,
            "attainment": met / len(timings) if timings else 0.0,
            "goodput_rps": met / duration_s if duration_s > 0 else 0.0}


def _points(result: dict, name: str) -> list[tuple[float, float]]:
    return [(r["rate_rps"], r["summary"]["slo"][name]["attainment"]) for r in result["runs"]]
