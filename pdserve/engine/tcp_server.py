"""``TcpServer``: a worker's request server for the router's ``tcp`` worker calls: the same four
methods as ``DirectServer`` (gRPC), as length-prefixed msgpack frames over plain TCP connections
(``pdserve.base.frames``). One asyncio stream per connection, on the actor's own event loop (the
engine's), with no gRPC poller thread to hand each message over: a call costs a third of a
gRPC round trip here (docs/performance.md, "Overheads").

Started with the direct server; its address travels in the worker's load snapshot
(``LoadSnapshot.tcp_endpoint``) and it requires the same token.
"""
from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Any, AsyncIterator

from pdserve.base import frames
from pdserve.base.types import DecodeChunk, SamplingSpec
from pdserve.engine.direct import describe_error

HELLO_TIMEOUT_S = 10.0
"""How long a new connection may take to present its token before it is closed."""


class TcpServer:
    """Serves ``worker``'s request methods (the Ray actor's own, as ``DirectServer`` does) to
    connections that present ``token``."""

    def __init__(self, worker: Any, host: str, token: str) -> None:
        self.worker, self.host, self.token = worker, host, token
        self.endpoint = ""
        """``host:port`` once ``start`` returned."""
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> str:
        """Bind a fresh port on ``host`` (no SO_REUSEPORT) and serve; returns the endpoint.
        Called once, on the actor's event loop."""
        self._server = await asyncio.start_server(self._connection, self.host, 0)
        self.endpoint = f"{self.host}:{self._server.sockets[0].getsockname()[1]}"
        return self.endpoint

    async def stop(self) -> None:
        """Stop accepting and end every connection (their calls are cancelled)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: the token, then calls one after another until the client closes."""
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            if await self._admitted(reader, writer):
                while await self._serve_call(reader, writer, await frames.read(reader)):
                    pass
        except (asyncio.IncompleteReadError, ConnectionError, frames.FrameError, asyncio.TimeoutError):
            pass  # the client left, broke the protocol or never presented a token: the connection ends
        finally:
            self._connections.discard(task)
            writer.close()

    async def _admitted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        hello = await asyncio.wait_for(frames.read(reader), HELLO_TIMEOUT_S)
        presented = hello.get("token", "") if isinstance(hello, dict) else ""
        if isinstance(presented, str) and secrets.compare_digest(presented.encode(), self.token.encode()):
            return True
        writer.write(frames.pack({"error": "denied", "message": "this worker's token is required"}))
        await writer.drain()
        return False

    async def _serve_call(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, call: Any) -> bool:
        """Answer one call; False when the client left during it (the call is then cancelled).

        The client sends nothing during a call, so a watch reads the connection meanwhile: data or
        EOF means the client left. The answer stops the watch before it writes its final frame,
        after which the client may send its next call on this connection."""
        watch = asyncio.ensure_future(reader.read(1))
        answer = asyncio.ensure_future(self._answer(call, writer, watch))
        try:
            await asyncio.wait((answer, watch), return_when=asyncio.FIRST_COMPLETED)
            if watch.done() and not watch.cancelled():
                answer.cancel()
            await asyncio.gather(answer, return_exceptions=True)
        finally:
            answer.cancel()
            watch.cancel()
            await asyncio.gather(answer, watch, return_exceptions=True)  # the reader is free again
        return watch.cancelled() and not answer.cancelled()

    async def _answer(self, call: Any, writer: asyncio.StreamWriter, watch: asyncio.Future) -> None:
        """Run the call, writing a stream's chunks as they come; once it ended, stop ``watch`` and
        write the final frame (nothing when the client left)."""
        try:
            final = await self._run(call, writer)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as err:
            kind, message = describe_error(err)
            final = {"error": "invalid" if isinstance(err, frames.FrameError) else kind, "message": message}
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        if watch.cancelled():
            writer.write(frames.pack(final))
            await writer.drain()

    async def _run(self, call: Any, writer: asyncio.StreamWriter) -> dict:
        """The call's final message; a stream's chunks are written on the way."""
        op = call.get("op") if isinstance(call, dict) else None
        if op not in ("decode", "generate"):
            return {"result": await self._unary(op, call)}
        async with contextlib.aclosing(self._stream(op, call)) as stream:  # closing aborts on the engine
            async for chunk in stream:
                writer.write(frames.pack({"chunk": [chunk.token_ids, chunk.text, chunk.finish_reason, chunk.kv]}))
                await writer.drain()
        return {"end": True}

    async def _unary(self, op: str | None, call: dict) -> Any:
        if op == "prefill":
            return await self.worker.prefill(call["engine_id"], call["ids"], _spec(call), bool(call["remote_decode"]), "")
        if op == "abort":
            return await self.worker.abort(call["engine_id"])
        raise frames.FrameError(f"unknown call {op!r}")

    def _stream(self, op: str, call: dict) -> AsyncIterator[DecodeChunk]:
        if op == "generate":
            return self.worker.generate(call["engine_id"], call["ids"], _spec(call))
        return self.worker.decode(call["engine_id"], call["ids"], call["first"], _spec(call), call.get("kv_params"))


def _spec(call: dict) -> SamplingSpec:
    return frames.convert(call["spec"], SamplingSpec)
