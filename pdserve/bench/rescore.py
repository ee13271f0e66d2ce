"""Recorded bench results scored again (pure): any SLO set applied to the per-request timings that a
``pdserve bench --out`` file keeps, and one markdown table of several files' attainment and goodput.
Called by ``pdserve bench-compare --slo``."""
from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Sequence

from pdserve.bench.stats import (RequestTiming, Slo, attainment_points, max_goodput_rate, slo_summary,
                                 sustained_goodput)


def rescore(result: dict, slos: Sequence[Slo]) -> dict:
    """A copy of ``result`` whose per-run SLO attainment and goodput use ``slos`` instead."""
    out = copy.deepcopy(result)
    out["slos"] = [asdict(s) for s in slos]
    for run in out["runs"]:
        timings = [RequestTiming(**r) for r in run["requests"]]
        run["summary"]["slo"] = {s.name: slo_summary(s, timings, run["summary"]["duration_s"]) for s in slos}
    out["max_goodput_rps"] = {s.name: max_goodput_rate(attainment_points(out, s.name)) for s in slos}
    return out


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
        cells = [f"{sustained_goodput(attainment_points(r, n)):.3g} / {max_goodput_rate(attainment_points(r, n)):.3g}"
                 for r in results]
        lines.append(f"| goodput {n}, sustained / highest (req/s) | " + " | ".join(cells) + " |")
    return "\n".join(lines)

