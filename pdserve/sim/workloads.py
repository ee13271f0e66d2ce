"""Named workloads for ``pdserve simulate`` and the SLO rule used with them."""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from pdserve.sim import traces
from router.latency import LatencyModel

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "traces"
DEFAULT_PATHS = {
    "mooncake": SHARED / "mooncake_fast25" / "conversation_trace.jsonl",
    "azure-conv": SHARED / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv",
    "azure-code": SHARED / "azure_llm_2023" / "AzureLLMInferenceTrace_code.csv",
    "sharegpt": SHARED / "sharegpt_mlenergy" / "ShareGPT_V3_filtered_500.json",
}


def load(name: str, path: str | None, limit: int | None, requests: int, rate: float, seed: int) -> list[traces.TraceRequest]:
    """The workload ``name`` (a trace file, or ``synthetic`` Poisson with shared prefixes)."""
    if name == "synthetic":
        return traces.synthetic(requests, rate, seed)
    if name == "sharegpt":
        return traces.sharegpt_chat(DEFAULT_PATHS["sharegpt"], DEFAULT_PATHS["azure-conv"], requests, seed, rate)
    file = Path(path) if path else DEFAULT_PATHS[name]
    if not file.is_file():
        raise FileNotFoundError(f"trace {file} not found (pass --path)")
    return traces.load_mooncake(file, limit) if name == "mooncake" else traces.load_azure(file, limit)


def poisson_lengths(name: str, n: int, seed: int, input_scale: float = 1.0, max_context: int = 0,
                    max_output: int = 0) -> list[traces.TraceRequest]:
    """``n`` requests of workload ``name``'s prompt and output lengths, arriving as a Poisson process
    at 1 req/s (DistServe's arrivals; the planner's search compresses them). No prefix sharing.
    Prompts are scaled by ``input_scale``; outputs are capped at ``max_output`` and prompt + output
    at ``max_context`` (0: no cap)."""
    rows = load(name, None, n, n, 1.0, seed)
    if name != "sharegpt":  # a trace's own times become Poisson arrivals (sharegpt's already are)
        rng, t, timed = random.Random(seed), 0.0, []
        for r in rows:
            t += rng.expovariate(1.0)
            timed.append(traces.TraceRequest(t, r.input_len, r.output_len, ()))
        rows = timed
    out = []
    for r in rows:
        n_in = max(1, round(r.input_len * input_scale))
        n_out = min(r.output_len, max_output or r.output_len, max_context // 2 or r.output_len)
        out.append(replace(r, input_len=min(n_in, max_context - n_out) if max_context else n_in, output_len=n_out))
    return out


def from_setup(setup) -> list[traces.TraceRequest]:
    """The workload slice a ``SimSetup`` names: ``offset`` and ``limit`` applied, arrivals rebased to
    start at 0, prompts truncated to ``max_input_tokens``."""
    limit = setup.offset + setup.limit if setup.limit else None
    requests = load(setup.trace, None, limit, setup.requests, setup.rate, setup.seed)[setup.offset:]
    start = requests[0].arrival_s
    requests = [replace(r, arrival_s=r.arrival_s - start) for r in requests]
    if setup.max_input_tokens:
        requests = [traces.truncate(r, setup.max_input_tokens) for r in requests]
    return requests


def p95_isolated_prefill_s(requests: list[traces.TraceRequest], latency: LatencyModel) -> float:
    """The default TTFT SLO: the idle-cluster prefill time of the 95th-percentile prompt, so an
    idle cluster meets it for 95% of requests and the 90% target measures queueing and caching,
    not the model's raw speed."""
    lengths = sorted(r.input_len for r in requests)
    return latency.prefill_s(lengths[int(0.95 * (len(lengths) - 1))])
