"""The ``grpc`` transport: the KV server's Pull stream (``kv_transfer.grpc_server``), one chunk per
(layer, run of blocks) with a CRC32 each. Portable and simple; the reference for the others."""
from __future__ import annotations

import zlib

import grpc

from kv_transfer import control
from kv_transfer.transports.base import KvTransferError, KvTransport, PullJob, ServeContext
from protos import kv_transfer_v1_pb2 as pb


class GrpcStreamTransport(KvTransport):
    name = "grpc"

    def serve(self, ctx: ServeContext) -> None:
        """Nothing to start: the control server serves Pull."""
        return None

    def pull(self, job: PullJob) -> int:
        layout, local, first = job.layout, job.local_block_ids, job.first_block
        h = job.handle
        want = {(layer, b) for layer in range(layout.num_layers) for b in range(len(local))}
        received = 0
        request = pb.PullRequest(request_id=h.request_id, first_block=first, secret=h.secret,
                                 fingerprint=layout.fingerprint)
        stream = control.stub(h.host, h.control_port(job.rank)).Pull(request, timeout=job.timeout_s)
        try:
            for chunk in stream:
                job.raise_if_cancelled()
                if zlib.crc32(chunk.data) != chunk.crc32:
                    raise KvTransferError(f"checksum mismatch in layer {chunk.layer} blocks {chunk.first_block}+{chunk.num_blocks}")
                rel = range(chunk.first_block - first, chunk.first_block - first + chunk.num_blocks)
                if rel.start < 0 or rel.stop > len(local):
                    raise KvTransferError(f"chunk blocks {chunk.first_block}+{chunk.num_blocks} outside the request")
                layout.scatter(chunk.layer, [local[i] for i in rel], chunk.data)
                want.difference_update((chunk.layer, i) for i in rel)
                received += len(chunk.data)
        except grpc.RpcError as err:
            raise KvTransferError(f"pull from {h.host}:{h.control_port(job.rank)}: {err.code().name}: {err.details()}") from None
        finally:
            stream.cancel()
        if want:
            raise KvTransferError(f"{len(want)} (layer, block) pieces missing after the stream ended")
        return received


TRANSPORT = GrpcStreamTransport()
