"""``pdserve bench-ab``: the overheads benchmark (``pdserve bench --overheads``) on fresh
deployments that differ in one config setting, the values alternating run by run, so that the
machine's drift falls on every value alike. Results: per value, the pooled medians and tails of
the router's added latency and of the first-to-second-token gap (docs/performance.md)."""
from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pdserve import launch
from pdserve.base import config as config_mod
from pdserve.base.net import free_port
from pdserve.bench import report
from pdserve.chaos import ServeProcess

LENGTHS = (64, 256, 512, 1024, 1900)


def run(config: str, key: str, values: list[str], runs: int, warmup: int, out: Path, fill: int = 0) -> dict:
    """``runs`` rounds; in each, one fresh deployment per value of ``key`` (a dotted config key,
    e.g. ``routing.worker_calls``) measured by ``report.overheads`` (``fill``: its cache-cycling
    requests). Writes and returns the report."""
    per_value: dict[str, list[dict]] = {v: [] for v in values}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(runs):
            for value in values:
                per_value[value].append(_measure(_variant(config, key, value, Path(tmp)), warmup, out, fill))
    result = {"what": f"pdserve bench --overheads on a fresh deployment per run, {key} alternating over "
                      f"{', '.join(values)}, {runs} runs each, {warmup} warm-up and {fill} cache-filling requests per run",
              "config": config, "key": key, **{v: _summary(rs) for v, rs in per_value.items()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _variant(config: str, key: str, value: str, tmp: Path) -> Path:
    """A copy of ``config`` with ``key`` set to ``value`` (parsed as YAML), validated."""
    data = yaml.safe_load(Path(config).read_text()) or {}
    *path, last = key.split(".")
    node = data
    for part in path:
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(value)
    config_mod.from_dict(config_mod.ServeConfig, data)  # an unknown key or a bad value fails here, not in serve
    file = tmp / f"{key}-{value}.yaml"
    file.write_text(yaml.safe_dump(data))
    return file


def _measure(config: Path, warmup: int, out: Path, fill: int) -> dict:
    name, port = f"ab-{os.getpid()}", free_port()
    serve = ServeProcess(["--config", str(config), "--name", name, "--port", str(port), "--http-port", "-1",
                          "--metrics-port", "-1"], out.with_suffix(".serve.log"))
    try:
        serve.start()
        return report.overheads(f"127.0.0.1:{port}", LENGTHS, repeats=3, warmup=warmup, fill=fill)
    finally:
        serve.terminate()
        launch.stop(config_mod.load(config, {"name": name}))


def _summary(runs: list[dict]) -> dict[str, Any]:
    rows = [row for r in runs for row in r["requests"]]
    added = sorted(row["router_added_ms"] for row in rows)
    gaps = [row["first_to_second_token_ms"] - row["kv_transfer_ms"] - row["decode_step_ms"] for row in rows]
    return {"runs": len(runs), "requests": len(rows),
            "router_added_ms_p50": statistics.median(added),
            "router_added_ms_p50_per_run": [r["router_added_ms_median"] for r in runs],
            "router_added_ms_p90": report.nearest_rank(added, 0.90),
            "router_added_ms_p99": report.nearest_rank(added, 0.99),
            "router_added_ms_max": added[-1],
            "first_to_second_token_ms_p50": statistics.median(row["first_to_second_token_ms"] for row in rows),
            "first_to_second_minus_transfer_and_step_ms_p50": statistics.median(gaps),
            "per_length": report.per_length(rows, LENGTHS),
            "raw": runs}
