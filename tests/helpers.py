"""Helpers for the live tests: reference runs on one engine, KV counters, block sizes."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import ray

from pdserve.types import PromptInput, SamplingSpec


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
