"""Turn a ``GenerateRequest`` proto into a ``RouterRequest``, or raise InvalidRequestError with a
one-line message. Only checks that need no tokenizer; prompt lengths are checked after
tokenization (``router.prepare``)."""
from __future__ import annotations

import math
import uuid

from pdserve.base.types import InvalidRequestError, PromptInput, SamplingSpec
from protos import pdserve_v1_pb2 as pb
from router.request import RouterRequest

ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16
MAX_REQUEST_ID = 128


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)


def parse_request(msg: pb.GenerateRequest, max_prompt_bytes: int = 0, max_prompt_tokens: int = 0) -> RouterRequest:
    """Validate and convert; the request id is the client's or a new uuid. Prompts over
    ``max_prompt_bytes`` of text or ``max_prompt_tokens`` ids (0: unbounded) are refused here,
    before anything tokenizes them."""
    _check(len(msg.request_id) <= MAX_REQUEST_ID, f"request_id longer than {MAX_REQUEST_ID} characters")
    _check_size(msg, max_prompt_bytes, max_prompt_tokens)
    slo = msg.slo
    for name, value in (("slo.ttft_ms", slo.ttft_ms), ("slo.tpot_ms", slo.tpot_ms)):
        _check(math.isfinite(value) and value >= 0, f"{name} must be >= 0, got {value}")
    return RouterRequest(request_id=msg.request_id or uuid.uuid4().hex, prompt=parse_prompt(msg),
                         sampling=parse_sampling(msg.sampling), ttft_slo_ms=slo.ttft_ms,
                         tpot_slo_ms=slo.tpot_ms, priority=msg.priority)


def _check_size(msg: pb.GenerateRequest, max_bytes: int, max_tokens: int) -> None:
    kind = msg.WhichOneof("input")
    if kind == "tokens":
        n = len(msg.tokens.token_ids)
        _check(not max_tokens or n < max_tokens, f"prompt is {n} tokens; the model's context is {max_tokens} "
                                                 "(prompt must leave room for at least one output token)")
        return
    text = [msg.prompt] if kind == "prompt" else [m.content for m in msg.chat.messages] if kind == "chat" else []
    size = sum(len(t) for t in text)  # characters: a cheap lower bound of the UTF-8 bytes
    if max_bytes and size > max_bytes // 4:
        size = sum(len(t.encode()) for t in text)
    _check(not max_bytes or size <= max_bytes, f"prompt is {size} bytes; the limit is {max_bytes}")


def parse_prompt(msg: pb.GenerateRequest) -> PromptInput:
    """Exactly one non-empty input."""
    kind = msg.WhichOneof("input")
    _check(kind is not None, "one of prompt, chat or tokens is required")
    if kind == "prompt":
        _check(bool(msg.prompt.strip()), "prompt is empty")
        return PromptInput(text=msg.prompt)
    if kind == "chat":
        messages = msg.chat.messages
        _check(len(messages) > 0, "chat.messages is empty")
        for i, m in enumerate(messages):
            _check(m.role in ROLES, f"chat.messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}")
        _check(any(m.content.strip() for m in messages), "chat.messages have no content")
        return PromptInput(messages=tuple((m.role, m.content) for m in messages))
    _check(len(msg.tokens.token_ids) > 0, "tokens.token_ids is empty")
    return PromptInput(token_ids=tuple(msg.tokens.token_ids))


def parse_sampling(s: pb.SamplingParams) -> SamplingSpec:
    """Range checks; unset optional fields take their defaults (0 max_tokens: the server's)."""
    _check(s.max_tokens >= 0, f"max_tokens must be > 0, got {s.max_tokens}")
    temperature = s.temperature if s.HasField("temperature") else 0.0
    _check(math.isfinite(temperature) and 0 <= temperature <= 2, f"temperature must be in [0, 2], got {temperature}")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    _check(math.isfinite(top_p) and 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}")
    top_k = s.top_k if s.HasField("top_k") else 0
    _check(top_k >= -1, f"top_k must be -1, 0 (disabled) or >= 1, got {top_k}")
    _check(len(s.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings")
    _check(all(s.stop), "stop strings must be non-empty")
    return SamplingSpec(max_tokens=s.max_tokens, temperature=temperature, top_p=top_p, top_k=max(top_k, 0),
                        seed=s.seed if s.HasField("seed") else None, stop=tuple(s.stop), ignore_eos=s.ignore_eos)
