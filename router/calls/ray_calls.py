"""``RayCalls``: request calls as Ray actor calls (``routing.worker_calls: ray``, and the fallback
for a worker without a direct server)."""
from __future__ import annotations

from typing import Any, AsyncIterator, Generator

import ray

from pdserve.base.types import DecodeChunk, InvalidRequestError, PrefillResult, SamplingSpec
from router.calls.base import WorkerCalls
from router.legs import WorkerFailedError, WorkerUnreachableError


class RayCalls(WorkerCalls):
    name = "ray"

    def prefill(self, worker: Any, engine_id: str, ids: list[int], spec: SamplingSpec,
                remote_decode: bool) -> RayAnswer:
        return RayAnswer(worker.name, worker.actor.prefill.remote(engine_id, ids, spec, remote_decode))

    def generate(self, worker: Any, engine_id: str, ids: list[int], spec: SamplingSpec) -> AsyncIterator[DecodeChunk]:
        return _items(worker.name, worker.actor.generate.options(num_returns="streaming").remote(engine_id, ids, spec))

    def decode(self, worker: Any, engine_id: str, prompt: list[int], first: int, spec: SamplingSpec,
               kv_params: dict[str, Any] | None) -> AsyncIterator[DecodeChunk]:
        stream = worker.actor.decode.options(num_returns="streaming").remote(engine_id, prompt, first, spec, kv_params)
        return _items(worker.name, stream)

    async def abort(self, worker: Any, engine_id: str) -> None:
        await RayAnswer(worker.name, worker.actor.abort.remote(engine_id))


class RayAnswer:
    """An ObjectRef awaited with its errors as pdserve's own; awaitable any number of times."""

    def __init__(self, name: str, ref: Any) -> None:
        self.name, self.ref = name, ref

    def __await__(self) -> Generator[Any, None, PrefillResult]:
        return _own(self.name, self.ref).__await__()


async def _own(name: str, ref: Any) -> Any:
    try:
        return await ref
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, InvalidRequestError):
            raise InvalidRequestError(str(cause)) from None
        raise WorkerFailedError(f"{name} failed: {cause or err}".splitlines()[0]) from None
    except ray.exceptions.RayError as err:
        raise WorkerUnreachableError(f"{name} is unavailable: {type(err).__name__}") from None


async def _items(name: str, stream: Any) -> AsyncIterator[Any]:
    """The items of a streaming actor call."""
    while True:
        try:
            ref = await _own(name, stream.__anext__())
        except StopAsyncIteration:
            return
        yield await _own(name, ref)
