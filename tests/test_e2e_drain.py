"""Graceful stop on the real stack: from the stop on, health says NOT_SERVING and new requests get
UNAVAILABLE; requests that end within the grace end normally; the streams still running at its
end (gRPC and HTTP) end with a final message, finish reason ``shutdown``, not a cut connection;
and every engine is idle afterwards."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import grpc
import httpx

from conftest import start_router, wait_until
from helpers import STORY, idle
from pdserve.client import PdServeClient, build_request
from protos import pdserve_v1_pb2 as pb

GRACE_S = 3.0


def _grpc_stream(client: PdServeClient, max_tokens: int, out: dict) -> None:
    tokens, last = 0, None
    for msg in client.stream(build_request(prompt=STORY, max_tokens=max_tokens, ignore_eos=True), timeout_s=120):
        tokens += len(msg.token_ids)
        out["tokens"], last = tokens, msg
    out["final"] = last


def _http_stream(base: str, out: dict) -> None:
    body = {"model": "SmolLM2-135M-Instruct", "prompt": STORY, "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    chunks = []
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
                out["chunks"] = len(chunks)
            out["done"] = line == "data: [DONE]" or out.get("done", False)
    out["finish"] = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1]


def test_stop_drains_then_ends_streams_with_a_final_message(cluster):
    router = start_router(cluster.prefill, cluster.decode, cluster.model_info, metrics=False, http=True,
                          request_timeout_s=120)
    client = PdServeClient(router.target)
    long_grpc, long_http, short = {}, {}, {}
    threads = [threading.Thread(target=_grpc_stream, args=(client, 1500, long_grpc)),
               threading.Thread(target=_http_stream, args=(router.http, long_http))]
    for t in threads:
        t.start()
    assert wait_until(lambda: long_grpc.get("tokens", 0) >= 3 and long_http.get("chunks", 0) >= 3, 60)
    threads.append(threading.Thread(target=_grpc_stream, args=(client, 8, short)))
    threads[-1].start()
    time.sleep(0.1)
    stopping = asyncio.run_coroutine_threadsafe(router.server.stop(GRACE_S), router.loop)
    time.sleep(0.3)
    try:
        client.complete(build_request(prompt="Hi", max_tokens=2), timeout_s=30)
        refused = None
    except grpc.RpcError as err:
        refused = err.code()
    health = client.health().status
    stopping.result(60)
    for t in threads:
        t.join(60)
    router.loop.call_soon_threadsafe(router.loop.stop)
    client.close()
    assert refused is grpc.StatusCode.UNAVAILABLE
    assert health == pb.HealthResponse.NOT_SERVING
    assert short["final"].finish_reason == "length" and short["tokens"] == 8
    assert long_grpc["final"].final and long_grpc["final"].finish_reason == "shutdown"
    assert long_grpc["final"].usage.completion_tokens == long_grpc["tokens"] < 1500
    assert long_http["finish"] == "shutdown" and long_http["done"]
    assert wait_until(lambda: idle(cluster), 30), "KV blocks were not returned after the drain"
