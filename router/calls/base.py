"""``WorkerCalls``: the request calls the router makes on a worker (prefill, decode, generate,
abort), whatever carries them. Called by ``router.dispatch``; ``worker`` is a pool's worker (its
``name`` and Ray ``actor``).

Every call raises only pdserve's own errors: InvalidRequestError for values the engine rejects,
WorkerUnreachableError when the worker cannot be reached (the pool then takes it out of routing),
WorkerFailedError for any other failure of the call.
"""
from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Any, AsyncIterator, Awaitable, Generator

from pdserve.base.types import DecodeChunk, PrefillResult, SamplingSpec


class WorkerCalls(ABC):
    """One way to reach workers; stateless per request."""

    name = ""

    @abstractmethod
    def prefill(self, worker: Any, engine_id: str, ids: list[int], spec: SamplingSpec,
                remote_decode: bool) -> Awaitable[PrefillResult]:
        """Start the prompt's prefill now; the answer may be awaited more than once (the
        dispatcher's cleanup awaits a late result after an abort). Leaving an await does not stop
        the prefill: ``abort`` does."""

    @abstractmethod
    def generate(self, worker: Any, engine_id: str, ids: list[int], spec: SamplingSpec) -> AsyncIterator[DecodeChunk]:
        """The whole request on this worker's engine, as deltas."""

    @abstractmethod
    def decode(self, worker: Any, engine_id: str, prompt: list[int], first: int, spec: SamplingSpec,
               kv_params: dict[str, Any] | None) -> AsyncIterator[DecodeChunk]:
        """The tokens after ``first``, with the prompt's KV loaded through ``kv_params`` (None:
        recomputed)."""

    @abstractmethod
    async def abort(self, worker: Any, engine_id: str) -> None:
        """Abort the request on the worker's engine if it is still there."""

    async def close(self) -> None:
        """Release connections (the router's stop, after its requests ended)."""


class Answer:
    """A unary call's answer, awaitable any number of times; leaving an await leaves it running
    (``WorkerCalls.prefill``'s contract). Wraps the call's task."""

    def __init__(self, task: asyncio.Future) -> None:
        self.task = task
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, even if never awaited

    def __await__(self) -> Generator[Any, None, PrefillResult]:
        return asyncio.shield(self.task).__await__()
