"""The gRPC KV transport: the prefill side's KV server and the decode side's pull client.

Wire format: ``protos/kv_transfer_v1.proto``. The server streams one ``KvChunk`` per (layer, run of
up to ``chunk_blocks`` blocks), each with a CRC32 of its bytes; the client checks every checksum
and that every (layer, block) arrived before it reports success, then releases the sender's
blocks. No torch here: the layout object is passed in, so the router can import ``release``.
"""
from __future__ import annotations

import hmac
import threading
import time
import zlib
from concurrent import futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import grpc

from protos import kv_transfer_v1_pb2 as pb
from protos import kv_transfer_v1_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from kv_transfer.layout import KvLayout


HOLD_WAIT_S = 5.0
"""How long a pull waits for the sender's engine to register the blocks it named in a handle."""
SERVER_THREADS = 16
"""Threads of a KV server (pulls and releases)."""
MAX_WAITING_PULLS = SERVER_THREADS // 2
"""Pulls that may wait for a hold at once; more get UNAVAILABLE at once, so calls for unknown ids
(bogus or early) can never occupy every thread and starve real transfers."""


class KvTransferError(RuntimeError):
    """A pull failed: unreachable sender, unknown request, checksum mismatch, missing chunk."""


@dataclass
class _Held:
    block_ids: list[int]
    deadline: float
    fault: str = ""
    secret: str = ""
    pulls: int = 0
    released: bool = False

    def allows(self, secret: str) -> bool:
        """Whether a call carrying ``secret`` may pull or release these blocks."""
        return hmac.compare_digest(self.secret, secret)


@dataclass
class HeldKv:
    """Thread-safe registry of the KV blocks a prefill instance holds for decode instances.

    Written by the connector's worker side (``hold``, ``take_finished``) and by the KV server's
    threads (``pin``/``unpin``, ``release``). An entry ends when released or when its lease
    expires while no pull is in flight; ``take_finished`` hands ended ids back to vLLM to free.
    """

    lease_s: float
    _entries: dict[str, _Held] = field(default_factory=dict)
    _early_releases: dict[str, tuple[float, str]] = field(default_factory=dict)  # id -> (forget after, secret)
    _lock: threading.Condition = field(default_factory=threading.Condition)

    def hold(self, request_id: str, block_ids: list[int], fault: str = "", secret: str = "") -> None:
        """Start holding a finished prefill's blocks for one lease (already released if a release
        carrying this transfer's secret came first)."""
        with self._lock:
            entry = _Held(list(block_ids), time.monotonic() + self.lease_s, fault, secret)
            early = self._early_releases.pop(request_id, None)
            entry.released = early is not None and entry.allows(early[1])
            self._entries[request_id] = entry
            self._lock.notify_all()

    def known(self, request_id: str) -> bool:
        """Whether a hold for ``request_id`` has arrived (released or not)."""
        with self._lock:
            return request_id in self._entries

    def pin(self, request_id: str, wait_s: float = 0.0) -> _Held | None:
        """Mark a pull in flight (the lease cannot expire under it); None if unknown or ended.

        Waits up to ``wait_s`` for the hold: the engine hands out a request's handle one engine
        step before its worker side registers the blocks, so a fast decode instance can ask first.
        """
        with self._lock:
            self._lock.wait_for(lambda: request_id in self._entries, timeout=wait_s)
            entry = self._entries.get(request_id)
            if entry is None or entry.released:
                return None
            entry.pulls += 1
            return entry

    def unpin(self, request_id: str) -> None:
        """End a pull started by ``pin``."""
        with self._lock:
            if request_id in self._entries:
                self._entries[request_id].pulls -= 1

    def release(self, request_id: str, secret: str = "") -> bool | None:
        """Mark the blocks free to reuse; False when the id is not held (yet: a hold that
        arrives later within one lease, with the same secret, starts released); None when the
        secret is wrong."""
        with self._lock:
            entry = self._entries.get(request_id)
            if entry is None:
                self._early_releases[request_id] = (time.monotonic() + self.lease_s, secret)
                return False
            if not entry.allows(secret):
                return None
            entry.released = True
            return True

    def take_finished(self, now: float | None = None) -> set[str]:
        """Remove and return ids released, or whose lease ran out with no pull in flight."""
        now = time.monotonic() if now is None else now
        with self._lock:
            done = {rid for rid, e in self._entries.items()
                    if (e.released or e.deadline <= now) and e.pulls == 0}
            for rid in done:
                del self._entries[rid]
            for rid in [r for r, (forget, _) in self._early_releases.items() if forget <= now]:
                del self._early_releases[rid]
            return done

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class _KvServicer(pb_grpc.KvTransferServicer):
    def __init__(self, held: HeldKv, layout: KvLayout, chunk_blocks: int) -> None:
        self._held, self._layout, self._chunk_blocks = held, layout, chunk_blocks
        self._waiting = threading.BoundedSemaphore(MAX_WAITING_PULLS)

    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[pb.KvChunk]:
        if request.fingerprint != self._layout.fingerprint:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"KV layout fingerprint mismatch: receiver "
                          f"{request.fingerprint or '(none)'}, sender {self._layout.fingerprint}")
        entry = self._pin(request.request_id, context)
        try:
            if not entry.allows(request.secret):
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong or missing transfer secret")
            yield from self._chunks(entry, request.first_block)
        finally:
            self._held.unpin(request.request_id)

    def _pin(self, request_id: str, context: grpc.ServicerContext) -> _Held:
        """Pin the hold, waiting (bounded, and only so many at once) for one not yet registered."""
        if self._held.known(request_id):
            entry = self._held.pin(request_id)
        elif self._waiting.acquire(blocking=False):
            try:
                entry = self._held.pin(request_id, HOLD_WAIT_S)
            finally:
                self._waiting.release()
        else:
            context.abort(grpc.StatusCode.UNAVAILABLE, "too many pulls waiting for their holds")
        if entry is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no KV held for request {request_id}")
        return entry

    def _chunks(self, entry: _Held, first_block: int) -> Iterator[pb.KvChunk]:
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


def start_server(held: HeldKv, layout: KvLayout, host: str, port: int, chunk_blocks: int) -> grpc.Server:
    """Serve ``held`` on host:port from a small thread pool; the caller stops it at shutdown."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=SERVER_THREADS, thread_name_prefix="pdserve-kv"),
                         options=_OPTIONS + [("grpc.so_reuseport", 0)])
    pb_grpc.add_KvTransferServicer_to_server(_KvServicer(held, layout, chunk_blocks), server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise KvTransferError(f"KV server cannot bind {host}:{port}")
    server.start()
    return server


_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
_channels: dict[str, grpc.Channel] = {}
_channels_lock = threading.Lock()


def _stub(host: str, port: int) -> pb_grpc.KvTransferStub:
    target = f"{host}:{port}"
    with _channels_lock:
        if target not in _channels:
            _channels[target] = grpc.insecure_channel(target, options=_OPTIONS)
        return pb_grpc.KvTransferStub(_channels[target])


def pull(layout: KvLayout, host: str, port: int, request_id: str, first_block: int,
         local_block_ids: list[int], timeout_s: float, secret: str = "") -> int:
    """Pull the sender's blocks ``first_block..`` into ``local_block_ids``; return bytes received.
    The call carries the transfer's ``secret`` and this layout's fingerprint (checked by the
    sender before any byte is sent).

    Raises KvTransferError on any failure; the local blocks may then hold partial data, which the
    caller must report as failed so vLLM recomputes them.
    """
    want = {(layer, b) for layer in range(layout.num_layers) for b in range(len(local_block_ids))}
    received = 0
    try:
        request = pb.PullRequest(request_id=request_id, first_block=first_block, secret=secret,
                                 fingerprint=layout.fingerprint)
        for chunk in _stub(host, port).Pull(request, timeout=timeout_s):
            if zlib.crc32(chunk.data) != chunk.crc32:
                raise KvTransferError(f"checksum mismatch in layer {chunk.layer} blocks {chunk.first_block}+{chunk.num_blocks}")
            rel = range(chunk.first_block - first_block, chunk.first_block - first_block + chunk.num_blocks)
            if rel.start < 0 or rel.stop > len(local_block_ids):
                raise KvTransferError(f"chunk blocks {chunk.first_block}+{chunk.num_blocks} outside the request")
            layout.scatter(chunk.layer, [local_block_ids[i] for i in rel], chunk.data)
            want.difference_update((chunk.layer, i) for i in rel)
            received += len(chunk.data)
    except grpc.RpcError as err:
        raise KvTransferError(f"pull from {host}:{port}: {err.code().name}: {err.details()}") from None
    if want:
        raise KvTransferError(f"{len(want)} (layer, block) pieces missing after the stream ended")
    return received


def release(host: str, port: int, request_id: str, timeout_s: float = 2.0, secret: str = "") -> bool:
    """Tell a prefill instance to free a request's held blocks; False if unreachable, unknown or
    refused (wrong secret)."""
    try:
        request = pb.ReleaseRequest(request_id=request_id, secret=secret)
        return _stub(host, port).Release(request, timeout=timeout_s).released
    except grpc.RpcError:
        return False
