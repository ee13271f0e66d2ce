"""``PdserveConnector``: the vLLM KV connector that moves a prefill's KV to a decode engine.

Loaded by vLLM through ``kv_transfer_config.kv_connector_module_path = "kv_transfer.connector"``;
vLLM builds one instance per role and calls the hooks below. Each call is delegated to
``SchedulerSide`` (engine-core process) or ``WorkerSide`` (model-worker process).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    KVConnectorWorkerMetadata,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kv_transfer.messages import ConnectorSettings, PdserveConnectorMeta
from kv_transfer.scheduler_side import SchedulerSide
from kv_transfer.worker_side import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class PdserveConnector(KVConnectorBase_V1):
    """Pull-based KV transfer (see the package docstring for the design)."""

    _cache_hit_source = CacheHitSource.P2P

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        settings = ConnectorSettings.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        producer = self._kv_transfer_config.is_kv_producer
        self._sched: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._sched = SchedulerSide(settings, vllm_config.cache_config.block_size, producer)
        else:
            self._worker = WorkerSide(settings, kv_cache_config.num_blocks, producer)

    # ---- worker side -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Take this step's holds, cancels and pulls here, before the forward pass (vLLM calls
        ``start_load_kv`` after it when every load is asynchronous, which would delay each pull
        and each hold by one forward)."""
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, PdserveConnectorMeta)
        self._worker.start_step(connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Nothing left to start: ``bind_connector_metadata`` started this step's work."""

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing to wait for: loads are asynchronous and finish before the request runs."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Nothing to push: decode instances pull held blocks after the prefill finished."""

    def wait_for_save(self) -> None:
        """Nothing to wait for (pull design)."""

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        return self._worker.transfer_results()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self._worker.transfer_results()
        return results.finished_sending, results.finished_recving

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self._worker.take_reports()

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        """This rank's bound KV ports; vLLM hands every rank's to ``set_xfer_handshake_metadata``."""
        return self._worker.served_ports()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    # ---- scheduler side ----------------------------------------------------------------------
    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        self._sched.set_served_ports(metadata)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._sched.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._sched.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._sched.request_finished(request, block_ids)
