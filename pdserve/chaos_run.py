"""The ``pdserve chaos`` run: the schedule of faults over a load, and the fault-free run beside it
(the pieces are in ``pdserve.chaos``)."""
from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from pdserve.base import config as config_mod
from pdserve.base.net import free_port
from pdserve.base.procs import process_tree, signal_pids, signal_tree
from pdserve.chaos import ALL_FAULTS, WORKER_FAULTS, Fault, LoadClient, Run, ServeProcess, prompts, summary, write
from pdserve.client import PdServeClient

TAIL_S = 10.0
"""Load continues this long after the last fault ended, so recovery is seen under load."""
SLOT = {"decode": 0.10, "prefill": 0.30, "stall": 0.35, "corrupt": 0.45, "blackhole": 0.55, "router": 0.75}
"""Each fault's earliest time, as a fraction of the load's duration (it also waits for the
deployment to recover from the previous fault)."""


@dataclass(frozen=True)
class ChaosPlan:
    """What ``pdserve chaos`` runs."""

    config: str = "deploy/local.yaml"
    prefill: int = 2
    decode: int = 2
    duration_s: float = 120.0
    rate: float = 1.0
    faults: tuple[str, ...] = ALL_FAULTS
    baseline: bool = True
    blackhole_s: float = 8.0
    stall_s: float = 0.0
    """Set by ``run`` from the config's ``faults.progress_timeout_s``: a stalled engine is replaced
    after it."""
    timeout_s: float = 120.0
    seed: int = 0


def _deployment() -> str:
    """The name of this chaos process's deployment."""
    return f"chaos-{os.getpid()}"


def run(plan: ChaosPlan, out: Path) -> dict:
    """Start a deployment, run the fault-free load (``plan.baseline``) and the chaos load, stop it;
    write and return the report."""
    plan = replace(plan, stall_s=config_mod.load(plan.config).faults.progress_timeout_s)
    name, port = _deployment(), free_port()
    log = out.with_suffix(".serve.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    serve = ServeProcess(["--config", plan.config, "--name", name, "--prefill", str(plan.prefill), "--decode",
                          str(plan.decode), "--port", str(port), "--http-port", "-1", "--metrics-port", "-1"], log)
    report: dict = {"plan": {**plan.__dict__, "faults": list(plan.faults)}}
    try:
        engines = serve.start()
        target = f"127.0.0.1:{port}"
        if plan.baseline:
            report["fault_free"] = summary(asyncio.run(_load(plan, target, serve, engines, faults=())))
        report["chaos"] = summary(asyncio.run(_load(plan, target, serve, engines, faults=plan.faults)))
    finally:
        serve.terminate()
        from pdserve import launch

        launch.stop(config_mod.load(plan.config, {"name": name}))
    write(out, report)
    return report


async def _load(plan: ChaosPlan, target: str, serve: ServeProcess, engines: dict[str, int],
                faults: tuple[str, ...]) -> Run:
    """Poisson load for ``plan.duration_s`` and until ``TAIL_S`` after the last fault ended, while
    ``_inject`` runs the faults; then wait for every answer and for the engines to be idle."""
    router_down = asyncio.Event()
    client = LoadClient(target, plan.timeout_s, router_down)
    result, t0 = Run(), time.monotonic()
    injector = asyncio.create_task(_inject(plan, target, serve, engines, faults, client, result, t0))
    rng, sends, faults_done = random.Random(plan.seed), [], None
    while True:
        now = time.monotonic() - t0
        if injector.done() and faults_done is None:
            faults_done = now
        if now >= plan.duration_s and faults_done is not None and now >= faults_done + TAIL_S:
            break
        sends.append(asyncio.create_task(client.one(prompts(1, plan.seed * 100_003 + len(sends))[0], t0)))
        await asyncio.sleep(rng.expovariate(plan.rate))
    result.outcomes = list(await asyncio.gather(*sends))
    result.duration_s = time.monotonic() - t0
    await injector
    result.idle_after_s = await _idle(target, 90.0)
    await client.channel.close()
    return result


async def _inject(plan: ChaosPlan, target: str, serve: ServeProcess, engines: dict[str, int],
                  faults: tuple[str, ...], client: LoadClient, result: Run, t0: float) -> None:
    """Run the faults in order, each at its slot and after the previous one recovered."""
    for kind in sorted(faults, key=SLOT.__getitem__):
        await asyncio.sleep(max(0.0, t0 + SLOT[kind] * plan.duration_s - time.monotonic()))
        fault = Fault(kind, time.monotonic() - t0)
        result.faults.append(fault)
        killed = await _apply(kind, fault, plan, target, serve, engines, client)
        fault.until = max(fault.until, fault.at)
        if killed:  # the router sees the killed (or stalled) engine down before it can see it back
            seen = await _poll(target, 15.0 + plan.stall_s, lambda i: i.name != killed or not i.alive)
            if seen is None:
                fault.detail += "; the router never took it out of routing"
                continue
            fault.detail += f"; out of routing {time.monotonic() - t0 - fault.at:.1f} s after the fault"
        if kind == "stall":
            fault.until = time.monotonic() - t0
        if kind in WORKER_FAULTS and await _poll(target, 300.0, lambda i: i.alive) is not None:
            fault.recovered_s = time.monotonic() - t0 - fault.until


async def _apply(kind: str, fault: Fault, plan: ChaosPlan, target: str, serve: ServeProcess,
                 engines: dict[str, int], client: LoadClient) -> str:
    """Inject ``kind``; the name of the engine it killed ("" when none)."""
    victim = ""
    if kind in ("decode", "prefill"):
        victim = sorted(n for n in engines if n.startswith(kind))[-1]
        signal_tree(engines[victim], signal.SIGKILL)
        fault.detail = f"SIGKILL {victim} (pid {engines[victim]}) and its engine processes; Ray restarts it"
    elif kind == "stall":
        victim = sorted(n for n in engines if n.startswith("decode"))[0]
        stopped = process_tree(engines[victim])[1:]
        signal_tree(engines[victim], signal.SIGSTOP, include_root=False)
        # SIGCONT them later, should the watchdog not have ended them
        asyncio.get_running_loop().call_later(plan.stall_s + 15.0, signal_pids, stopped, signal.SIGCONT)
        fault.detail = (f"SIGSTOP {victim}'s engine processes (its actor still answers load polls): the "
                        "progress watchdog replaces it")
    elif kind == "blackhole":
        victim = sorted(n for n in engines if n.startswith("prefill"))[0]
        signal_tree(engines[victim], signal.SIGSTOP)
        await asyncio.sleep(plan.blackhole_s)
        signal_tree(engines[victim], signal.SIGCONT)
        fault.until = fault.at + plan.blackhole_s
        fault.detail = f"SIGSTOP {victim}'s process tree for {plan.blackhole_s:g} s (engine and KV server silent)"
        victim = ""
    elif kind == "corrupt":
        fault.detail = await asyncio.to_thread(_corrupt_one, plan, target)
    elif kind == "router":
        client.router_down.set()
        serve.kill()
        start = time.monotonic()
        await asyncio.to_thread(serve.start, 300.0)
        fault.recovered_s = time.monotonic() - start
        fault.detail = "SIGKILL the router process, start it again (it re-attaches)"
        await asyncio.sleep(2.0)
        client.router_down.clear()
    return victim


def _corrupt_one(plan: ChaosPlan, target: str) -> str:
    """One request through the deployment's engines with a KV transfer whose bytes are flipped on
    the wire (the prefill worker's test fault): the decode must detect it and recompute."""
    from pdserve.base import env

    env.apply(env.embedded_ray_env())  # before Ray is first imported: it reads them then
    import ray

    from pdserve.cluster import Cluster
    from pdserve.base.types import SamplingSpec

    cfg = config_mod.load(plan.config, {"name": _deployment()})
    cluster = Cluster.attach(cfg)
    try:
        prefill, decode = cluster.prefill[0].actor, cluster.decode[0].actor
        ids, spec = prompts(1, plan.seed + 1)[0], SamplingSpec(max_tokens=8, ignore_eos=True)
        first = ray.get(prefill.prefill.remote("chaos-corrupt", ids, spec, True, "corrupt"), timeout=120)
        tokens, report = 1, {}
        for ref in decode.decode.options(num_returns="streaming").remote("chaos-corrupt", ids, first.token_id, spec,
                                                                          first.kv_params):
            chunk = ray.get(ref, timeout=120)
            tokens, report = tokens + len(chunk.token_ids), chunk.kv or report
        return f"corrupted transfer: load failed ({report.get('failed', '')[:60]}), recomputed, {tokens}/8 tokens"
    finally:
        ray.shutdown()


async def _idle(target: str, timeout_s: float) -> float | None:
    """Seconds until every instance is alive, runs nothing and holds no KV."""
    return await _poll(target, timeout_s, lambda i: i.alive and not i.waiting and not i.running
                       and i.kv_cache_usage == 0.0)


async def _poll(target: str, timeout_s: float, good) -> float | None:
    """Seconds until ``good`` holds for every instance the router reports (None: not in bound)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            info = await asyncio.to_thread(_info, target)
            if all(good(i) for p in info.pools for i in p.instances):
                return time.monotonic() - start
        except grpc.RpcError:
            pass
        await asyncio.sleep(0.5)
    return None


def _info(target: str):
    client = PdServeClient(target)
    try:
        return client.info(5.0)
    finally:
        client.close()
