"""The connector's worker side: runs in the model-worker process that owns the KV tensors.

Producer: serves held blocks over gRPC (``transport.start_server``) and reports them to vLLM as
sent once released or expired. Consumer: pulls into freshly allocated blocks on a small thread
pool (the blocks belong to a request parked in WAITING_FOR_REMOTE_KVS, so no forward pass touches
them), then reports the request as received, or as failed so that vLLM recomputes its prompt.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

from kv_transfer import transport
from kv_transfer.handle import LoadReport
from kv_transfer.layout import KvLayout, KvLayoutError
from kv_transfer.messages import ConnectorSettings, LoadSpec, PdserveConnectorMeta, PdserveWorkerMeta

log = logging.getLogger("pdserve.kv")


class WorkerSide:
    """Holds, serves and pulls KV blocks for one engine's model worker."""

    def __init__(self, settings: ConnectorSettings, num_blocks: int, is_producer: bool) -> None:
        self._settings, self._num_blocks, self._is_producer = settings, num_blocks, is_producer
        self._held = transport.HeldKv(settings.lease_s)
        self._layout: KvLayout | None = None
        self._server = None
        self._rank = 0
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pdserve-kv-pull")
        self._lock = threading.Lock()
        self._received: set[str] = set()
        self._failed: set[str] = set()
        self._reports: dict[str, LoadReport] = {}

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Index the KV tensors; a producer starts its KV server here, one port per tensor-parallel
        rank (the handle's port + rank), so a pull always reaches the rank holding its shard."""
        rank, size = _tp_rank_size()
        self._rank = rank
        self._layout = KvLayout(kv_caches, self._num_blocks, f"{self._settings.model}|tp {rank}/{size}")
        if self._is_producer:
            s = self._settings
            self._server = transport.start_server(self._held, self._layout, s.host, s.port + rank, s.chunk_blocks)
            log.info("KV server on %s:%d (%d layers, %d bytes/block)", s.host, s.port + rank,
                     self._layout.num_layers, self._layout.block_bytes())

    def start_step(self, meta: PdserveConnectorMeta) -> None:
        """Take this step's holds and start its pulls (called every engine step)."""
        for send in meta.sends:
            self._held.hold(send.request_id, send.block_ids, send.fault, send.secret)
        for load in meta.loads:
            self._pool.submit(self._load, load)

    def _load(self, spec: LoadSpec) -> None:
        start = time.perf_counter()
        report = LoadReport()
        if spec.local_block_ids:
            report = self._pull(spec)
            log.debug("KV load %s: %s", spec.request_id, report)
        h = spec.handle
        transport.release(h.host, h.port + self._rank, h.request_id, secret=h.secret)
        if not spec.local_block_ids:
            return
        report = LoadReport(report.tokens, report.bytes, (time.perf_counter() - start) * 1e3, report.failed)
        with self._lock:
            self._received.add(spec.request_id)
            if report.failed:
                self._failed.add(spec.request_id)
            self._reports[spec.request_id] = report

    def _pull(self, spec: LoadSpec) -> LoadReport:
        h = spec.handle
        try:
            nbytes = transport.pull(self._layout, h.host, h.port + self._rank, h.request_id, spec.first_block,
                                    spec.local_block_ids, self._settings.load_timeout_s, h.secret)
        except (transport.KvTransferError, KvLayoutError) as err:
            log.warning("KV load of %s failed, recomputing: %s", spec.request_id, err)
            return LoadReport(failed=str(err))
        except Exception as err:  # never leave the request parked: report it failed
            log.exception("KV load of %s failed unexpectedly", spec.request_id)
            return LoadReport(failed=f"{type(err).__name__}: {err}")
        return LoadReport(tokens=spec.num_tokens, bytes=nbytes)

    def transfer_results(self) -> KVConnectorTransferResults:
        """Sends finished (released or expired) and pulls finished (ok or failed) since last call."""
        with self._lock:
            received, failed = self._received, self._failed
            self._received, self._failed = set(), set()
        return KVConnectorTransferResults(finished_sending=self._held.take_finished(),
                                          finished_recving=received, failed_recving=failed)

    def take_reports(self) -> PdserveWorkerMeta | None:
        """Reports of pulls that ended since the last call, for the scheduler side."""
        with self._lock:
            reports, self._reports = self._reports, {}
        return PdserveWorkerMeta(reports) if reports else None

    def shutdown(self) -> None:
        """Stop the KV server and the pull threads."""
        if self._server is not None:
            self._server.stop(grace=0)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _tp_rank_size() -> tuple[int, int]:
    """This worker's tensor-parallel rank and world size (0, 1 before vLLM's groups exist)."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (AssertionError, RuntimeError, ImportError):
        return 0, 1
