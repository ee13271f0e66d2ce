"""``EngineWorker``: what the prefill and decode Ray actors share.

The actor hosts one ``EngineHost``; the engine is built in ``__init__`` (vLLM imported there, so
the driver and the router never import it). The router polls and manages it through Ray actor
handles, and makes its request calls through the worker's ``DirectServer`` (gRPC, no Ray hop), or
through Ray when configured so.
"""
from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import replace
from typing import Any, AsyncIterator, Awaitable

import ray

from pdserve.base.config import EngineConfig, KvTransferConfig
from pdserve.base.procs import signal_tree
from pdserve.base.types import InvalidRequestError, LoadSnapshot, ModelInfo, PromptInput, WorkerError
from pdserve.engine.direct import DirectServer
from pdserve.engine.tcp_server import TcpServer


class EngineWorker:
    """Base of the worker actors; subclasses set ``role`` and add their request methods."""

    role = ""

    def __init__(self, name: str, engine: EngineConfig, model: str, kv: KvTransferConfig) -> None:
        from pdserve.engine.host import EngineHost

        kv_host = ray.util.get_node_ip_address()
        connector: dict[str, Any] = {"host": kv_host, "transport": kv.transport, "lease_s": kv.lease_s,
                                     "load_timeout_s": kv.load_timeout_s, "chunk_blocks": kv.chunk_blocks,
                                     "idle_wait_ms": kv.idle_wait_ms}
        self.name = name
        self.host = EngineHost(engine, model, self.role, connector)
        self.direct = DirectServer(self, kv_host)
        self.tcp = TcpServer(self, kv_host, self.direct.token)
        self._servers_started: asyncio.Future | None = None

    async def info(self) -> ModelInfo:
        """What this worker serves (also the readiness probe: returns once the engine is up and
        the request servers serve)."""
        await self._start_servers()
        return self.host.info

    async def load(self) -> LoadSnapshot:
        """The engine's latest load, with the request servers' addresses and token (polled by the
        router)."""
        endpoint, tcp_endpoint = await self._start_servers()
        return replace(self.host.load(self.name), endpoint=endpoint, endpoint_token=self.direct.token,
                       tcp_endpoint=tcp_endpoint)

    async def _start_servers(self) -> list[str]:
        """The request servers' endpoints (gRPC, TCP), started on the first call (the actor's loop
        runs by then)."""
        if self._servers_started is None:
            self._servers_started = asyncio.gather(self.direct.start(), self.tcp.start())
        return await asyncio.shield(self._servers_started)

    async def pid(self) -> int:
        """This worker's process id (operators, and the fault-injection tests that kill it)."""
        return os.getpid()

    async def external_hits(self) -> tuple[int, int]:
        """Cumulative (queried, loaded) prompt tokens of this engine's KV connector."""
        return self.host.stats.external_hits()

    async def tokenize(self, prompt: PromptInput) -> list[int]:
        """Prompt token ids; raises InvalidRequestError for an empty or too-long prompt. Runs on a
        thread, so a long prompt never blocks this actor's event loop (or its load reports)."""
        return await own_errors(asyncio.to_thread(self.host.tokenize, prompt))

    async def reset_prefix_cache(self) -> bool:
        """Drop the engine's cached prefix blocks (operators after a model change; tests that
        need a cold cache). False if blocks are in use."""
        return await self.host.engine.reset_prefix_cache()

    async def abort(self, request_id: str) -> None:
        """Abort a request on this engine if it is still there."""
        await self.host.abort(request_id)

    def shutdown(self) -> None:
        """Stop the engine (called before the actor is killed)."""
        self.host.shutdown()

    async def terminate(self) -> None:
        """End this worker at once, so Ray starts a fresh one (``faults.max_restarts``): first its
        engine processes (SIGKILL reaches even a stopped or hung one), then this process. Called by
        the router's progress watchdog on a stalled engine; the call never returns."""
        signal_tree(os.getpid(), signal.SIGKILL, include_root=False)
        os._exit(1)


async def own_errors(call: Awaitable[Any]) -> Any:
    """Await ``call``; an engine's exception becomes pdserve's own type: InvalidRequestError for a
    value the engine rejects (a ValueError), WorkerError otherwise."""
    try:
        return await call
    except Exception as err:
        raise _own(err) from None


async def own_errors_stream(stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """``own_errors`` for a streaming call."""
    try:
        async for item in stream:
            yield item
    except Exception as err:
        raise _own(err) from None


def _own(err: Exception) -> Exception:
    """pdserve's own exception for ``err`` (one line, no vLLM or torch type inside)."""
    if isinstance(err, InvalidRequestError):
        return err
    line = f"{type(err).__name__}: {err}".splitlines()[0][:500]
    return InvalidRequestError(line) if isinstance(err, ValueError) else WorkerError(line)
