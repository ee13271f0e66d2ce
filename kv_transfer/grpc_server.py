"""A prefill instance's KV server: the control service (Release, Renew) for every transport, and
the ``grpc`` transport's Pull stream. One per tensor-parallel rank, on the handle's port + rank.

Wire format: ``protos/kv_transfer_v1.proto``. Pull streams one ``KvChunk`` per (layer, run of up to
``chunk_blocks`` blocks), each with a CRC32; ``transports.grpc_stream`` is its client.
"""
from __future__ import annotations

import zlib
from concurrent import futures
from typing import TYPE_CHECKING, Iterator

import grpc

from kv_transfer.control import CHANNEL_OPTIONS
from kv_transfer.leases import Hold, PullGate, PullRefused
from protos import kv_transfer_v1_pb2 as pb
from protos import kv_transfer_v1_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from kv_transfer.layout import KvLayout

SERVER_THREADS = 16
"""Threads of a KV server (pulls, releases and renewals)."""


class _KvServicer(pb_grpc.KvTransferServicer):
    def __init__(self, gate: PullGate, layout: KvLayout, chunk_blocks: int) -> None:
        self._gate, self._held, self._layout, self._chunk_blocks = gate, gate.held, layout, chunk_blocks

    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[pb.KvChunk]:
        try:
            entry = self._gate.admit(request.request_id, request.secret, request.fingerprint, request.first_block)
        except PullRefused as err:
            context.abort(getattr(grpc.StatusCode, err.code), err.message)
        try:
            yield from self._chunks(entry, request.first_block)
        finally:
            self._held.unpin(request.request_id)

    def _chunks(self, entry: Hold, first_block: int) -> Iterator[pb.KvChunk]:
        for layer in range(self._layout.num_layers):
            for start in range(first_block, len(entry.block_ids), self._chunk_blocks):
                run = entry.block_ids[start:start + self._chunk_blocks]
                data = self._layout.gather(layer, run)
                crc = zlib.crc32(data)
                if entry.fault == "corrupt":
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                yield pb.KvChunk(layer=layer, first_block=start, num_blocks=len(run), data=data, crc32=crc)

    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseResponse:
        released = self._held.release(request.request_id, request.secret)
        if released is None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong or missing transfer secret")
        return pb.ReleaseResponse(released=released)

    def Renew(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.RenewResponse:
        granted = self._held.renew(request.request_id, request.secret)
        if granted is None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong or missing transfer secret")
        return pb.RenewResponse(lease_s=granted)


def start_server(gate: PullGate, layout: KvLayout, host: str, chunk_blocks: int,
                 port: int = 0) -> tuple[grpc.Server, int]:
    """Serve ``gate``'s holds on host:port (0: a port the OS picks; SO_REUSEPORT off: a taken
    port is an error, never a shared one); returns the server, which the caller stops at
    shutdown, and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=SERVER_THREADS, thread_name_prefix="pdserve-kv"),
                         options=CHANNEL_OPTIONS + [("grpc.so_reuseport", 0)])
    pb_grpc.add_KvTransferServicer_to_server(_KvServicer(gate, layout, chunk_blocks), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"KV server cannot bind {host}:{port}")
    server.start()
    return server, bound
