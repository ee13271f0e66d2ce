"""Shared fixtures: one real cluster (embedded Ray on loopback, 1 prefill + 1 decode vLLM engine on
the bundled model) for the whole session, and the real gRPC router in front of it."""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import pytest

from pdserve.base import env

env.apply(env.embedded_ray_env())  # before anything imports Ray

from pdserve.base.config import ServeConfig  # noqa: E402

SEED = 1234


@dataclass
class LiveRouter:
    """A RouterServer running on its own event-loop thread."""

    target: str
    server: Any
    loop: asyncio.AbstractEventLoop

    @property
    def http(self) -> str:
        """Base URL of the router's OpenAI-compatible HTTP API (when started with one)."""
        return f"http://127.0.0.1:{self.server.http_port}"

    def call(self, coro: Any, timeout_s: float = 60.0) -> Any:
        """Run a coroutine on the router's loop and wait (bounded) for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)


def start_router(workers_prefill: list, workers_decode: list, model_info: Any, metrics: bool = True,
                 http: bool = False, **settings: Any) -> LiveRouter:
    """Start a RouterServer on 127.0.0.1 (free ports; the HTTP API too with ``http``) in a daemon thread."""
    from router.server import RouterServer, ServiceSettings

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True, name="router-loop").start()
    settings.setdefault("http_port", 0 if http else -1)
    server = RouterServer(workers_prefill, workers_decode, model_info, ServiceSettings(**settings))
    port = asyncio.run_coroutine_threadsafe(server.start("127.0.0.1", 0, 0 if metrics else -1), loop).result(60)
    return LiveRouter(f"127.0.0.1:{port}", server, loop)


def stop_router(router: LiveRouter) -> None:
    """Stop the server and its loop."""
    router.call(router.server.stop(1.0))
    router.loop.call_soon_threadsafe(router.loop.stop)


@pytest.fixture(scope="session")
def cluster():
    """The session's cluster; engines start once (about 35 s here)."""
    from pdserve.cluster import Cluster

    cfg = ServeConfig(port=0)
    c = Cluster(cfg, ready_timeout_s=600)
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="session")
def router(cluster):
    """The real gRPC router in front of the session's cluster."""
    r = start_router(cluster.prefill, cluster.decode, cluster.model_info, http=True, request_timeout_s=120)
    yield r
    stop_router(r)


@pytest.fixture()
def client(router):
    """A sync gRPC client of the router."""
    from pdserve.client import PdServeClient

    c = PdServeClient(router.target)
    yield c
    c.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> bool:
    """Poll ``predicate`` until true or ``timeout_s`` passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
