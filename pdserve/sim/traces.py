"""Workloads for the simulator: the Mooncake JSONL trace, the Azure 2023 CSV traces, and
synthetic Poisson workloads with a shared-prefix structure. All become ``TraceRequest`` lists
sorted by arrival."""
from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from router.policies.hashring import stable_hash

MOONCAKE_BLOCK = 512


@dataclass(frozen=True)
class TraceRequest:
    """One request of a workload."""

    arrival_s: float
    input_len: int
    output_len: int
    hashes: tuple[int, ...]
    """Prefix block hashes (equal leading hashes = shared prefix), ``block_size`` tokens each."""


def truncate(r: TraceRequest, max_tokens: int, block_size: int = MOONCAKE_BLOCK) -> TraceRequest:
    """``r`` with its prompt cut to ``max_tokens`` tokens (and its block hashes to match)."""
    if r.input_len <= max_tokens:
        return r
    return TraceRequest(r.arrival_s, max_tokens, r.output_len, r.hashes[:math.ceil(max_tokens / block_size)])


def load_mooncake(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """Mooncake FAST'25 JSONL (timestamp ms, input_length, output_length, hash_ids of 512-token
    blocks). Timestamps are quantized to ~3 s ticks; each tick's batch is spread evenly over it."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()][:limit]
    ticks = sorted({r["timestamp"] for r in rows})
    width = {t: (b - t) for t, b in zip(ticks, ticks[1:])}
    default = sum(width.values()) / max(len(width), 1)
    by_tick: dict[int, list[dict]] = {}
    for r in rows:
        by_tick.setdefault(r["timestamp"], []).append(r)
    out = []
    for t, group in by_tick.items():
        step = width.get(t, default) / len(group)
        out += [TraceRequest((t + i * step) / 1e3, r["input_length"], max(1, r["output_length"]), _chain(r["hash_ids"]))
                for i, r in enumerate(group)]
    return sorted(out, key=lambda r: r.arrival_s)


def _chain(ids: list) -> tuple[int, ...]:
    """Chained, process-independent block hashes (Mooncake's ids are already prefix identities;
    chaining makes that explicit and harmless)."""
    out, prev = [], 0
    for i in ids:
        prev = stable_hash(prev, i)
        out.append(prev)
    return tuple(out)


def load_azure(path: str | Path, limit: int | None = None, block_size: int = MOONCAKE_BLOCK) -> list[TraceRequest]:
    """Azure LLM inference trace 2023 CSV (TIMESTAMP, ContextTokens, GeneratedTokens). It carries
    no prefix information: every request gets blocks of its own (no sharing)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))[:limit]
    start = _azure_time(rows[0]["TIMESTAMP"])
    out = []
    for i, r in enumerate(rows):
        n = int(r["ContextTokens"])
        hashes = _chain([("azure", i)] + list(range(1, math.ceil(n / block_size))))
        out.append(TraceRequest(_azure_time(r["TIMESTAMP"]) - start, n, max(1, int(r["GeneratedTokens"])), hashes))
    return sorted(out, key=lambda r: r.arrival_s)


def _azure_time(stamp: str) -> float:
    day, clock = stamp.split(" ")
    whole, _, frac = clock.partition(".")
    return datetime.fromisoformat(f"{day} {whole}").timestamp() + float(f"0.{frac or 0}")


CHARS_PER_TOKEN = 3.99
"""ShareGPT text to tokens: measured with a GPT-2-family BPE (SmolLM2's; OPT's is GPT-2's) over the
500 prompts of the shared sample."""


def sharegpt_chat(prompts_path: str | Path, outputs_path: str | Path, n: int, seed: int,
                  rate: float = 1.0) -> list[TraceRequest]:
    """A chat workload: ``n`` Poisson arrivals at ``rate``/s, each a ShareGPT first-turn prompt
    (its length in tokens by ``CHARS_PER_TOKEN``) with an output length drawn from the Azure 2023
    conversation trace's, kept to the sample's 4-800 token filter. The sample has no outputs; the
    Azure trace is the public record of a chat service's output lengths. No prefix sharing."""
    rng = random.Random(seed)
    data = json.loads(Path(prompts_path).read_text())
    prompts = [max(1, round(len(c["conversations"][0]["value"]) / CHARS_PER_TOKEN)) for c in data]
    with open(outputs_path, newline="") as f:
        outputs = [min(800, max(4, int(row["GeneratedTokens"]))) for row in csv.DictReader(f)]
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(TraceRequest(t, rng.choice(prompts), rng.choice(outputs), ()))
    return out


def synthetic(n: int, rate: float, seed: int, groups: int = 50, zipf_s: float = 1.1, prefix_blocks: int = 8,
              suffix_blocks: tuple[int, int] = (1, 6), output_len: tuple[int, int] = (50, 400),
              block_size: int = MOONCAKE_BLOCK) -> list[TraceRequest]:
    """Poisson arrivals at ``rate``/s; each request shares the ``prefix_blocks``-block prefix of
    one of ``groups`` groups (Zipf(``zipf_s``) popularity) and adds a unique suffix."""
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** zipf_s for k in range(groups)]
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        g = rng.choices(range(groups), weights)[0]
        suffix = rng.randint(*suffix_blocks)
        hashes = _chain([("g", g, b) for b in range(prefix_blocks)] + [("r", i, b) for b in range(suffix)])
        out.append(TraceRequest(t, (prefix_blocks + suffix) * block_size - rng.randrange(block_size),
                                rng.randint(*output_len), hashes))
    return out
