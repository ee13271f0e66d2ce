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


class WorkerError(RuntimeError):
    """A worker failed a call (an engine error): what crosses to the router instead of vLLM's or
    torch's own exception types, so the router never unpickles, or imports, either. One line."""


class OverloadedError(RuntimeError):
    """Admission refused: a queue bound is reached or the request's predicted TTFT is far past its
    SLO (gRPC RESOURCE_EXHAUSTED); the message is one line, ``retry_after_s`` a hint."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


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
    pending_prefill_tokens: int = 0
    """Uncached prompt tokens routed to this instance whose prefill has not finished (router-tracked;
    a request's cached prefix is not queued work)."""
    queued_prefill_s: float = 0.0
    """Predicted seconds of prefill work routed to this instance and not finished: the sum of each
    such request's own predicted prefill (its length and cached prefix), the running one's
    remainder included where known (router-tracked)."""
    steps: int = 0
    """Engine steps completed so far: the progress counter the router's watchdog reads."""
    tokens: int = 0
    """Prompt and output tokens the engine has computed so far, and requests it finished: the
    watchdog's second counter (an engine that steps but computes nothing is stalled too)."""
    accepted: int = 0
    """Requests the worker handed to its engine that have not ended, counted by the worker itself
    (right even when the engine's own stats stop coming, as they do from a hung engine)."""
    boot: str = ""
    """This engine incarnation's id (a restarted worker reports a new one)."""
    endpoint: str = ""
    """``host:port`` of the worker's direct request server (``protos/worker_v1``); empty when it
    has none (the router then calls it through Ray)."""
    endpoint_token: str = ""
    """The token the direct server requires (this incarnation's own); the TCP server requires it too."""
    tcp_endpoint: str = ""
    """``host:port`` of the worker's TCP request server (``pdserve.engine.tcp_server``, the
    router's ``tcp`` worker calls); empty when it has none."""


@dataclass(frozen=True)
class ModelInfo:
    """What a worker's engine serves."""

    model: str
    max_model_len: int
    block_size: int
    eos_token_id: int | None
    cache_blocks: int = 0
    """KV-cache blocks of one engine (its prefix-cache capacity)."""


class Outcome(enum.Enum):
    """How a request ended, for accounting."""

    FINISHED = "finished"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    FAILED = "failed"


@dataclass(frozen=True)
class RequestRecord:
    """What the router knows of a request once it has ended (emitted once per request)."""

    outcome: Outcome
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float | None = None
    prefill_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    inter_token_s: tuple[float, ...] = ()
    """Gaps between consecutive output tokens as the router saw them."""
    kv_transfer_s: float | None = None
    kv_transfer_bytes: int | None = None
    kv_transfer_failed: bool = False
    predicted_ttft_s: float | None = None
    """The prefill policy's TTFT prediction when it made one."""
    ttft_slo_s: float = 0.0
    tpot_slo_s: float = 0.0
    prefill_instance: str = ""
    decode_instance: str = ""
    prefill_retries: int = 0
    """Prefills retried after a worker failure."""
    decode_migrations: int = 0
    """Decodes continued on another instance after a worker failure."""

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two tokens)."""
        return sum(self.inter_token_s) / len(self.inter_token_s) if self.inter_token_s else None

    def slo_met(self, scale: float = 1.0) -> tuple[bool, bool]:
        """(TTFT met, TPOT met) against the targets scaled by ``scale`` (below 1: met with that
        headroom); an unset target counts as met."""
        ttft_ok = not self.ttft_slo_s or (self.ttft_s is not None and self.ttft_s <= scale * self.ttft_slo_s)
        tpot = self.tpot_s
        tpot_ok = not self.tpot_slo_s or tpot is None or tpot <= scale * self.tpot_slo_s
        return ttft_ok, tpot_ok


@dataclass(frozen=True)
class RouteDecision:
    """One routing decision: which instance of which pool, chosen by which policy, and why."""

    pool: str
    policy: str
    instance: str
    reason: str
