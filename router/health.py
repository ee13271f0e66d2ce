"""The standard gRPC dialects on the router's port: ``grpc.health.v1.Health`` and server reflection.

Health is driven by the same truth as ``pdserve health`` (``PdServe/Health``): a pool can make
progress when at least one of its instances answered its last load poll. Services:

- ``""`` (overall) and ``pdserve.v1.PdServe``: SERVING only when every pool can make progress
  (readiness: Kubernetes' ``grpc:`` probe with no service, ``grpc_health_probe``, Envoy);
- ``pdserve.prefill``, ``pdserve.decode`` (or ``pdserve.colocated``): one per pool;
- ``pdserve.router``: SERVING while the router's event loop answers (liveness: restarting the
  router cannot revive a dead pool, so liveness does not depend on the pools).

``Watch`` streams every change. The router's poller calls ``update`` after each load poll.
"""
from __future__ import annotations

from typing import Any, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import pdserve_v1_pb2 as pb

API_SERVICE = pb.DESCRIPTOR.services_by_name["PdServe"].full_name
ROUTER_SERVICE = "pdserve.router"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def pools_status(pools: Sequence[Any]) -> tuple[bool, str]:
    """Whether every pool has a live instance, and a one-line detail saying which do not."""
    missing = [p.role for p in pools if not p.live()]
    if missing:
        return False, f"no live instance in pool(s): {', '.join(missing)}"
    return True, "all pools have a live instance"


def pool_service(role: str) -> str:
    """The health service name of a pool (``pdserve.prefill``, ...)."""
    return f"pdserve.{role}"


class HealthReporter:
    """Owns the standard health servicer and sets its statuses from the pools."""

    def __init__(self, pools: Sequence[Any]) -> None:
        self.pools = pools
        self.servicer = health.aio.HealthServicer()

    def add_to(self, server: grpc.aio.Server, reflect: bool) -> None:
        """Register the health service (and, with ``reflect``, server reflection) on ``server``."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        if reflect:
            names = (API_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, server)

    async def update(self) -> None:
        """Set every service's status from the pools' latest snapshots."""
        for pool in self.pools:
            await self.servicer.set(pool_service(pool.role), SERVING if pool.live() else NOT_SERVING)
        ready, _ = pools_status(self.pools)
        for service in ("", API_SERVICE):
            await self.servicer.set(service, SERVING if ready else NOT_SERVING)
        await self.servicer.set(ROUTER_SERVICE, SERVING)

    async def shutdown(self) -> None:
        """Report NOT_SERVING everywhere from now on (graceful stop)."""
        await self.servicer.enter_graceful_shutdown()
