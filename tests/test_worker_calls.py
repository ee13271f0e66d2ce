"""The router's direct worker calls (``router.calls.GrpcCalls``) against a real ``DirectServer`` on
loopback, whose worker is a fake at the process boundary (the Ray actor's request methods)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from pdserve.base.config import WORKER_CALLS
from pdserve.base.types import DecodeChunk, InvalidRequestError, LoadSnapshot, PrefillResult, SamplingSpec, WorkerError
from pdserve.engine.direct import DirectServer
from router.calls import NAMES, make_calls
from router.legs import WorkerFailedError, WorkerUnreachableError

SPEC = SamplingSpec(max_tokens=5, temperature=0.5, top_p=0.9, top_k=7, seed=None, stop=("\n",), ignore_eos=True)
KV = {"pdserve_kv": {"host": "127.0.0.1", "port": 5, "request_id": "r-1", "num_tokens": 3, "num_blocks": 1,
                     "block_size": 32, "secret": "s"}}
RESULT = PrefillResult(token_id=42, text="x", finish_reason=None, kv_params=KV, num_prompt_tokens=3,
                       num_cached_tokens=0, prefill_ms=1.5)
CHUNKS = [DecodeChunk((1, 2), "ab"), DecodeChunk((3,), "c", "length", {"tokens": 3, "bytes": 96})]


class FakeWorker:
    """The actor's request methods: records what reached it; ``fail`` makes every call raise it,
    ``hold`` keeps a decode stream open after its chunks."""

    def __init__(self) -> None:
        self.calls, self.fail, self.hold, self.closed = [], None, False, asyncio.Event()

    async def prefill(self, engine_id, ids, spec, remote_decode, fault):
        self.calls.append(("prefill", engine_id, ids, spec, remote_decode, fault))
        if self.fail:
            raise self.fail
        return RESULT

    async def decode(self, engine_id, ids, first, spec, kv_params):
        self.calls.append(("decode", engine_id, ids, first, spec, kv_params))
        try:
            for chunk in CHUNKS:
                if self.fail:
                    raise self.fail
                yield chunk
            if self.hold:
                await asyncio.sleep(3600)
        finally:
            self.closed.set()

    async def abort(self, engine_id):
        self.calls.append(("abort", engine_id))


class Setup:
    """A DirectServer over a FakeWorker, and GrpcCalls that see it in a worker's snapshot."""

    async def __aenter__(self):
        self.worker = FakeWorker()
        self.server = DirectServer(self.worker, "127.0.0.1")
        endpoint = await self.server.start()
        self.snap = LoadSnapshot("w", endpoint=endpoint, endpoint_token=self.server.token)
        self.calls = make_calls("grpc", lambda name: self.snap)
        self.ref = SimpleNamespace(name="w", actor=None)
        return self

    async def __aexit__(self, *exc):
        await self.calls.close()
        await self.server.stop()


def run(test):
    asyncio.run(asyncio.wait_for(test(), 30))


def test_the_registry_matches_the_config():
    assert set(NAMES) == set(WORKER_CALLS)
    with pytest.raises(ValueError, match="unknown worker calls"):
        make_calls("carrier-pigeon", lambda name: LoadSnapshot(name))


def test_a_prefill_crosses_exactly_and_can_be_awaited_again():
    async def test():
        async with Setup() as s:
            answer = s.calls.prefill(s.ref, "e-1", [5, 6, 7], SPEC, True)
            assert await answer == RESULT
            assert await answer == RESULT  # the dispatcher's cleanup awaits a late result again
            assert s.worker.calls == [("prefill", "e-1", [5, 6, 7], SPEC, True, "")]
    run(test)


def test_a_decode_streams_exactly():
    async def test():
        async with Setup() as s:
            got = [c async for c in s.calls.decode(s.ref, "e-2", [5, 6], 42, SPEC, KV)]
            assert got == CHUNKS
            assert s.worker.calls == [("decode", "e-2", [5, 6], 42, SPEC, KV)]
    run(test)


# (what the worker raises, what the router sees, its message after "w failed: ")
ERRORS = [(InvalidRequestError("prompt is empty"), InvalidRequestError, ""),
          (WorkerError("RuntimeError: engine dead"), WorkerFailedError, "RuntimeError: engine dead"),
          (RuntimeError("boom\nmore"), WorkerFailedError, "RuntimeError: boom")]


@pytest.mark.parametrize("raised,seen,message", ERRORS, ids=["invalid", "worker_error", "other"])
def test_errors_cross_as_pdserve_errors(raised, seen, message):
    async def test():
        async with Setup() as s:
            s.worker.fail = raised
            with pytest.raises(seen) as info:
                await s.calls.prefill(s.ref, "e-3", [1], SPEC, False)
            assert type(info.value) is seen
            assert str(info.value) == (str(raised) if seen is InvalidRequestError else f"w failed: {message}")
            with pytest.raises(seen):
                [c async for c in s.calls.decode(s.ref, "e-4", [1], 2, SPEC, None)]
    run(test)


def test_a_wrong_token_is_refused_and_a_gone_server_is_unreachable():
    async def test():
        async with Setup() as s:
            good = s.snap
            s.snap = LoadSnapshot("w", endpoint=good.endpoint, endpoint_token="0" * 32)
            with pytest.raises(WorkerFailedError, match="token"):
                await s.calls.prefill(s.ref, "e-5", [1], SPEC, False)
            assert s.worker.calls == []
            await s.server.stop()
            s.snap = good
            with pytest.raises(WorkerUnreachableError):
                await s.calls.prefill(s.ref, "e-6", [1], SPEC, False)
    run(test)


def test_leaving_a_stream_cancels_it_on_the_worker():
    """The dispatcher leaving a decode (a client cancel, a lost worker) ends the worker's stream."""
    async def test():
        async with Setup() as s:
            s.worker.hold = True
            stream = s.calls.decode(s.ref, "e-7", [1], 2, SPEC, None)
            assert await stream.__anext__() == CHUNKS[0]
            await stream.aclose()
            await asyncio.wait_for(s.worker.closed.wait(), 10)
    run(test)


def test_a_restarted_worker_is_called_at_its_new_endpoint():
    async def test():
        async with Setup() as s, Setup() as restarted:
            s.snap = restarted.snap
            assert await s.calls.prefill(s.ref, "e-8", [1], SPEC, False) == RESULT
            assert s.worker.calls == [] and len(restarted.worker.calls) == 1
    run(test)
