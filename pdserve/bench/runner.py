"""Drive a running pdserve over its public gRPC API and time what a client sees.

Arrivals: Poisson at a rate (seeded), the trace's own timestamps time-scaled, or a fixed number
of requests in flight. Each request is bounded by ``timeout_s``; a failed one is recorded, never
retried. A progress line is drawn on stderr.
"""
from __future__ import annotations

import asyncio
import random
import sys
import time
from typing import Any, Sequence

import grpc

from pdserve.bench.http_driver import HttpDriver
from pdserve.bench.stats import RequestTiming
from pdserve.bench.workloads import BenchRequest
from pdserve.client import build_request
from protos import pdserve_v1_pb2_grpc as pb_grpc


def arrival_times(requests: Sequence[BenchRequest], arrival: str, rate: float, time_scale: float, seed: int) -> list[float]:
    """Send offsets (s) per request for ``poisson`` or ``trace`` arrivals."""
    if arrival == "trace":
        start = requests[0].arrival_s if requests else 0.0
        return [(r.arrival_s - start) / time_scale for r in requests]
    rng, t, out = random.Random(seed), 0.0, []
    for _ in requests:
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def run(target: str, requests: Sequence[BenchRequest], arrival: str = "poisson", rate: float = 1.0,
              concurrency: int = 4, time_scale: float = 1.0, timeout_s: float = 300.0, seed: int = 0,
              progress: bool = True) -> tuple[list[RequestTiming], float, list[float]]:
    """Send every request to ``target`` (``HOST:PORT``: gRPC; ``http://HOST:PORT``: the OpenAI HTTP
    API); returns per-request timings (in request order), the run's duration, and when each
    request was sent (seconds after the run's start, in request order)."""
    bar = _Progress(len(requests), progress)
    sent = [0.0] * len(requests)
    async with driver(target) as client:
        start = time.perf_counter()

        async def one(i: int, req: BenchRequest) -> RequestTiming:
            sent[i] = time.perf_counter() - start
            return await _one(client, req, timeout_s, bar)

        if arrival == "concurrency":
            timings = await _closed_loop(one, requests, concurrency)
        else:
            offsets = arrival_times(requests, arrival, rate, time_scale, seed)
            timings = await asyncio.gather(*(_at(start + o, one, i, r) for i, (o, r) in enumerate(zip(offsets, requests))))
        duration = time.perf_counter() - start
    bar.close()
    return list(timings), duration, sent


async def _at(when: float, one: Any, i: int, req: BenchRequest) -> RequestTiming:
    await asyncio.sleep(max(0.0, when - time.perf_counter()))
    return await one(i, req)


async def _closed_loop(one: Any, requests: Sequence[BenchRequest], concurrency: int) -> list[RequestTiming]:
    results: list[RequestTiming | None] = [None] * len(requests)
    queue = list(enumerate(requests))[::-1]

    async def worker() -> None:
        while queue:
            i, req = queue.pop()
            results[i] = await one(i, req)

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return [r for r in results if r is not None]


def driver(target: str) -> Any:
    """The client for ``target``: an async context manager whose value has ``send``."""
    return HttpDriver(target) if target.startswith(("http://", "https://")) else GrpcDriver(target)


class GrpcDriver:
    """Sends ``BenchRequest``s over the gRPC API."""

    def __init__(self, target: str) -> None:
        self.target = target

    async def __aenter__(self) -> GrpcDriver:
        self.channel = grpc.aio.insecure_channel(self.target)
        self.stub = pb_grpc.PdServeStub(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    async def send(self, req: BenchRequest, timeout_s: float) -> RequestTiming:
        """One streamed request, timed as the client sees it."""
        return await _grpc_one(self.stub, req, timeout_s)


async def _one(client: Any, req: BenchRequest, timeout_s: float, bar: _Progress) -> RequestTiming:
    timing = await client.send(req, timeout_s)
    bar.step()
    return timing


async def _grpc_one(stub: pb_grpc.PdServeStub, req: BenchRequest, timeout_s: float) -> RequestTiming:
    msg = build_request(messages=list(req.messages) if req.messages else None,
                        token_ids=list(req.token_ids) if req.token_ids else None, max_tokens=req.max_tokens)
    start = time.perf_counter()
    stamps: list[float] = []
    final = None
    try:
        async for resp in stub.Generate(msg, timeout=timeout_s):
            stamps += [time.perf_counter()] * len(resp.token_ids)
            final = resp if resp.final else final
    except grpc.aio.AioRpcError as err:
        return RequestTiming(ok=False, error=f"{err.code().name}: {err.details()}")
    end = time.perf_counter()
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
    return RequestTiming(ok=final is not None, ttft_s=stamps[0] - start if stamps else None, tpot_s=tpot,
                         e2e_s=end - start, prompt_tokens=final.usage.prompt_tokens if final else 0,
                         output_tokens=len(stamps), queue_ms=final.timings.queue_ms if final else None,
                         prefill_ms=final.timings.prefill_ms if final else None)


class _Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled, self.start = total, 0, enabled and total > 0, time.perf_counter()

    def step(self) -> None:
        self.done += 1
        if self.enabled:
            filled = 30 * self.done // self.total
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                             f"{time.perf_counter() - self.start:5.1f}s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
