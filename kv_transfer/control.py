"""The KV control channel's client side: release and renew a held transfer on its prefill
instance over gRPC, whatever transport carries the bytes. Router-safe (no torch, no vLLM).

Callers: the decode's connector releases after a load; the router renews a hold while the
request's decode is queued (the lease heartbeat) and releases KV that no decode took over.
"""
from __future__ import annotations

import threading
import time

import grpc

from kv_transfer.handle import KvHandle
from protos import kv_transfer_v1_pb2 as pb
from protos import kv_transfer_v1_pb2_grpc as pb_grpc

CHANNEL_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
_channels: dict[str, grpc.Channel] = {}
_channels_lock = threading.Lock()


def stub(host: str, port: int) -> pb_grpc.KvTransferStub:
    """A stub on a cached channel to one KV server."""
    target = f"{host}:{port}"
    with _channels_lock:
        if target not in _channels:
            _channels[target] = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        return pb_grpc.KvTransferStub(_channels[target])


RELEASE_ATTEMPTS = 3
"""A release that cannot reach its prefill instance is tried this often, 0.2 s then 0.4 s apart
(after that, the hold's lease frees the blocks)."""


def release(handle: KvHandle, rank: int | None = None, timeout_s: float = 2.0) -> bool:
    """Tell the prefill instance to free the handle's blocks on tensor-parallel ``rank`` (None:
    every rank), retrying an unreachable one; False if any stays unreachable, or the id is
    unknown or refused (wrong secret). Blocks the caller for at most about 3 x ``timeout_s``."""
    request = pb.ReleaseRequest(request_id=handle.request_id, secret=handle.secret)
    ranks = range(handle.tp_size) if rank is None else (rank,)
    return all([_release_one(stub(handle.host, handle.control_port(r)), request, timeout_s) for r in ranks])


def _release_one(kv: pb_grpc.KvTransferStub, request: pb.ReleaseRequest, timeout_s: float) -> bool:
    for attempt in range(RELEASE_ATTEMPTS):
        try:
            return kv.Release(request, timeout=timeout_s).released
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return False
            if attempt + 1 < RELEASE_ATTEMPTS:
                time.sleep(0.2 * 2 ** attempt)
    return False


def renew(handle: KvHandle, timeout_s: float = 2.0) -> float:
    """Extend the handle's hold on every tensor-parallel rank by one lease; return the smallest
    lease granted (0.0 when a rank no longer holds it or cannot be reached)."""
    request = pb.ReleaseRequest(request_id=handle.request_id, secret=handle.secret)
    granted = []
    for rank in range(handle.tp_size):
        try:
            granted.append(stub(handle.host, handle.control_port(rank)).Renew(request, timeout=timeout_s).lease_s)
        except grpc.RpcError:
            granted.append(0.0)
    return min(granted)
