"""Drive pdserve's OpenAI-compatible HTTP API the way ``runner`` drives gRPC: one streamed request,
timed as the client sees it (``pdserve bench --target http://HOST:PORT``). httpx, no openai SDK,
so the client adds as little as possible of its own."""
from __future__ import annotations

import json
import time

import httpx

from pdserve.bench.stats import RequestTiming
from pdserve.bench.workloads import BenchRequest


class HttpDriver:
    """Sends ``BenchRequest``s to ``/v1/completions`` (token ids) or ``/v1/chat/completions``."""

    def __init__(self, base_url: str) -> None:
        self.base = base_url.rstrip("/")
        self.client = httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=1024))
        self.model = ""

    async def __aenter__(self) -> HttpDriver:
        models = (await self.client.get(f"{self.base}/v1/models", timeout=30)).json()
        self.model = models["data"][0]["id"]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    async def send(self, req: BenchRequest, timeout_s: float) -> RequestTiming:
        """One streamed request; token arrival times from each chunk's ``pdserve.tokens`` count."""
        body: dict = {"model": self.model, "max_tokens": req.max_tokens, "stream": True,
                      "stream_options": {"include_usage": True}}
        if req.messages:
            path, body["messages"] = "chat/completions", [{"role": r, "content": c} for r, c in req.messages]
        else:
            path, body["prompt"] = "completions", list(req.token_ids or ())
        start, stamps, usage, timings = time.perf_counter(), [], None, {}
        try:
            async with self.client.stream("POST", f"{self.base}/v1/{path}", json=body, timeout=timeout_s) as r:
                if r.status_code != 200:
                    error = json.loads(await r.aread())["error"]
                    return RequestTiming(ok=False, error=f"HTTP {r.status_code}: {error['message']}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    stamps += [time.perf_counter()] * chunk.get("pdserve", {}).get("tokens", 0)
                    usage = chunk.get("usage") or usage
                    timings = chunk.get("pdserve", {}).get("timings") or timings
        except httpx.HTTPError as err:
            return RequestTiming(ok=False, error=f"{type(err).__name__}: {err}")
        end = time.perf_counter()
        tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
        return RequestTiming(ok=usage is not None, ttft_s=stamps[0] - start if stamps else None, tpot_s=tpot,
                             e2e_s=end - start, prompt_tokens=usage["prompt_tokens"] if usage else 0,
                             output_tokens=len(stamps), queue_ms=timings.get("queue_ms"),
                             prefill_ms=timings.get("prefill_ms"))
