"""Helpers for the live tests: reference runs on one engine, KV counters, block sizes."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import ray

from pdserve.base.types import PromptInput, SamplingSpec

STORY = ("Once upon a time, in a village at the edge of a great forest, there lived an old clockmaker "
         "who repaired every clock in the valley and knew the story of each one. ")
SHARED = "You are a careful assistant. Here is a long shared document. " + STORY * 6


def exactness_cases(cluster):
    """Six prompts: short, chat, several blocks, two sharing a long prefix, 8 tokens short of the
    context. (name, router input kwargs, PromptInput for the reference, max_tokens, ignore_eos)."""
    near_limit = (tokenize(cluster, PromptInput(text=STORY * 40)) * 2)[:2048 - 8]
    return [
        ("short", {"prompt": "The capital of France is"}, PromptInput(text="The capital of France is"), 24, True),
        ("chat", {"messages": [("user", "Name three colors.")]}, PromptInput(messages=(("user", "Name three colors."),)), 48, False),
        ("several_blocks", {"prompt": STORY * 4}, PromptInput(text=STORY * 4), 24, True),
        ("shared_prefix_a", {"prompt": SHARED + "Question: who lived there?"}, PromptInput(text=SHARED + "Question: who lived there?"), 24, True),
        ("shared_prefix_b", {"prompt": SHARED + "Question: what did he repair?"}, PromptInput(text=SHARED + "Question: what did he repair?"), 24, True),
        ("near_context_limit", {"token_ids": near_limit}, PromptInput(token_ids=tuple(near_limit)), 8, True),
    ]


@dataclass
class Reference:
    """A request served whole by one engine (no disaggregation)."""

    token_ids: list[int]
    text: str
    finish_reason: str


def tokenize(cluster, prompt: PromptInput) -> list[int]:
    """Token ids exactly as the router's tokenization makes them."""
    return ray.get(cluster.prefill[0].actor.tokenize.remote(prompt), timeout=60)


def reference(cluster, request_id: str, ids: list[int], spec: SamplingSpec) -> Reference:
    """Serve the request on the prefill engine alone, streaming, with a cold prefix cache."""
    reset_caches(cluster)
    stream = cluster.prefill[0].actor.generate.options(num_returns="streaming").remote(request_id, ids, spec)
    out = Reference([], "", "")
    for ref in stream:
        chunk = ray.get(ref, timeout=120)
        out.token_ids += chunk.token_ids
        out.text += chunk.text
        out.finish_reason = chunk.finish_reason or out.finish_reason
    return out


def reset_caches(cluster) -> None:
    """Cold prefix caches on every engine."""
    ray.get([w.actor.reset_prefix_cache.remote() for w in cluster.workers], timeout=60)


def loads(cluster) -> list:
    """Every worker's current load snapshot."""
    return ray.get([w.actor.load.remote() for w in cluster.workers], timeout=30)


def idle(cluster) -> bool:
    """No engine runs, queues or holds KV blocks."""
    return all(s.running == 0 and s.waiting == 0 and s.kv_cache_usage == 0.0 for s in loads(cluster))


def external_tokens(cluster) -> int:
    """Prompt tokens the decode engine has loaded through its KV connector so far."""
    return ray.get(cluster.decode[0].actor.external_hits.remote(), timeout=30)[1]


def kv_bytes(model_dir: str, num_tokens: int, block_size: int, dtype_bytes: int = 2) -> int:
    """Bytes of the KV of ``num_tokens`` prompt tokens, moved as whole blocks."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * dtype_bytes
    return math.ceil(num_tokens / block_size) * block_size * per_token
