"""Bad input gets the right gRPC status and a one-line message, the server keeps serving, and
cancelled or timed-out requests leave no KV blocks held on either worker."""
from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
import ray

from conftest import start_router, stop_router, wait_until
from helpers import idle, loads, tokenize
from pdserve.base.types import PromptInput, SamplingSpec
from pdserve.client import PdServeClient, build_request
from protos import pdserve_v1_pb2 as pb

LONG = "The quick brown fox jumps over the lazy dog. " * 150  # about 1,500 tokens

BAD_INPUTS = [  # (name, request, message fragment)
    ("no_input", pb.GenerateRequest(), "one of prompt, chat or tokens"),
    ("empty_prompt", build_request(prompt=""), "prompt is empty"),
    ("blank_prompt", build_request(prompt="   "), "prompt is empty"),
    ("empty_chat", build_request(messages=[]), "chat.messages is empty"),
    ("bad_role", build_request(messages=[("robot", "hi")]), "role must be one of"),
    ("empty_tokens", build_request(token_ids=[]), "token_ids is empty"),
    ("token_out_of_vocab", build_request(token_ids=[1, 10_000_000]), "token ids must be in [0, 49152)"),
    ("too_long", build_request(prompt="word " * 3000), "the model's context is 2048"),
    ("prompt_plus_max_tokens", build_request(prompt="Hello", max_tokens=2048), "exceeds the model's context (2048)"),
    ("negative_max_tokens", build_request(prompt="Hello", max_tokens=-1), "max_tokens must be > 0"),
    ("negative_temperature", build_request(prompt="Hello", temperature=-0.5), "temperature must be in [0, 2]"),
    ("temperature_above_two", build_request(prompt="Hello", temperature=2.5), "temperature must be in [0, 2]"),
    ("oversize_prompt", build_request(prompt="x" * 4_000_000), "prompt is 4000000 bytes; the limit is 131072"),
    ("too_many_token_ids", build_request(token_ids=[42] * 200_000), "prompt is 200000 tokens; the model's context is 2048"),
    ("top_p_zero", build_request(prompt="Hello", top_p=0.0), "top_p must be in (0, 1]"),
    ("top_p_above_one", build_request(prompt="Hello", top_p=1.5), "top_p must be in (0, 1]"),
    ("top_k_below_minus_one", build_request(prompt="Hello", top_k=-2), "top_k must be"),
    ("empty_stop", build_request(prompt="Hello", stop=[""]), "stop strings must be non-empty"),
    ("negative_slo", build_request(prompt="Hello", ttft_ms=-1), "slo.ttft_ms must be >= 0"),
]


@pytest.mark.parametrize("name,request_msg,fragment", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_invalid_argument(client, name, request_msg, fragment):
    with pytest.raises(grpc.RpcError) as info:
        client.complete(request_msg, timeout_s=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details() and "\n" not in info.value.details()


def test_too_long_prompt_names_both_lengths(client):
    with pytest.raises(grpc.RpcError) as info:
        client.complete(build_request(token_ids=[42] * 3000))
    assert "prompt is 3000 tokens; the model's context is 2048" in info.value.details()


def test_server_still_serves_after_bad_input(cluster, client):
    for _, request_msg, _ in BAD_INPUTS[:4]:
        with pytest.raises(grpc.RpcError):
            client.complete(request_msg)
    got = client.complete(build_request(prompt="The capital of France is", max_tokens=4))
    assert got.final.finish_reason in ("length", "stop") and got.token_ids
    assert wait_until(lambda: idle(cluster), 30)


def test_client_cancel_frees_blocks_on_both_workers(cluster, client):
    """Cancel mid-decode: both engines abort the request and return its KV blocks."""
    call = client.stream(build_request(prompt=LONG, max_tokens=400, ignore_eos=True), timeout_s=120)
    stream = iter(call)
    received = [next(stream), next(stream), next(stream)]  # the prefill's token, then decode steps
    assert all(m.token_ids for m in received)
    call.cancel()
    assert wait_until(lambda: idle(cluster), 30), "blocks still held after cancel"


def test_deadline_during_prefill_frees_blocks(cluster, client):
    """A deadline that passes during the prefill: DEADLINE_EXCEEDED, nothing left running."""
    with pytest.raises(grpc.RpcError) as info:
        client.complete(build_request(prompt=LONG + " once more", max_tokens=200, ignore_eos=True), timeout_s=0.05)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: idle(cluster), 30), "blocks still held after the deadline"


@pytest.mark.parametrize("call", ["prefill", "generate", "decode"])
def test_an_abort_that_arrives_before_its_request_still_ends_it(cluster, call):
    """A worker runs calls concurrently, so the router's abort can reach the engine before the
    request it aborts: the request must still end at once, not run unobserved to its last token."""
    ids = tokenize(cluster, PromptInput(text=LONG))
    spec = SamplingSpec(max_tokens=300, ignore_eos=True)
    worker = (cluster.decode if call == "decode" else cluster.prefill)[0].actor
    request_id = f"aborted-first-{call}"
    ray.get(worker.abort.remote(request_id), timeout=30)
    if call == "prefill":
        with pytest.raises(ray.exceptions.RayTaskError, match="was aborted"):
            ray.get(worker.prefill.remote(request_id, ids, spec, True), timeout=60)
    else:
        method = worker.decode if call == "decode" else worker.generate
        args = (request_id, ids, 42, spec, None) if call == "decode" else (request_id, ids, spec)
        chunks = [ray.get(ref, timeout=60) for ref in method.options(num_returns="streaming").remote(*args)]
        assert chunks == []
    assert wait_until(lambda: idle(cluster), 30), loads(cluster)


def test_duplicate_request_id_is_rejected(client):
    first = client.stream(build_request(prompt=LONG, max_tokens=50, ignore_eos=True, request_id="dup"), timeout_s=120)
    stream = iter(first)
    next(stream)
    with pytest.raises(grpc.RpcError) as info:
        client.complete(build_request(prompt="Hello", max_tokens=2, request_id="dup"))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    first.cancel()


def test_no_decode_instance_is_unavailable(cluster):
    """A router whose decode pool is empty answers UNAVAILABLE and reports NOT_SERVING."""
    router = start_router(cluster.prefill, [], cluster.model_info)
    client = PdServeClient(router.target)
    try:
        with pytest.raises(grpc.RpcError) as info:
            client.complete(build_request(prompt="Hello there", max_tokens=8), timeout_s=60)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert info.value.details() == "no live decode instance"
        assert client.health().status == pb.HealthResponse.NOT_SERVING
        cli = subprocess.run([sys.executable, "-m", "pdserve.cli", "health", "--target", router.target],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 1 and "decode" in cli.stderr
    finally:
        client.close()
        stop_router(router)
    assert wait_until(lambda: idle(cluster), 30), "the prefill's KV was not released"


def test_cli_generate_and_health(router):
    health = subprocess.run([sys.executable, "-m", "pdserve.cli", "health", "--target", router.target],
                            capture_output=True, text=True, timeout=60)
    assert health.returncode == 0 and health.stdout.startswith("SERVING")
    gen = subprocess.run([sys.executable, "-m", "pdserve.cli", "generate", "--target", router.target,
                          "--max-tokens", "8", "What is 2 + 2?"], capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip() and "prefill-0 -> decode-0" in gen.stderr


def test_server_info_lists_pools(client):
    info = client.info()
    assert info.max_model_len == 2048 and info.block_size == 32
    assert [(p.role, [i.name for i in p.instances]) for p in info.pools] == [("prefill", ["prefill-0"]), ("decode", ["decode-0"])]
    assert all(i.alive for p in info.pools for i in p.instances)


def test_cli_status_table(router, client):
    client.complete(build_request(prompt="Status check", max_tokens=4, ignore_eos=True))
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "status", "--target", router.target],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].split() == ["POOL", "INSTANCE", "HEALTH", "WAITING", "RUNNING", "KV-CACHE", "PREFIX-HIT",
                                "TTFT-P50", "TPOT-P50"]
    prefill = next(line for line in lines if "prefill-0" in line).split()
    decode = next(line for line in lines if "decode-0" in line).split()
    assert prefill[:4] == ["prefill", "(dualmap)", "prefill-0", "up"] and prefill[-2:-1] == ["ms"] and prefill[-1] == "-"
    assert decode[:4] == ["decode", "(decode_p2c)", "decode-0", "up"] and decode[-1] == "ms" and decode[-3] == "-"
