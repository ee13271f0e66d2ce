"""The connector's scheduler side: runs in the engine-core process beside vLLM's scheduler.

Producer (prefill engine): when a request marked ``do_remote_decode`` finishes its one token,
keep its blocks (delay-free), tell the worker side to hold them, and return a ``KvHandle``.
Consumer (decode engine): for a request carrying a handle, claim the held prompt tokens as an
asynchronous external load, tell the worker side which local blocks to pull into, and return the
worker's ``LoadReport`` in the request's final output.
"""
from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from vllm.v1.request import RequestStatus

from kv_transfer.handle import DO_REMOTE_DECODE, FAULT, KvHandle, LoadReport
from kv_transfer.messages import (ConnectorSettings, LoadSpec, PdserveConnectorMeta, PdserveWorkerMeta, SendSpec,
                                  ServedPorts)

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class SchedulerSide:
    """State kept between the scheduler's connector calls (single-threaded by vLLM)."""

    def __init__(self, settings: ConnectorSettings, block_size: int, is_producer: bool) -> None:
        self._settings, self._block_size, self._is_producer = settings, block_size, is_producer
        self._served: dict[int, ServedPorts] = {}
        self._sends: list[SendSpec] = []
        self._loads: list[LoadSpec] = []
        self._cancels: list[str] = []
        self._claimed: set[str] = set()   # handle already used: never load twice (preemption)
        self._loading: set[str] = set()   # pull in flight: blocks must outlive an abort
        self._reports: dict[str, LoadReport] = {}

    def set_served_ports(self, served: dict[int, ServedPorts]) -> None:
        """Each producer rank's bound KV ports (vLLM's connector handshake, at engine start, before
        any request): the handles this side issues name them."""
        self._served = dict(served)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens loadable from the request's handle beyond the local hit; async when > 0."""
        handle = KvHandle.from_params(request.kv_transfer_params)
        if handle is None or request.request_id in self._claimed:
            return 0, False
        count = _loadable_tokens(handle, request) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """Plan the pull into the blocks vLLM just allocated (or a release when nothing loads)."""
        handle = KvHandle.from_params(request.kv_transfer_params)
        if handle is None or request.request_id in self._claimed:
            return
        self._claimed.add(request.request_id)
        if num_external_tokens == 0:
            self._loads.append(LoadSpec(request.request_id, handle, 0, [], 0))
            return
        end = _loadable_tokens(handle, request)
        first_block = (end - num_external_tokens) // self._block_size
        last_block = -(-end // self._block_size)
        local = blocks.get_block_ids()[0][first_block:last_block]
        self._loading.add(request.request_id)
        self._loads.append(LoadSpec(request.request_id, handle, first_block, local, num_external_tokens))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> PdserveConnectorMeta:
        """Hand this step's holds and pulls to the worker side."""
        meta = PdserveConnectorMeta(sends=self._sends, loads=self._loads, cancels=self._cancels,
                                    idle=scheduler_output.total_num_scheduled_tokens == 0)
        self._sends, self._loads, self._cancels = [], [], []
        return meta

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        """Record finished pulls and their reports."""
        self._loading.difference_update(output.finished_recving or ())
        if isinstance(output.kv_connector_worker_meta, PdserveWorkerMeta):
            self._reports.update(output.kv_connector_worker_meta.reports)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Producer: hold and hand out a KvHandle. Consumer: return the load report."""
        rid = request.request_id
        handle = KvHandle.from_params(request.kv_transfer_params)
        if handle is not None:
            return self._finish_consumer(request, handle)
        params = request.kv_transfer_params or {}
        if not (self._is_producer and params.get(DO_REMOTE_DECODE) and block_ids
                and request.status == RequestStatus.FINISHED_LENGTH_CAPPED):
            return False, None
        secret = secrets.token_hex(16)
        self._sends.append(SendSpec(rid, list(block_ids), str(params.get(FAULT, "")), secret))
        num_tokens = min(request.num_computed_tokens, request.num_prompt_tokens)
        held = KvHandle(self._settings.host, self._ports("control_port"), rid, num_tokens, len(block_ids),
                        self._block_size, secret, self._settings.transport, self._ports("data_port"))
        return True, held.to_params()

    def _ports(self, kind: str) -> tuple[int, ...]:
        if not self._served:
            raise RuntimeError("no KV server ports: vLLM did not pass the connector handshake")
        return tuple(getattr(self._served[rank], kind) for rank in sorted(self._served))

    def _finish_consumer(self, request: Request, handle: KvHandle) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        if rid not in self._claimed:  # ended before it was scheduled: free the sender's blocks
            self._loads.append(LoadSpec(rid, handle, 0, [], 0))
        self._claimed.discard(rid)
        report = self._reports.pop(rid, None)
        loading = rid in self._loading
        if loading:  # it ended (aborted) before its pull did: stop the pull, free its blocks soon
            self._cancels.append(rid)
        return loading, (report.to_params() if report else None)


def _loadable_tokens(handle: KvHandle, request: Request) -> int:
    # The decode prompt is the original prompt plus the first token; at least one token must be
    # computed locally, so at most num_tokens - 1 come from outside.
    return min(handle.num_tokens, request.num_tokens - 1)
