"""The KV handle: where a finished prefill's KV is held, as it travels between the pieces.

The prefill engine's connector returns it (as a dict, vLLM's ``kv_transfer_params``); the router
passes it to the chosen decode instance, and to ``release`` when a request ends before decode.
Pure data: imported by the router, so no torch or vLLM here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Keys the router sets on the request going to a prefill engine.
DO_REMOTE_DECODE = "do_remote_decode"
FAULT = "pdserve_fault"
"""Test-only fault injection (``"corrupt"``); set by tests through the worker actor, never by
the public API."""


@dataclass(frozen=True)
class KvHandle:
    """The prefill instance's KV for one request, ready to pull."""

    host: str
    """Address of the prefill instance's KV servers."""
    ports: tuple[int, ...]
    """The gRPC control server's port (release, renew, and the ``grpc`` transport's pulls) of each
    tensor-parallel rank of the prefill engine; rank r holds its KV shard behind ``ports[r]``."""
    request_id: str
    """The prefill engine's internal id of the request (the KV server's key)."""
    num_tokens: int
    """Prompt tokens whose KV is held (the decode loads at most this many)."""
    num_blocks: int
    block_size: int
    secret: str = ""
    """The per-transfer secret: the KV server answers only calls that carry it."""
    transport: str = "grpc"
    """The transport that carries the bytes (``kv_transfer.transports``)."""
    data_ports: tuple[int, ...] = ()
    """Each rank's port of the transport's own server, when it has one (``tcp``, ``gloo``)."""

    @property
    def tp_size(self) -> int:
        """Tensor-parallel ranks of the prefill engine."""
        return len(self.ports)

    def control_port(self, rank: int) -> int:
        """Rank ``rank``'s control server port."""
        return self.ports[rank]

    def data_port(self, rank: int) -> int:
        """Rank ``rank``'s port of the transport's own server."""
        return self.data_ports[rank]

    def to_params(self) -> dict[str, Any]:
        """The dict form carried in vLLM's ``kv_transfer_params``."""
        return {"pdserve_kv": asdict(self)}

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> KvHandle | None:
        """Parse ``kv_transfer_params``; None when they hold no pdserve handle."""
        if not params or "pdserve_kv" not in params:
            return None
        fields = dict(params["pdserve_kv"])
        return cls(**{**fields, "ports": tuple(fields["ports"]), "data_ports": tuple(fields.get("data_ports", ()))})


@dataclass(frozen=True)
class LoadReport:
    """What a decode instance's KV load did, returned in its final output."""

    tokens: int = 0
    """Prompt tokens loaded from the prefill instance (0 when the load failed)."""
    bytes: int = 0
    ms: float = 0.0
    failed: str = ""
    """Empty on success, else a one-line reason (the prompt was then recomputed)."""

    def to_params(self) -> dict[str, Any]:
        """The dict form carried back in the decode output's ``kv_transfer_params``."""
        return {"pdserve_load": asdict(self)}

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> LoadReport | None:
        """Parse a decode output's ``kv_transfer_params``; None when absent."""
        if not params or "pdserve_load" not in params:
            return None
        return cls(**params["pdserve_load"])
