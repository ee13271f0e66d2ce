"""Fuzzing the public gRPC API on the real stack: thousands of random byte strings and random
GenerateRequests. Every answer carries a deliberate status (never UNKNOWN or INTERNAL), the router
keeps serving, and no engine is left holding anything."""
from __future__ import annotations

import math
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc

from conftest import wait_until
from helpers import idle
from protos import pdserve_v1_pb2 as pb

SEED = 20261122
DELIBERATE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.DEADLINE_EXCEEDED}
FLOATS = [0.0, 0.5, 1.0, 2.0, 2.5, -1.0, 1e30, math.inf, -math.inf, math.nan]


def random_request(rng: random.Random) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(request_id=rng.choice(["", "x" * rng.randrange(200), f"fuzz-{rng.random()}"]))
    kind = rng.randrange(4)
    if kind == 0:
        msg.prompt = "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(40)))
    elif kind == 1:
        for _ in range(rng.randrange(3)):
            msg.chat.messages.add(role=rng.choice(["user", "system", "assistant", "robot", ""]),
                                  content="".join(rng.choice("ab \n") for _ in range(rng.randrange(20))))
    elif kind == 2:
        msg.tokens.token_ids.extend(rng.randrange(-5, 60_000) for _ in range(rng.randrange(30)))
    s = msg.sampling
    s.max_tokens = rng.randrange(-3, 4)
    for name in ("temperature", "top_p"):
        if rng.random() < 0.2:
            setattr(s, name, rng.choice(FLOATS))
    if rng.random() < 0.3:
        s.top_k = rng.randrange(-3, 5)
    if rng.random() < 0.2:
        s.stop.extend(rng.choice(["", ".", "\n"]) for _ in range(rng.randrange(3)))
    if rng.random() < 0.2:
        msg.slo.ttft_ms, msg.slo.tpot_ms = rng.choice(FLOATS), rng.choice(FLOATS)
    msg.priority = rng.randrange(-2**31, 2**31)
    return msg


def _status(call, payload) -> grpc.StatusCode:
    try:
        for _ in call(payload, timeout=60):
            pass
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


def test_random_bytes_and_random_requests_get_deliberate_statuses(cluster, router, client):
    rng = random.Random(SEED)
    blobs = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) for _ in range(2000)]
    requests = [random_request(rng) for _ in range(400)]
    with grpc.insecure_channel(router.target) as channel:
        raw = channel.unary_stream("/pdserve.v1.PdServe/Generate", request_serializer=lambda b: b,
                                   response_deserializer=pb.GenerateResponse.FromString)
        typed = channel.unary_stream("/pdserve.v1.PdServe/Generate", request_serializer=pb.GenerateRequest.SerializeToString,
                                     response_deserializer=pb.GenerateResponse.FromString)
        with ThreadPoolExecutor(16) as pool:
            raw_codes = list(pool.map(lambda b: _status(raw, b), blobs))
            typed_codes = list(pool.map(lambda m: _status(typed, m), requests))
    assert set(raw_codes) <= DELIBERATE and set(typed_codes) <= DELIBERATE
    assert raw_codes.count(grpc.StatusCode.INVALID_ARGUMENT) > 1000   # most random bytes do not parse
    counts = Counter(c.name for c in typed_codes)
    assert counts["OK"] > 20 and counts["INVALID_ARGUMENT"] > 100, counts
    assert client.health().status == pb.HealthResponse.SERVING
    assert wait_until(lambda: idle(cluster), 60)
