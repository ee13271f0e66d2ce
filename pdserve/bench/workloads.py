"""Bench workloads: real ShareGPT prompts, token-id prompts with the Azure 2023 traces' lengths,
and the Mooncake trace's lengths and prefix structure (its shared 512-token blocks become shared
blocks of real token ids, so prefix caching is exercised), scaled to what this model can serve."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from pdserve.sim import traces
from pdserve.sim.workloads import DEFAULT_PATHS, SHARED

VOCAB = (100, 49_000)
"""Token ids drawn for synthetic prompts (clear of the special tokens)."""


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: chat messages or token ids, its output cap, its trace arrival."""

    max_tokens: int
    messages: tuple[tuple[str, str], ...] | None = None
    token_ids: tuple[int, ...] | None = None
    arrival_s: float = 0.0


def load(name: str, n: int, seed: int, max_output: int, input_scale: float, output_scale: float,
         max_prompt: int) -> list[BenchRequest]:
    """``n`` requests of workload ``name`` (sharegpt, azure-code, azure-conv, mooncake)."""
    if name == "sharegpt":
        return sharegpt(n, seed, max_output)
    rows = (traces.load_mooncake if name == "mooncake" else traces.load_azure)(DEFAULT_PATHS[name], n)
    rng = random.Random(seed)
    blocks: dict[int, list[int]] = {}
    out = []
    for r in rows:
        length = max(1, min(max_prompt, round(r.input_len * input_scale)))
        output = max(1, min(max_output, round(r.output_len * output_scale)))
        out.append(BenchRequest(output, token_ids=tuple(_prompt(r, length, rng, blocks)), arrival_s=r.arrival_s))
    return out


def _prompt(r: traces.TraceRequest, length: int, rng: random.Random, blocks: dict[int, list[int]]) -> list[int]:
    """Token ids for a trace row: one fixed random block per prefix hash, so equal leading hashes
    give equal leading tokens."""
    per_block = max(1, -(-length // max(len(r.hashes), 1)))
    ids: list[int] = []
    for h in r.hashes:
        if h not in blocks:
            blocks[h] = [rng.randint(*VOCAB) for _ in range(per_block)]
        ids += blocks[h]
    return (ids or [rng.randint(*VOCAB)])[:length]


def sharegpt(n: int, seed: int, max_output: int) -> list[BenchRequest]:
    """``n`` real first-turn prompts (seeded sample), each a user chat message."""
    data = json.loads((SHARED / "sharegpt_mlenergy" / "ShareGPT_V3_filtered_500.json").read_text())
    prompts = [c["conversations"][0]["value"] for c in data if c["conversations"][0]["value"].strip()]
    random.Random(seed).shuffle(prompts)
    return [BenchRequest(max_output, messages=(("user", p),)) for p in (prompts * (n // len(prompts) + 1))[:n]]


def exists(name: str) -> bool:
    """Whether the workload's data file is present."""
    path = SHARED / "sharegpt_mlenergy" / "ShareGPT_V3_filtered_500.json" if name == "sharegpt" else DEFAULT_PATHS[name]
    return Path(path).is_file()
