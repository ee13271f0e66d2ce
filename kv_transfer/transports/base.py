"""The ``KvTransport`` interface: how a decode instance's connector moves held KV blocks from a
prefill instance into its own. One implementation per module, chosen by name (the handle carries
the sender's, from ``kv_transfer.transport`` in the config); callers use ``transports.get``.

Every transport shares the same lease registry (``leases.HeldKv``), the same checks before the
first byte (``leases.PullGate``: fingerprint, hold, secret, range), the gRPC control channel for
release and renewal (``kv_transfer.control``), and the same contract for ``pull``: bounded by
``timeout_s``, stopped early by ``cancelled``, raising ``KvTransferError`` on any failure.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar

from kv_transfer.handle import KvHandle

if TYPE_CHECKING:
    from kv_transfer.layout import KvLayout
    from kv_transfer.leases import PullGate


class KvTransferError(RuntimeError):
    """A pull failed: unreachable sender, refused, checksum mismatch, missing bytes, cancelled."""


@dataclass(frozen=True)
class PullJob:
    """One pull: the sender's blocks ``first_block..`` of ``handle`` into ``local_block_ids``."""

    layout: KvLayout
    handle: KvHandle
    first_block: int
    local_block_ids: list[int]
    timeout_s: float
    rank: int = 0
    """This worker's tensor-parallel rank: it pulls the same rank's shard (that rank's ports)."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when the request was aborted: the pull stops at its next piece."""

    def raise_if_cancelled(self) -> None:
        """KvTransferError once the request was aborted (transports call it between pieces)."""
        if self.cancelled.is_set():
            raise KvTransferError("cancelled: the request was aborted")


@dataclass(frozen=True)
class ServeContext:
    """What a transport's server needs on the prefill side."""

    gate: PullGate
    layout: KvLayout
    host: str
    chunk_blocks: int = 64
    port: int = 0
    """The port to bind; 0 (the engines' choice): one the OS picks, reported in ``Serving``."""


@dataclass(frozen=True)
class Serving:
    """A transport's own running server (prefill side)."""

    port: int
    """The port it bound."""
    stop: Callable[[], None]


class KvTransport(ABC):
    """A way to move held KV blocks between two engines' KV tensors."""

    name: ClassVar[str]
    acks_release: ClassVar[bool] = False
    """True when a successful ``pull`` already released the sender's hold (no Release call)."""

    @abstractmethod
    def serve(self, ctx: ServeContext) -> Serving | None:
        """Start serving ``ctx.gate``'s holds (prefill side, once per rank); return the running
        server, or None when the gRPC control server already serves this transport."""

    @abstractmethod
    def pull(self, job: PullJob) -> int:
        """Copy the job's blocks into its local blocks; return the bytes received. On failure the
        local blocks may hold partial data: the caller must report the load failed."""
