"""Typed messages between the router and the workers (they cross Ray actor calls by pickle)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RequestState(enum.Enum):
    """A request's life in the router; the router is its only writer."""

    QUEUED = "queued"            # accepted, not yet at a prefill instance
    PREFILLING = "prefilling"    # prefill instance computing the prompt and first token
    TRANSFERRING = "transferring"  # handed to a decode instance, its KV being pulled
    DECODING = "decoding"        # decode instance streaming tokens
    FINISHED = "finished"        # final message sent (stop or length)
    CANCELLED = "cancelled"      # the client cancelled or its deadline passed
    REJECTED = "rejected"        # invalid input, nothing ran
    FAILED = "failed"            # a worker failed mid-request

    @property
    def terminal(self) -> bool:
        """Whether no further transition may happen."""
        return self in _TERMINAL


_TERMINAL = {RequestState.FINISHED, RequestState.CANCELLED, RequestState.REJECTED, RequestState.FAILED}


class InvalidRequestError(ValueError):
    """The request cannot be served as given (gRPC INVALID_ARGUMENT); the message is one line."""


class NoInstanceError(RuntimeError):
    """No live instance in a pool (gRPC UNAVAILABLE)."""


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling settings, already validated by the router."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class PromptInput:
    """What the client sent: exactly one of text, chat messages or token ids."""

    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class PrefillResult:
    """A prefill instance's answer: the first token, and the handle to its held KV."""

    token_id: int
    text: str
    finish_reason: str | None
    """Set when the request already finished at its first token (EOS, stop, max_tokens=1)."""
    kv_params: dict[str, Any] | None
    """Where the KV is held (host, port, request id, blocks); None when nothing is held."""
    num_prompt_tokens: int
    num_cached_tokens: int
    prefill_ms: float


@dataclass(frozen=True)
class DecodeChunk:
    """One streamed piece of a decode instance's output."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    kv: dict[str, Any] = field(default_factory=dict)
    """On the last chunk: the KV load report (tokens loaded, bytes, ms, failed)."""


@dataclass(frozen=True)
class LoadSnapshot:
    """An instance's load as last reported by its engine; the routing policies' input."""

    instance: str
    waiting: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    alive: bool = True


@dataclass(frozen=True)
class ModelInfo:
    """What a worker's engine serves."""

    model: str
    max_model_len: int
    block_size: int
    eos_token_id: int | None
