"""How the router makes its request calls on workers, by name (``routing.worker_calls``):
``tcp`` (the default: msgpack frames over plain TCP to each worker's ``TcpServer``), ``grpc``
(the same calls to each worker's direct gRPC server, ``protos/worker_v1``) or ``ray`` (Ray actor
calls). ``tcp`` and ``grpc`` call a worker that reports no server of theirs through Ray. Load polls, restarts and the other
control calls always go through Ray (``router.pools``)."""
from __future__ import annotations

from typing import Callable

from pdserve.base.types import LoadSnapshot
from router.calls.base import WorkerCalls
from router.calls.grpc_calls import GrpcCalls
from router.calls.ray_calls import RayCalls
from router.calls.tcp_calls import TcpCalls

_KINDS: dict[str, Callable[[Callable[[str], LoadSnapshot]], WorkerCalls]] = {
    "grpc": GrpcCalls, "tcp": TcpCalls, "ray": lambda snapshot: RayCalls()}
NAMES = tuple(_KINDS)

__all__ = ["NAMES", "WorkerCalls", "make_calls"]


def make_calls(name: str, snapshot: Callable[[str], LoadSnapshot]) -> WorkerCalls:
    """The calls registered as ``name``; ``snapshot(worker_name)`` gives a worker's last load
    snapshot (where its direct server is)."""
    if name not in _KINDS:
        raise ValueError(f"unknown worker calls {name!r}; known: {', '.join(NAMES)}")
    return _KINDS[name](snapshot)
