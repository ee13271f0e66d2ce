"""Messages between the connector's scheduler side and worker side, and its settings."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorHandshakeMetadata, KVConnectorMetadata,
                                                              KVConnectorWorkerMetadata)

from kv_transfer.handle import KvHandle, LoadReport


@dataclass(frozen=True)
class ConnectorSettings:
    """Read from ``kv_connector_extra_config`` (written by the worker actor from the config)."""

    host: str = "127.0.0.1"
    """Address this engine's KV servers bind and advertise (producer; each binds a port the OS
    picks, published to the scheduler side by vLLM's connector handshake)."""
    transport: str = "tcp"
    """The transport this engine serves its KV on (producer; ``kv_transfer.transports``)."""
    lease_s: float = 60.0
    """Free held blocks after this long without a release."""
    load_timeout_s: float = 30.0
    """Bound on one pull (consumer)."""
    chunk_blocks: int = 64
    """Blocks per streamed chunk."""
    model: str = ""
    """The served model (part of the KV layout fingerprint)."""
    idle_wait_ms: float = 5.0
    """An engine step that runs no forward, while pulls run or blocks are held, waits up to this
    long for one of them to end before reporting (0: report at once)."""

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> ConnectorSettings:
        """Pick this class's keys out of vLLM's extra config dict."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (extra or {}).items() if k in names})


@dataclass(frozen=True)
class ServedPorts(KVConnectorHandshakeMetadata):
    """One producer rank's bound KV ports, sent by its worker side to the scheduler side (vLLM's
    connector handshake, once at engine start) so the handles it issues name them."""

    control_port: int
    data_port: int = 0
    """0 when the transport has no server of its own."""


@dataclass(frozen=True)
class SendSpec:
    """Hold these blocks of a finished prefill for a decode instance to pull."""

    request_id: str
    block_ids: list[int]
    fault: str = ""
    secret: str = ""
    """The transfer's secret; pulls and releases must carry it."""


@dataclass(frozen=True)
class LoadSpec:
    """Pull a handle's blocks from ``first_block`` on into ``local_block_ids``.

    No local blocks means nothing to load: only release the sender's blocks.
    """

    request_id: str
    handle: KvHandle
    first_block: int
    local_block_ids: list[int]
    num_tokens: int


@dataclass
class PdserveConnectorMeta(KVConnectorMetadata):
    """Scheduler side -> worker side, once per engine step."""

    sends: list[SendSpec] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    """Requests aborted while their pull is queued or running: stop it, free their blocks."""
    idle: bool = False
    """This step schedules no tokens: no forward pass runs."""


@dataclass
class PdserveWorkerMeta(KVConnectorWorkerMetadata):
    """Worker side -> scheduler side: reports of pulls that ended this step."""

    reports: dict[str, LoadReport] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        """Merge the reports of several workers (one per tensor-parallel rank)."""
        assert isinstance(other, PdserveWorkerMeta)
        return PdserveWorkerMeta({**self.reports, **other.reports})
