"""The OpenAI-compatible HTTP API on the real stack, driven by the official ``openai`` client
(and httpx for raw status codes): completions, streaming, usage, errors, disconnects, load."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import start_router, stop_router, wait_until
from helpers import STORY, idle, loads, reset_caches
from pdserve.client import build_request

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture()
def oai(router):
    client = openai.OpenAI(base_url=f"{router.http}/v1", api_key="unused", max_retries=0, timeout=120)
    yield client
    client.close()


def test_models_lists_the_served_model(oai):
    assert [m.id for m in oai.models.list()] == [MODEL]


def test_chat_and_completion(oai):
    chat = oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    text = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                  extra_body={"pdserve": {"ignore_eos": True}})
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content and chat.choices[0].finish_reason in ("stop", "length")
    assert text.choices[0].text and text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 6
    vendor = text.model_extra["pdserve"]
    assert vendor["prefill_instance"] == "prefill-0" and vendor["decode_instance"] == "decode-0"
    assert vendor["timings"]["ttft_ms"] > 0


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_text_equals_the_whole_greedy_answer(cluster, oai, kind):
    def ask(stream: bool):
        reset_caches(cluster)  # equal cache state on both sides (see the README on bf16 exactness)
        if kind == "chat":
            return oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, stream=stream)
        return oai.completions.create(model=MODEL, prompt=STORY, max_tokens=24, temperature=0, stream=stream)
    whole = ask(False)
    pieces = list(ask(True))
    streamed = "".join((c.choices[0].delta.content or "") if kind == "chat" else c.choices[0].text
                       for c in pieces if c.choices)
    expected = whole.choices[0].message.content if kind == "chat" else whole.choices[0].text
    assert streamed == expected and pieces[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_usage_matches_the_grpc_api(oai, client):
    http = oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0,
                                       extra_body={"pdserve": {"ignore_eos": True}})
    grpc_final = client.complete(build_request(messages=[("user", "Name three colors.")], max_tokens=12,
                                               ignore_eos=True)).final
    assert (http.usage.prompt_tokens, http.usage.completion_tokens) == (grpc_final.usage.prompt_tokens,
                                                                        grpc_final.usage.completion_tokens)
    assert http.usage.total_tokens == http.usage.prompt_tokens + 12


def test_cached_tokens_rise_on_a_repeated_prefix(cluster, oai):
    reset_caches(cluster)
    prompt = STORY * 4
    first = oai.completions.create(model=MODEL, prompt=prompt + "First.", max_tokens=2)
    second = oai.completions.create(model=MODEL, prompt=prompt + "Second.", max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= 32 * ((first.usage.prompt_tokens - 8) // 32) - 32


def test_stream_with_include_usage(oai):
    chunks = list(oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, stream=True,
                                              stream_options={"include_usage": True},
                                              extra_body={"pdserve": {"ignore_eos": True}}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-2].choices[0].finish_reason == "length"


BAD_BODIES = [  # (name, endpoint, body, status, message fragment)
    ("not_json", "completions", b"{not json", 400, ""),
    ("unknown_model", "completions", {"model": "gpt-4", "prompt": "Hi"}, 404, "model 'gpt-4' not found"),
    ("no_messages", "chat/completions", {"model": MODEL}, 400, "messages must be a list"),
    ("empty_messages", "chat/completions", {"model": MODEL, "messages": []}, 400, "chat.messages is empty"),
    ("bad_role", "chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "role must be one of"),
    ("image_part", "chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "only text parts"),
    ("empty_prompt", "completions", {"model": MODEL, "prompt": ""}, 400, "prompt is empty"),
    ("two_prompts", "completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "one prompt per request"),
    ("token_out_of_vocab", "completions", {"model": MODEL, "prompt": [1, 10_000_000]}, 400, "token ids must be in [0, 49152)"),
    ("too_long", "completions", {"model": MODEL, "prompt": "word " * 3000}, 400, "the model's context is 2048"),
    ("prompt_plus_max_tokens", "completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2048}, 400, "exceeds the model's context (2048)"),
    ("zero_max_tokens", "completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 0}, 400, "max_tokens must be > 0"),
    ("negative_temperature", "completions", {"model": MODEL, "prompt": "Hello", "temperature": -0.5}, 400, "temperature must be in [0, 2]"),
    ("temperature_above_two", "completions", {"model": MODEL, "prompt": "Hello", "temperature": 2.5}, 400, "temperature must be in [0, 2]"),
    ("oversize_prompt", "completions", {"model": MODEL, "prompt": "x" * 4_000_000}, 400, "prompt is 4000000 bytes; the limit is 131072"),
    ("top_p_zero", "completions", {"model": MODEL, "prompt": "Hello", "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ("top_k_below_minus_one", "completions", {"model": MODEL, "prompt": "Hello", "pdserve": {"top_k": -2}}, 400, "top_k must be"),
    ("empty_stop", "completions", {"model": MODEL, "prompt": "Hello", "stop": [""]}, 400, "stop strings must be non-empty"),
    ("negative_slo", "completions", {"model": MODEL, "prompt": "Hello", "pdserve": {"ttft_ms": -1}}, 400, "slo.ttft_ms must be >= 0"),
    ("unknown_vendor_field", "completions", {"model": MODEL, "prompt": "Hello", "pdserve": {"speed": 1}}, 400, "pdserve takes only"),
    ("n_two", "completions", {"model": MODEL, "prompt": "Hello", "n": 2}, 400, "n must be 1"),
    ("logprobs", "completions", {"model": MODEL, "prompt": "Hello", "logprobs": 2}, 400, "logprobs is not supported"),
]


@pytest.mark.parametrize("name,endpoint,body,status,fragment", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_gets_its_status_and_openai_error_shape(router, name, endpoint, body, status, fragment):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{router.http}/v1/{endpoint}", content=content, headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_overload_unavailable_and_deadline_statuses(cluster):
    """429 with Retry-After (early rejection), 503 (no decode instance), 504 (deadline)."""
    busy = start_router(cluster.prefill, cluster.decode, cluster.model_info, metrics=False, http=True)
    no_decode = start_router(cluster.prefill, [], cluster.model_info, metrics=False, http=True)
    hurried = start_router(cluster.prefill, cluster.decode, cluster.model_info, metrics=False, http=True,
                           request_timeout_s=0.05)
    body = {"model": MODEL, "prompt": STORY * 6, "max_tokens": 50}
    try:
        rejected = httpx.post(f"{busy.http}/v1/completions", json={**body, "pdserve": {"ttft_ms": 1}}, timeout=60)
        unavailable = httpx.post(f"{no_decode.http}/v1/completions", json=body, timeout=60)
        health = httpx.get(f"{no_decode.http}/health", timeout=30)
        late = httpx.post(f"{hurried.http}/v1/completions", json=body, timeout=60)
    finally:
        for r in (busy, no_decode, hurried):
            stop_router(r)
    assert rejected.status_code == 429 and int(rejected.headers["Retry-After"]) >= 1
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    assert unavailable.status_code == 503 and unavailable.json()["error"]["message"] == "no live decode instance"
    assert health.status_code == 503 and "decode" in health.json()["detail"]
    assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
    assert wait_until(lambda: idle(cluster), 30), loads(cluster)


def test_health_and_metrics(router):
    assert httpx.get(f"{router.http}/health", timeout=30).status_code == 200
    metrics = httpx.get(f"{router.http}/metrics", timeout=30)
    assert metrics.status_code == 200 and "pdserve_requests_total" in metrics.text


def test_disconnect_mid_stream_frees_kv_on_both_pools(cluster, router):
    body = {"model": MODEL, "prompt": STORY * 8, "max_tokens": 400, "stream": True, "pdserve": {"ignore_eos": True}}
    with httpx.stream("POST", f"{router.http}/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip((ln for ln in lines if ln.startswith("data: ")), range(4))]
    assert len(got) == 4  # the connection is closed here, mid-stream
    assert wait_until(lambda: idle(cluster), 30), "blocks still held after the client went away"


def test_32_concurrent_streams_complete(oai):
    def one(i: int) -> tuple[str, int]:
        chunks = list(oai.completions.create(model=MODEL, prompt=f"Story {i}: " + STORY, max_tokens=8, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"pdserve": {"ignore_eos": True}}))
        return chunks[-2].choices[0].finish_reason, chunks[-1].usage.completion_tokens
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert results == [("length", 8)] * 32
