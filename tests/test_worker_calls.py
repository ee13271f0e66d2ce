"""The router's direct worker calls (``router.calls``: ``grpc`` and ``tcp``) against a worker's real
request servers (``DirectServer``, ``TcpServer``) on loopback, whose worker is a fake at the
process boundary (the Ray actor's request methods). Every test runs for both kinds."""
from __future__ import annotations

import asyncio
from dataclasses import asdict, replace
from types import SimpleNamespace

import pytest

from pdserve.base import frames
from pdserve.base.config import WORKER_CALLS
from pdserve.base.types import DecodeChunk, InvalidRequestError, LoadSnapshot, PrefillResult, SamplingSpec, WorkerError
from pdserve.engine.direct import DirectServer
from pdserve.engine.tcp_server import TcpServer
from router.calls import NAMES, make_calls
from router.legs import WorkerFailedError, WorkerUnreachableError

SPEC = SamplingSpec(max_tokens=5, temperature=0.5, top_p=0.9, top_k=7, seed=None, stop=("\n",), ignore_eos=True)
KV = {"pdserve_kv": {"host": "127.0.0.1", "ports": [5], "request_id": "r-1", "num_tokens": 3, "num_blocks": 1,
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
    """A FakeWorker's request servers, and the ``kind`` of calls that see them in a worker's snapshot."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    async def __aenter__(self):
        self.worker = FakeWorker()
        self.direct = DirectServer(self.worker, "127.0.0.1")
        self.tcp = TcpServer(self.worker, "127.0.0.1", self.direct.token)
        self.snap = LoadSnapshot("w", endpoint=await self.direct.start(), endpoint_token=self.direct.token,
                                 tcp_endpoint=await self.tcp.start())
        self.calls = make_calls(self.kind, lambda name: self.snap)
        self.ref = SimpleNamespace(name="w", actor=None)
        return self

    async def stop_servers(self):
        await self.direct.stop()
        await self.tcp.stop()

    async def __aexit__(self, *exc):
        await self.calls.close()
        await self.stop_servers()


KINDS = ["grpc", "tcp"]


def run(test):
    asyncio.run(asyncio.wait_for(test(), 30))


def test_the_registry_matches_the_config():
    assert set(NAMES) == set(WORKER_CALLS)
    with pytest.raises(ValueError, match="unknown worker calls"):
        make_calls("carrier-pigeon", lambda name: LoadSnapshot(name))


@pytest.mark.parametrize("kind", KINDS)
def test_a_prefill_crosses_exactly_and_can_be_awaited_again(kind):
    async def test():
        async with Setup(kind) as s:
            answer = s.calls.prefill(s.ref, "e-1", [5, 6, 7], SPEC, True)
            assert await answer == RESULT
            assert await answer == RESULT  # the dispatcher's cleanup awaits a late result again
            assert s.worker.calls == [("prefill", "e-1", [5, 6, 7], SPEC, True, "")]
    run(test)


@pytest.mark.parametrize("kind", KINDS)
def test_a_decode_streams_exactly(kind):
    async def test():
        async with Setup(kind) as s:
            got = [c async for c in s.calls.decode(s.ref, "e-2", [5, 6], 42, SPEC, KV)]
            assert got == CHUNKS
            assert s.worker.calls == [("decode", "e-2", [5, 6], 42, SPEC, KV)]
    run(test)


# (what the worker raises, what the router sees, its message after "w failed: ")
ERRORS = [(InvalidRequestError("prompt is empty"), InvalidRequestError, ""),
          (WorkerError("RuntimeError: engine dead"), WorkerFailedError, "RuntimeError: engine dead"),
          (RuntimeError("boom\nmore"), WorkerFailedError, "RuntimeError: boom")]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("raised,seen,message", ERRORS, ids=["invalid", "worker_error", "other"])
def test_errors_cross_as_pdserve_errors(kind, raised, seen, message):
    async def test():
        async with Setup(kind) as s:
            s.worker.fail = raised
            with pytest.raises(seen) as info:
                await s.calls.prefill(s.ref, "e-3", [1], SPEC, False)
            assert type(info.value) is seen
            assert str(info.value) == (str(raised) if seen is InvalidRequestError else f"w failed: {message}")
            with pytest.raises(seen):
                [c async for c in s.calls.decode(s.ref, "e-4", [1], 2, SPEC, None)]
    run(test)


@pytest.mark.parametrize("kind", KINDS)
def test_a_wrong_token_is_refused_and_a_gone_server_is_unreachable(kind):
    async def test():
        async with Setup(kind) as s:
            good = s.snap
            s.snap = replace(good, endpoint_token="0" * 32)
            with pytest.raises(WorkerFailedError, match="token"):
                await s.calls.prefill(s.ref, "e-5", [1], SPEC, False)
            assert s.worker.calls == []
            await s.stop_servers()
            s.snap = good
            with pytest.raises(WorkerUnreachableError):
                await s.calls.prefill(s.ref, "e-6", [1], SPEC, False)
    run(test)


@pytest.mark.parametrize("kind", KINDS)
def test_leaving_a_stream_cancels_it_on_the_worker(kind):
    """The dispatcher leaving a decode (a client cancel, a lost worker) ends the worker's stream."""
    async def test():
        async with Setup(kind) as s:
            s.worker.hold = True
            stream = s.calls.decode(s.ref, "e-7", [1], 2, SPEC, None)
            assert await stream.__anext__() == CHUNKS[0]
            await stream.aclose()
            await asyncio.wait_for(s.worker.closed.wait(), 10)
    run(test)


@pytest.mark.parametrize("kind", KINDS)
def test_a_restarted_worker_is_called_at_its_new_endpoint(kind):
    async def test():
        async with Setup(kind) as s, Setup(kind) as restarted:
            s.snap = restarted.snap
            assert await s.calls.prefill(s.ref, "e-8", [1], SPEC, False) == RESULT
            assert s.worker.calls == [] and len(restarted.worker.calls) == 1
    run(test)


TOKEN = object()  # stands for the server's own token
# (frames the raw client sends, the answer it reads: an error kind, or None for a closed connection)
RAW = [([{"op": "abort", "engine_id": "e"}], "denied"),
       ([{"token": "0" * 32}, {"op": "abort", "engine_id": "e"}], "denied"),
       ([{"token": TOKEN}, {"op": "teleport"}], "invalid"),
       ([{"token": TOKEN}, {"op": "prefill", "engine_id": "e", "ids": [1], "spec": {"max_tokens": "x"},
                            "remote_decode": False}], "invalid"),
       ([{"token": TOKEN}, b"\xc1"], None),
       ([{"token": TOKEN}, frames.MAX_FRAME + 1], None)]


@pytest.mark.parametrize("sent,answer", RAW, ids=["no-token", "wrong-token", "unknown-op", "bad-spec", "not-msgpack",
                                                  "too-large"])
def test_the_tcp_server_answers_bad_input_with_a_status_or_a_closed_connection(sent, answer):
    """Whatever a connection sends, the server answers with a clear error kind or ends that
    connection, never reaches the engine, and goes on serving the router's calls."""
    async def test():
        async with Setup("tcp") as s:
            host, _, port = s.snap.tcp_endpoint.rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            for frame in sent:
                if isinstance(frame, bytes):
                    writer.write(len(frame).to_bytes(4, "little") + frame)
                elif isinstance(frame, int):
                    writer.write(frame.to_bytes(4, "little"))
                else:
                    writer.write(frames.pack({"token": s.direct.token} if frame.get("token") is TOKEN else frame))
            if answer is None:
                assert await reader.read() == b""
            else:
                assert (await frames.read(reader))["error"] == answer
            writer.close()
            assert s.worker.calls == []
            assert await s.calls.prefill(s.ref, "e-9", [1], SPEC, False) == RESULT
    run(test)


class InstantClient:
    """A connection's writing side whose client sends its next call the moment a frame reaches it
    (fed straight into the server's reader, before the server's loop turns again)."""

    def __init__(self, reader: asyncio.StreamReader, next_call: dict) -> None:
        self.reader, self.next_call, self.written = reader, next_call, []

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self.reader.feed_data(frames.pack(self.next_call))

    async def drain(self) -> None:
        pass


def test_a_call_sent_right_after_an_answer_is_read_whole_as_the_next_call():
    """The router may send its next call on a connection as soon as the last answer arrived. The
    server watches the connection during a call (data or EOF there means the client left); it
    must have stopped watching before the answer goes out, or the watch takes the first byte of
    the next call and the connection is dropped (seen under load before the fix)."""
    async def test():
        server = TcpServer(FakeWorker(), "127.0.0.1", "t" * 32)
        reader = asyncio.StreamReader()
        writer = InstantClient(reader, {"op": "abort", "engine_id": "next"})
        call = {"op": "prefill", "engine_id": "e", "ids": [1], "spec": asdict(SPEC), "remote_decode": False}
        assert await server._serve_call(reader, writer, call) is True
        assert len(writer.written) == 1
        assert await frames.read(reader) == {"op": "abort", "engine_id": "next"}
    run(test)


# (the call, the answer a broken worker sends)
BROKEN = [("prefill", {"result": {"token_id": "x"}}), ("prefill", ["result"]), ("decode", {"chunk": [1]}),
          ("decode", {"chunk": [["a"], "t", None, {}]}), ("decode", {"what": True}), ("decode", 7)]


@pytest.mark.parametrize("op,answer", BROKEN, ids=["bad-result", "not-a-map", "short-chunk", "bad-ids", "unknown",
                                                   "stream-not-a-map"])
def test_an_answer_that_breaks_the_protocol_is_a_worker_failure(op, answer):
    """Whatever a worker's server answers, the router sees one of pdserve's errors."""
    async def test():
        async def broken(reader, writer):
            await frames.read(reader)  # the token
            await frames.read(reader)  # the call
            writer.write(frames.pack(answer))
            await writer.drain()

        server = await asyncio.start_server(broken, "127.0.0.1", 0)
        snap = LoadSnapshot("w", endpoint_token="t", tcp_endpoint=f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
        calls, ref = make_calls("tcp", lambda name: snap), SimpleNamespace(name="w", actor=None)
        try:
            with pytest.raises(WorkerFailedError, match="w failed"):
                if op == "prefill":
                    await calls.prefill(ref, "e", [1], SPEC, False)
                else:
                    [c async for c in calls.decode(ref, "e", [1], 2, SPEC, None)]
        finally:
            await calls.close()
            server.close()
    run(test)
