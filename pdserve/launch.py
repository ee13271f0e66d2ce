"""What ``pdserve serve`` and ``pdserve stop`` do: a deployment's lifecycle around its router.

``serve`` starts, or re-attaches to, the deployment's detached engines (``Cluster(detached=True)``),
runs the router until SIGTERM or SIGINT, drains it, and leaves the engines running. With
``replicas`` > 1 it also runs that many router processes in all, each attached to the same engines
and sharing the gRPC and HTTP ports (SO_REUSEPORT: the kernel spreads connections over them);
each routes with its own queue and policy state (README: Several routers). ``stop`` ends the
engines and the embedded Ray head.
"""
from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
import sys
import tempfile

import yaml

from pdserve.base import env
from pdserve.base.config import ServeConfig


def serve(cfg: ServeConfig, replicas: int = 1) -> int:
    """Run a deployment's router (and ``replicas - 1`` more) until a signal; returns 0."""
    if not (cfg.ray_address or env.ray_address()):
        env.apply(env.embedded_ray_env())  # before Ray is first imported: it reads them then
    from pdserve.cluster import Cluster

    cluster = Cluster(cfg, detached=True)
    children: list[subprocess.Popen] = []
    try:
        cluster.start()
        states = ", ".join(f"{n} (pid {pid}, {'re-attached' if n in cluster.attached else 'started'})"
                           for n, pid in cluster.pids().items())
        print(f"pdserve engines of {cfg.name!r}: {states}", flush=True)
        children = [_replica(cfg) for _ in range(replicas - 1)]
        if children:
            print(f"pdserve router replicas: pids {' '.join(str(c.pid) for c in children)}", flush=True)
        asyncio.run(_run_router(cfg, cluster))
    finally:
        _end(children, cfg.faults.drain_s + 10)
        cluster.detach()
        print(f"pdserve: the engines of {cfg.name!r} keep running (a new `pdserve serve` re-attaches); "
              f"`pdserve stop --name {cfg.name}` ends them", flush=True)
    return 0


def stop(cfg: ServeConfig) -> int:
    """End the deployment ``cfg.name``: its engines, and its embedded Ray head; returns 0."""
    if not (cfg.ray_address or env.ray_address()):
        env.apply(env.embedded_ray_env())
    from pdserve.cluster import Cluster

    cluster = Cluster.attach(cfg)
    if cluster is None:
        print(f"pdserve: no running deployment {cfg.name!r}")
        return 0
    names = [w.name for w in cluster.workers]
    cluster.stop()
    print(f"pdserve: stopped {cfg.name!r} ({', '.join(names) or 'no engines'})")
    return 0


def _replica(cfg: ServeConfig) -> subprocess.Popen:
    """One more router process with the same config (its metrics on a free port)."""
    data = dataclasses.asdict(dataclasses.replace(cfg, metrics_port=0 if cfg.metrics_port >= 0 else -1))
    with tempfile.NamedTemporaryFile("w", prefix="pdserve-replica-", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(data, f)
    return subprocess.Popen([sys.executable, "-m", "pdserve.cli", "serve", "--config", f.name])


def _end(children: list[subprocess.Popen], timeout_s: float) -> None:
    """SIGTERM the replicas (each drains) and wait for them, bounded; kill what remains."""
    for child in children:
        child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()


async def _run_router(cfg: ServeConfig, cluster: object) -> None:
    from router.server import RouterServer, ServiceSettings

    server = RouterServer(cluster.prefill, cluster.decode, cluster.model_info, ServiceSettings.from_config(cfg))
    port = await server.start(cfg.host, cfg.port, cfg.metrics_port)
    metrics = f", metrics on :{server.service.metrics_port}/metrics" if cfg.metrics_port >= 0 else ""
    http = f", OpenAI HTTP API on http://{cfg.host}:{server.http_port}/v1" if server.http_port >= 0 else ""
    shape = (f"{len(cluster.prefill)} prefill, {len(cluster.decode)} decode" if cfg.mode == "disaggregated"
             else f"{len(cluster.prefill)} {cfg.mode} engines")
    print(f"pdserve serving gRPC on {cfg.host}:{port} ({shape}{http}{metrics})", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    print(f"pdserve draining (up to {cfg.faults.drain_s:g} s)", flush=True)
    await server.stop(cfg.faults.drain_s)
