"""OpenAI's request and response shapes, translated to and from pdserve's own.

A request body becomes the same ``pdserve.v1.GenerateRequest`` a gRPC client would send, so it goes
through the same validation (``router.validate``) and the same request path; the dispatcher's
events become OpenAI's completion objects and server-sent-event chunks. Pure functions: no I/O.

pdserve's extra fields live under one vendor key, ``pdserve``: in a request, ``ttft_ms``, ``tpot_ms``
(SLO targets), ``priority``, ``top_k``, ``ignore_eos``; in a response, the per-request timings, the
instances used and the routing reason; in a stream chunk, ``tokens`` (tokens in that chunk).
"""
from __future__ import annotations

from typing import Any

from pdserve.base.types import InvalidRequestError
from protos import pdserve_v1_pb2 as pb
from router.legs import FinalEvent

VENDOR = "pdserve"
VENDOR_FIELDS = {"ttft_ms", "tpot_ms", "priority", "top_k", "ignore_eos"}
ROLE_ALIASES = {"developer": "system"}
UNSUPPORTED = {"logprobs": "logprobs", "top_logprobs": "logprobs", "echo": "echo", "best_of": "best_of > 1",
               "tools": "tools", "functions": "functions", "response_format": "response_format",
               "suffix": "suffix", "logit_bias": "logit_bias", "frequency_penalty": "frequency_penalty",
               "presence_penalty": "presence_penalty"}
"""Body fields pdserve cannot honour: a truthy value (other than best_of 1) is a 400, never ignored."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)


def chat_request(body: Any) -> pb.GenerateRequest:
    """``POST /v1/chat/completions`` body -> GenerateRequest (chat input)."""
    msg = _common(body)
    messages = body.get("messages")
    _check(isinstance(messages, list), "messages must be a list")
    for i, m in enumerate(messages):
        _check(isinstance(m, dict), f"messages[{i}] must be an object")
        role = ROLE_ALIASES.get(m.get("role"), m.get("role"))
        msg.chat.messages.add(role=str(role), content=_text(m.get("content"), f"messages[{i}].content"))
    if not messages:
        msg.chat.SetInParent()
    return msg


def completion_request(body: Any) -> pb.GenerateRequest:
    """``POST /v1/completions`` body -> GenerateRequest (raw text or token ids, no chat template)."""
    msg = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        msg.prompt = prompt
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        _check(all(-2**31 <= t < 2**31 for t in prompt), "prompt token ids must be 32-bit integers")
        msg.tokens.token_ids.extend(prompt)
        if not prompt:
            msg.tokens.SetInParent()
    else:
        raise InvalidRequestError("prompt must be a string or a list of token ids (one prompt per request)")
    return msg


def _common(body: Any) -> pb.GenerateRequest:
    """Sampling, SLO and vendor fields shared by both endpoints."""
    _check(isinstance(body, dict), "the request body must be a JSON object")
    for key, feature in UNSUPPORTED.items():
        value = body.get(key)
        _check(not value or (key == "best_of" and value == 1), f"{feature} is not supported")
    n = body.get("n", 1)
    _check(n in (None, 1), f"n must be 1, got {n}")
    vendor = body.get(VENDOR) or {}
    _check(isinstance(vendor, dict) and set(vendor) <= VENDOR_FIELDS,
           f"{VENDOR} takes only {', '.join(sorted(VENDOR_FIELDS))}")
    sampling = pb.SamplingParams(max_tokens=_max_tokens(body), ignore_eos=bool(vendor.get("ignore_eos", False)))
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            setattr(sampling, name, _number(body[name], name))
    if body.get("seed") is not None:
        sampling.seed = _integer(body["seed"], "seed")
    if vendor.get("top_k") is not None:
        sampling.top_k = _integer(vendor["top_k"], f"{VENDOR}.top_k")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else (stop or [])
    _check(isinstance(stops, list) and all(isinstance(s, str) for s in stops), "stop must be a string or a list of strings")
    sampling.stop.extend(stops)
    slo = pb.SloTargets(ttft_ms=_number(vendor.get("ttft_ms", 0), f"{VENDOR}.ttft_ms"),
                        tpot_ms=_number(vendor.get("tpot_ms", 0), f"{VENDOR}.tpot_ms"))
    return pb.GenerateRequest(sampling=sampling, slo=slo, priority=_integer(vendor.get("priority", 0), f"{VENDOR}.priority"))


def _max_tokens(body: dict) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return 0  # the server's default
    value = _integer(value, "max_tokens")
    _check(value >= 1, f"max_tokens must be > 0, got {value}")
    return value


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or text parts."""
    if isinstance(content, str):
        return content
    _check(isinstance(content, list), f"{where} must be a string or a list of text parts")
    parts = []
    for part in content:
        _check(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str),
               f"{where}: only text parts are supported")
        parts.append(part["text"])
    return "".join(parts)


def _number(value: Any, name: str) -> float:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{name} must be a number")
    return float(value)


def _integer(value: Any, name: str) -> int:
    _check(isinstance(value, int) and not isinstance(value, bool) and -2**31 <= value < 2**31,
           f"{name} must be a 32-bit integer")
    return value


# ---- responses -------------------------------------------------------------------------------------

def usage(final: FinalEvent) -> dict:
    """OpenAI's usage object, with the prefix-cache hit in ``prompt_tokens_details``."""
    return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
            "total_tokens": final.prompt_tokens + final.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": final.cached_tokens}}


def vendor_info(final: FinalEvent) -> dict:
    """The per-request timings and placement under the vendor key."""
    return {"timings": {"queue_ms": final.queue_ms, "prefill_ms": final.prefill_ms, "ttft_ms": final.ttft_ms,
                        "kv_transfer_ms": final.kv_transfer_ms, "kv_transfer_bytes": final.kv_transfer_bytes,
                        "e2e_ms": final.e2e_ms},
            "prefill_instance": final.prefill_instance, "decode_instance": final.decode_instance,
            "prefill_reason": final.prefill_reason}


def completion(chat: bool, rid: str, model: str, created: int, text: str, final: FinalEvent) -> dict:
    """The whole (non-streamed) answer."""
    choice: dict = {"index": 0, "finish_reason": final.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice], "usage": usage(final), VENDOR: vendor_info(final)}


def chunk(chat: bool, rid: str, model: str, created: int, text: str | None, finish: str | None = None,
          tokens: int = 0, first: bool = False, with_usage: bool = False) -> dict:
    """One streamed chunk: a text delta, or (``finish`` set) the closing one."""
    if chat:
        delta = {} if text is None else {"content": text}
        if first:
            delta["role"] = "assistant"
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
           "model": model, "choices": [choice], VENDOR: {"tokens": tokens}}
    if with_usage:
        out["usage"] = None
    return out


def usage_chunk(chat: bool, rid: str, model: str, created: int, final: FinalEvent) -> dict:
    """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage(final), VENDOR: vendor_info(final)}


def error(message: str, kind: str, code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
