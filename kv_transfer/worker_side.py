"""The connector's worker side: runs in the model-worker process that owns the KV tensors.

Producer: serves held blocks (the gRPC control server, plus the configured transport's own server)
and reports them to vLLM as sent once released or expired. Consumer: pulls, with the transport the
handle names, into freshly allocated blocks on a thread pool (the blocks belong to a request
parked in WAITING_FOR_REMOTE_KVS, so no forward pass touches them), then reports the request as
received, or as failed so that vLLM recomputes its prompt. A request aborted while its pull waits
or runs has the pull cancelled.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

from kv_transfer import control, grpc_server, transports
from kv_transfer.handle import LoadReport
from kv_transfer.layout import KvLayout, KvLayoutError
from kv_transfer.leases import HeldKv, PullGate
from kv_transfer.messages import ConnectorSettings, LoadSpec, PdserveConnectorMeta, PdserveWorkerMeta, ServedPorts

log = logging.getLogger("pdserve.kv")
PULL_THREADS = 8
"""Pulls a decode engine runs at once (each is bounded by ``load_timeout_s``)."""


class WorkerSide:
    """Holds, serves and pulls KV blocks for one engine's model worker."""

    def __init__(self, settings: ConnectorSettings, num_blocks: int, is_producer: bool) -> None:
        self._settings, self._num_blocks, self._is_producer = settings, num_blocks, is_producer
        self._held = HeldKv(settings.lease_s)
        self._layout: KvLayout | None = None
        self._served: ServedPorts | None = None
        self._stops: list = []
        self._rank = 0
        self._pool = ThreadPoolExecutor(max_workers=PULL_THREADS, thread_name_prefix="pdserve-kv-pull")
        self._lock = threading.Lock()
        self._cancels: dict[str, threading.Event] = {}
        self._received: set[str] = set()
        self._failed: set[str] = set()
        self._reports: dict[str, LoadReport] = {}
        self._idle_step = False

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Index the KV tensors; a producer starts this rank's KV servers here, on ports the OS
        picks (never a port chosen earlier and taken meanwhile), which ``served_ports`` reports
        for the handles: a pull always reaches the rank holding its shard."""
        rank, size = _tp_rank_size()
        self._rank = rank
        self._layout = KvLayout(kv_caches, self._num_blocks, f"{self._settings.model}|tp {rank}/{size}")
        if self._is_producer:
            self._served = self._serve()

    def served_ports(self) -> ServedPorts | None:
        """This rank's bound KV ports (a producer's, once ``register_kv_caches`` ran), else None."""
        return self._served

    def _serve(self) -> ServedPorts:
        s, layout = self._settings, self._layout
        gate = PullGate(self._held, layout.fingerprint)
        control_server, control_port = grpc_server.start_server(gate, layout, s.host, s.chunk_blocks)
        self._stops.append(lambda: control_server.stop(grace=0))
        serving = transports.get(s.transport).serve(transports.ServeContext(gate, layout, s.host, s.chunk_blocks))
        if serving is not None:
            self._stops.append(serving.stop)
        served = ServedPorts(control_port, serving.port if serving else 0)
        log.info("KV server on %s:%d, transport %s%s (%d layers, %d bytes/block)", s.host, control_port, s.transport,
                 f" on port {served.data_port}" if served.data_port else "", layout.num_layers, layout.block_bytes())
        return served

    def start_step(self, meta: PdserveConnectorMeta) -> None:
        """Take this step's holds, cancels and pulls (called every engine step)."""
        self._idle_step = meta.idle
        for send in meta.sends:
            self._held.hold(send.request_id, send.block_ids, send.fault, send.secret)
        with self._lock:
            for load in meta.loads:
                self._cancels.setdefault(load.request_id, threading.Event())
            for rid in meta.cancels:
                if rid in self._cancels:
                    self._cancels[rid].set()
        for load in meta.loads:
            self._pool.submit(self._load, load)

    def _load(self, spec: LoadSpec) -> None:
        start = time.perf_counter()
        report, acked = LoadReport(), False
        if spec.local_block_ids:
            report, acked = self._pull(spec)
            log.debug("KV load %s: %s", spec.request_id, report)
        if not acked:
            control.release(spec.handle, self._rank)
        with self._lock:
            self._cancels.pop(spec.request_id, None)
        if not spec.local_block_ids:
            return
        report = LoadReport(report.tokens, report.bytes, (time.perf_counter() - start) * 1e3, report.failed)
        with self._lock:
            self._received.add(spec.request_id)
            if report.failed:
                self._failed.add(spec.request_id)
            self._reports[spec.request_id] = report
        self._held.ended.set()

    def _pull(self, spec: LoadSpec) -> tuple[LoadReport, bool]:
        """The load's report, and whether the transport already released the sender's hold."""
        with self._lock:
            cancelled = self._cancels.setdefault(spec.request_id, threading.Event())
        try:
            transport = transports.get(spec.handle.transport)
            job = transports.PullJob(self._layout, spec.handle, spec.first_block, spec.local_block_ids,
                                     self._settings.load_timeout_s, self._rank, cancelled)
            job.raise_if_cancelled()
            nbytes = transport.pull(job)
            self._layout.synchronize()  # a GPU cache's copies in are complete before "done"
        except (transports.KvTransferError, KvLayoutError) as err:
            log.log(logging.INFO if cancelled.is_set() else logging.WARNING, "KV load of %s failed, recomputing: %s",
                    spec.request_id, err)
            return LoadReport(failed=str(err)), False
        except Exception as err:  # never leave the request parked: report it failed
            log.exception("KV load of %s failed unexpectedly", spec.request_id)
            return LoadReport(failed=f"{type(err).__name__}: {err}"), False
        return LoadReport(tokens=spec.num_tokens, bytes=nbytes), transport.acks_release

    def transfer_results(self) -> KVConnectorTransferResults:
        """Sends finished (released or expired) and pulls finished (ok or failed) since last call.

        In a step with no forward pass, while pulls run or blocks are held, first waits up to
        ``idle_wait_ms`` for one of them to end: vLLM re-steps such an engine every millisecond,
        and those steps (with their stats messages) took a third of this machine's two cores
        away from the transfers they wait for (docs/performance.md, "Overheads")."""
        self._wait_if_idle()
        with self._lock:
            received, failed = self._received, self._failed
            self._received, self._failed = set(), set()
        return KVConnectorTransferResults(finished_sending=self._held.take_finished(),
                                          finished_recving=received, failed_recving=failed)

    def _wait_if_idle(self) -> None:
        ended = self._held.ended
        if self._idle_step and self._settings.idle_wait_ms > 0 and (len(self._held) or self._cancels):
            ended.wait(self._settings.idle_wait_ms / 1e3)
        ended.clear()

    def take_reports(self) -> PdserveWorkerMeta | None:
        """Reports of pulls that ended since the last call, for the scheduler side."""
        with self._lock:
            reports, self._reports = self._reports, {}
        return PdserveWorkerMeta(reports) if reports else None

    def shutdown(self) -> None:
        """Stop the KV servers and the pull threads."""
        for stop in self._stops:
            stop()
        with self._lock:
            for event in self._cancels.values():
                event.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _tp_rank_size() -> tuple[int, int]:
    """This worker's tensor-parallel rank and world size (0, 1 before vLLM's groups exist)."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (AssertionError, RuntimeError, ImportError):
        return 0, 1
