"""KV transports by name: ``grpc`` (the control server's Pull stream), ``tcp`` (the fast default:
large frames, no copies beyond the kernel's, one xxh3 per transfer) and ``gloo`` (torch.distributed
point to point; the NCCL path on GPUs). Modules are imported on first use."""
from __future__ import annotations

import importlib

from kv_transfer.transports.base import KvTransferError, KvTransport, PullJob, ServeContext, Serving

_MODULES = {"grpc": "kv_transfer.transports.grpc_stream", "tcp": "kv_transfer.transports.tcp",
            "gloo": "kv_transfer.transports.gloo"}
NAMES = tuple(_MODULES)
_instances: dict[str, KvTransport] = {}

__all__ = ["NAMES", "KvTransferError", "KvTransport", "PullJob", "ServeContext", "Serving", "get"]


def get(name: str) -> KvTransport:
    """The transport registered as ``name`` (one shared instance per process)."""
    if name not in _MODULES:
        raise KvTransferError(f"unknown KV transport {name!r} (known: {', '.join(NAMES)})")
    if name not in _instances:
        _instances[name] = importlib.import_module(_MODULES[name]).TRANSPORT
    return _instances[name]
