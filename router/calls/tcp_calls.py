"""``TcpCalls``: request calls to each worker's ``TcpServer`` (``pdserve.engine.tcp_server``):
length-prefixed msgpack frames over plain TCP (``pdserve.base.frames``), one call at a time per
connection, no gRPC. A worker whose load snapshot names no such server is called through Ray.

Connections are pooled per worker incarnation (its address and token, from its last load
snapshot): a call takes an idle one or opens one, and gives it back when it ended cleanly. A call
left early (a cancelled prefill, a decode stream closed by the dispatcher) closes its connection,
which cancels the call on the worker. A restarted worker reports a new address; the old pool is
closed.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

from pdserve.base import frames
from pdserve.base.types import DecodeChunk, InvalidRequestError, LoadSnapshot, PrefillResult, SamplingSpec
from router.calls.base import Answer, WorkerCalls
from router.calls.ray_calls import RayCalls
from router.legs import WorkerFailedError, WorkerUnreachableError

CONNECT_TIMEOUT_S = 10.0
"""Bound on opening a connection to a worker (an unreachable worker fails the call)."""
MAX_IDLE = 64
"""Idle connections kept per worker; more are closed when given back."""
_BROKEN = (asyncio.IncompleteReadError, OSError, frames.FrameError)  # ConnectionError is an OSError


class _Pool:
    """One worker incarnation's idle connections."""

    def __init__(self, key: str, endpoint: str, token: str) -> None:
        self.key, self.endpoint, self.token = key, endpoint, token
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.closed = False

    def close(self) -> None:
        """Close the idle connections; those of calls in flight close when their calls end."""
        self.closed = True
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


class TcpCalls(WorkerCalls):
    name = "tcp"

    def __init__(self, snapshot: Callable[[str], LoadSnapshot]) -> None:
        self._snapshot = snapshot
        self._ray = RayCalls()
        self._pools: dict[str, _Pool] = {}

    def prefill(self, worker: Any, engine_id: str, ids: list[int], spec: SamplingSpec,
                remote_decode: bool) -> Any:
        pool = self._pool(worker.name)
        if pool is None:
            return self._ray.prefill(worker, engine_id, ids, spec, remote_decode)
        call = {"op": "prefill", "engine_id": engine_id, "ids": ids, "spec": spec, "remote_decode": remote_decode}
        return Answer(asyncio.ensure_future(self._prefill(worker.name, pool, call)))

    def generate(self, worker: Any, engine_id: str, ids: list[int], spec: SamplingSpec) -> AsyncIterator[DecodeChunk]:
        pool = self._pool(worker.name)
        if pool is None:
            return self._ray.generate(worker, engine_id, ids, spec)
        return self._stream(worker.name, pool, {"op": "generate", "engine_id": engine_id, "ids": ids, "spec": spec})

    def decode(self, worker: Any, engine_id: str, prompt: list[int], first: int, spec: SamplingSpec,
               kv_params: dict[str, Any] | None) -> AsyncIterator[DecodeChunk]:
        pool = self._pool(worker.name)
        if pool is None:
            return self._ray.decode(worker, engine_id, prompt, first, spec, kv_params)
        call = {"op": "decode", "engine_id": engine_id, "ids": prompt, "first": first, "spec": spec,
                "kv_params": kv_params}
        return self._stream(worker.name, pool, call)

    async def abort(self, worker: Any, engine_id: str) -> None:
        pool = self._pool(worker.name)
        if pool is None:
            return await self._ray.abort(worker, engine_id)
        await self._unary(worker.name, pool, {"op": "abort", "engine_id": engine_id})

    async def close(self) -> None:
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()

    def _pool(self, name: str) -> _Pool | None:
        """The pool of the worker's current incarnation; None without a server."""
        snap = self._snapshot(name)
        if not snap.tcp_endpoint:
            return None
        key = f"{snap.tcp_endpoint}/{snap.endpoint_token}"
        pool = self._pools.get(name)
        if pool is None or pool.key != key:
            if pool is not None:
                pool.close()  # calls in flight on the old incarnation keep their own connections
            pool = self._pools[name] = _Pool(key, snap.tcp_endpoint, snap.endpoint_token)
        return pool

    async def _prefill(self, name: str, pool: _Pool, call: dict) -> PrefillResult:
        try:
            return frames.convert(await self._unary(name, pool, call), PrefillResult)
        except frames.FrameError as err:
            raise WorkerFailedError(f"{name} failed: an answer that breaks the protocol ({err})") from None

    async def _unary(self, name: str, pool: _Pool, call: dict) -> Any:
        reader, writer = await _checkout(name, pool)
        clean = False
        try:
            writer.write(frames.pack(call))
            reply = await frames.read(reader)
            clean = True
        except _BROKEN as err:
            raise _unreachable(name, err) from None
        finally:
            _checkin(pool, reader, writer, clean)
        return _result(name, reply)

    async def _stream(self, name: str, pool: _Pool, call: dict) -> AsyncIterator[DecodeChunk]:
        """A streaming call's chunks; closing the iteration early closes the connection, which
        cancels the call on the worker."""
        reader, writer = await _checkout(name, pool)
        clean = False
        try:
            writer.write(frames.pack(call))
            while True:
                reply = await frames.read(reader)
                if not (isinstance(reply, dict) and "chunk" in reply):
                    clean = True
                    _result(name, reply)  # raises for an error or an answer that breaks the protocol
                    return
                yield _chunk(name, reply["chunk"])
        except _BROKEN as err:
            raise _unreachable(name, err) from None
        finally:
            _checkin(pool, reader, writer, clean)


async def _checkout(name: str, pool: _Pool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An idle connection of ``pool``, or a new one that has presented the token."""
    while pool.idle:
        reader, writer = pool.idle.pop()
        if not reader.at_eof() and not writer.is_closing():
            return reader, writer
        writer.close()
    host, _, port = pool.endpoint.rpartition(":")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), CONNECT_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError) as err:
        raise _unreachable(name, err) from None
    writer.write(frames.pack({"token": pool.token}))  # goes out with the first call
    return reader, writer


def _checkin(pool: _Pool, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, clean: bool) -> None:
    if clean and not pool.closed and len(pool.idle) < MAX_IDLE and not writer.is_closing():
        pool.idle.append((reader, writer))
    else:
        writer.close()


def _chunk(name: str, chunk: Any) -> DecodeChunk:
    try:
        ids, text, finish_reason, kv = chunk
        return frames.convert({"token_ids": ids, "text": text, "finish_reason": finish_reason, "kv": kv or {}},
                              DecodeChunk)
    except (TypeError, ValueError, frames.FrameError) as err:
        raise WorkerFailedError(f"{name} failed: a chunk that breaks the protocol ({err})") from None


def _result(name: str, reply: Any) -> Any:
    """A reply's result; raises pdserve's error for an error reply."""
    if not isinstance(reply, dict) or ("result" not in reply and "end" not in reply and "error" not in reply):
        raise WorkerFailedError(f"{name} failed: an answer that breaks the protocol")
    if "error" in reply:
        message = str(reply.get("message", ""))
        if reply["error"] == "invalid":
            raise InvalidRequestError(message)
        raise WorkerFailedError(f"{name} failed: {message}")
    return reply.get("result")


def _unreachable(name: str, err: BaseException) -> WorkerUnreachableError:
    return WorkerUnreachableError(f"{name} is unavailable: {type(err).__name__}: {err}".splitlines()[0])
