"""``Cluster``: starts Ray (embedded on loopback, or joins an existing cluster) and the two worker
pools as Ray actors, one engine each (one GPU each on GPU clusters, else one CPU core).

Two lifetimes. ``detached`` (``pdserve serve``): the engines are detached named actors in the
deployment's namespace, and the embedded Ray head runs in a process of its own
(``pdserve.ray_head``), so the engines outlive the router; ``start`` re-attaches to the ones
already running, ``detach`` leaves them running, and ``stop`` (``pdserve stop``) ends them and the
head. Otherwise (the test fixtures) everything belongs to this process and ``stop`` ends only what
``start`` created.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import ray

from pdserve import ray_head
from pdserve.base import env
from pdserve.base.config import ConfigError, KvTransferConfig, ServeConfig
from pdserve.base.types import ModelInfo
from pdserve.model import resolve_model
from pdserve.ray_head import HeadState

log = logging.getLogger("pdserve.cluster")
SPARE_WORKER_SLOTS = 4
"""Logical CPUs an embedded Ray keeps free for workers added after start-up."""


@dataclass(frozen=True)
class WorkerRef:
    """A live worker actor as the router sees it."""

    name: str
    role: str
    actor: Any


class Cluster:
    """The Ray side of a deployment."""

    def __init__(self, cfg: ServeConfig, ready_timeout_s: float = 600.0, detached: bool = False) -> None:
        self.cfg = cfg
        self.ready_timeout_s = ready_timeout_s
        self.detached = detached
        self.namespace = f"pdserve-{cfg.name}" if detached else None
        self.prefill: list[WorkerRef] = []
        self.decode: list[WorkerRef] = []
        self.model_info: ModelInfo | None = None
        self.attached: set[str] = set()
        """Workers found running at ``start`` and re-attached (detached mode)."""
        self.head: HeadState | None = None
        self._started_ray = False

    def start(self) -> None:
        """Start Ray if needed, create every worker and wait (bounded) until all engines are up."""
        model = resolve_model(self.cfg.engine.model)
        total = self.cfg.prefill.instances + self.cfg.decode.instances
        self._init_ray(total)
        gpu = self._use_gpu()
        from decode_worker.worker import DecodeWorker, FlexWorker
        from prefill_worker.worker import ColocatedWorker, PrefillWorker

        if self.cfg.mode in ("colocated", "adaptive"):  # the same engines, each serving both phases
            cls = ColocatedWorker if self.cfg.mode == "colocated" else FlexWorker
            for i in range(total):
                self.prefill.append(self._spawn(cls, f"engine-{i}", model, i, gpu, self.cfg.prefill.ray_resources))
            self._wait_ready(model)
            return
        for i in range(self.cfg.prefill.instances):
            self.prefill.append(self._spawn(PrefillWorker, f"prefill-{i}", model, i, gpu, self.cfg.prefill.ray_resources))
        for i in range(self.cfg.decode.instances):
            self.decode.append(self._spawn(DecodeWorker, f"decode-{i}", model, self.cfg.prefill.instances + i, gpu,
                                           self.cfg.decode.ray_resources))
        self._wait_ready(model)

    def _wait_ready(self, model: str) -> None:
        infos = ray.get([w.actor.info.remote() for w in self.workers], timeout=self.ready_timeout_s)
        stale = [w.name for w, info in zip(self.workers, infos) if w.name in self.attached and info.model != model]
        if stale:
            raise ConfigError(f"deployment {self.cfg.name!r} already runs {', '.join(stale)} with another model; "
                              f"`pdserve stop --name {self.cfg.name}` first")
        self.model_info = infos[0]
        log.info("cluster up (%s): %d prefill, %d decode, model %s, %d re-attached", self.cfg.mode,
                 len(self.prefill), len(self.decode), model, len(self.attached))

    def pids(self) -> dict[str, int]:
        """Each worker's process id (printed by ``pdserve serve``: operators and fault tests)."""
        return dict(zip((w.name for w in self.workers),
                        ray.get([w.actor.pid.remote() for w in self.workers], timeout=60)))

    def add_worker(self, role: str, wait: bool = True, kv: KvTransferConfig | None = None) -> WorkerRef:
        """Start one more worker of ``role`` (prefill, decode, colocated or flex) on the running
        cluster and add it to its pool (colocated and flex workers join ``prefill``); with ``wait``, return once its
        engine is up (bounded), else at once while it loads. ``kv`` overrides the deployment's KV
        settings for this worker (a prefill's transport and lease are its own)."""
        from decode_worker.worker import DecodeWorker, FlexWorker
        from prefill_worker.worker import ColocatedWorker, PrefillWorker

        cls = {"prefill": PrefillWorker, "decode": DecodeWorker, "colocated": ColocatedWorker, "flex": FlexWorker}[role]
        pool, cfg = (self.decode, self.cfg.decode) if role == "decode" else (self.prefill, self.cfg.prefill)
        taken = {w.name for w in self.workers}
        name = next(f"{role}-{i}" for i in range(len(taken) + 1) if f"{role}-{i}" not in taken)
        worker = self._spawn(cls, name, self.model_info.model, len(self.workers), self._use_gpu(), cfg.ray_resources, kv)
        if wait:
            try:
                ray.get(worker.actor.info.remote(), timeout=self.ready_timeout_s)
            except BaseException:
                ray.kill(worker.actor)
                raise
        pool.append(worker)
        return worker

    def remove_worker(self, name: str) -> None:
        """Shut one worker down and kill its actor; a worker that already died (or never
        started) is removed all the same."""
        worker = next(w for w in self.workers if w.name == name)
        try:
            ray.get(worker.actor.shutdown.remote(), timeout=30)
        except (ray.exceptions.RayError, TimeoutError) as err:
            log.warning("worker %s did not shut down cleanly (%s); killing it", name, type(err).__name__)
        finally:
            ray.kill(worker.actor)
            (self.decode if worker.role == "decode" else self.prefill).remove(worker)

    @property
    def workers(self) -> list[WorkerRef]:
        """All workers, prefill first."""
        return self.prefill + self.decode

    def _init_ray(self, total_workers: int) -> None:
        if ray.is_initialized():
            return
        address = self.cfg.ray_address or env.ray_address()
        if address:
            ray.init(address=address, namespace=self.namespace, log_to_driver=False)
        elif self.detached:  # the deployment's own head process: found running, or started now
            self.head = HeadState.read(self.cfg.name) or ray_head.start(self.cfg.name, self._logical_cpus(total_workers))
            ray.init(address=self.head.address, namespace=self.namespace, log_to_driver=False)
        else:
            if ray._private.ray_constants.ENABLE_RAY_CLUSTER:
                log.warning("Ray was imported before pdserve.base.env.embedded_ray_env() was applied: "
                            "the embedded Ray may bind a non-loopback interface")
            env.apply(env.embedded_ray_env())
            # Logical CPUs: one per worker plus room to add workers later (``add_worker``); the
            # workers pin themselves to real cores (worker_process_env).
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                     num_cpus=self._logical_cpus(total_workers), log_to_driver=False)
        self._started_ray = True

    @staticmethod
    def _logical_cpus(total_workers: int) -> int:
        return max(env.cpu_count(), total_workers) + SPARE_WORKER_SLOTS

    def _use_gpu(self) -> bool:
        device = self.cfg.engine.device
        if device == "auto":
            return ray.cluster_resources().get("GPU", 0) > 0
        return device == "gpu"

    def _spawn(self, cls: type, name: str, model: str, index: int, gpu: bool, resources: dict,
               kv: KvTransferConfig | None = None) -> WorkerRef:
        if self.detached and name in ray.util.list_named_actors():
            self.attached.add(name)
            return WorkerRef(name, cls.role, ray.get_actor(name))
        local = not (self.cfg.ray_address or env.ray_address())
        core = index % env.cpu_count() if local and not gpu else None
        env_vars = env.worker_process_env(core, self.cfg.engine.kv_cache_gib)
        if local:
            env_vars["VLLM_HOST_IP"] = "127.0.0.1"
        actor = ray.remote(cls).options(
            name=name, num_cpus=1, num_gpus=1 if gpu else 0, resources=dict(resources), max_concurrency=1000,
            max_restarts=self.cfg.faults.max_restarts, lifetime="detached" if self.detached else None,
            runtime_env={"env_vars": env_vars},
        ).remote(name, self.cfg.engine, model, kv or self.cfg.kv_transfer)
        return WorkerRef(name, cls.role, actor)

    def detach(self) -> None:
        """Leave the engines running and disconnect (a detached deployment's router exiting)."""
        self.prefill, self.decode = [], []
        if ray.is_initialized():
            ray.shutdown()

    @classmethod
    def attach(cls, cfg: ServeConfig) -> Cluster | None:
        """The running detached deployment ``cfg.name`` with its workers (for ``stop``), or None
        when no head of it runs and no Ray address is configured."""
        cluster = cls(cfg, detached=True)
        address = cfg.ray_address or env.ray_address()
        cluster.head = None if address else HeadState.read(cfg.name)
        if not (address or cluster.head):
            return None
        ray.init(address=address or cluster.head.address, namespace=cluster.namespace, log_to_driver=False)
        for name in ray.util.list_named_actors():
            pool = cluster.decode if name.startswith("decode-") else cluster.prefill
            pool.append(WorkerRef(name, name.split("-")[0], ray.get_actor(name)))
        return cluster

    def stop(self, timeout_s: float = 30.0) -> None:
        """Shut every engine down, kill the actors, and shut Ray down if this cluster started it
        (detached: end the deployment's head process too)."""
        refs = [w.actor.shutdown.remote() for w in self.workers]
        deadline = time.monotonic() + timeout_s
        try:
            ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
        except Exception:  # a dead actor cannot shut down: killing it below is enough
            log.warning("some workers did not shut down cleanly")
        for w in self.workers:
            ray.kill(w.actor)
        self.prefill, self.decode = [], []
        if self._started_ray or self.detached:
            ray.shutdown()
            self._started_ray = False
        if self.head is not None and not ray_head.stop(self.head):
            log.warning("the Ray head (pid %d) did not exit", self.head.pid)
