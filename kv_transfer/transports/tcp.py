"""The ``tcp`` transport (the default): one TCP connection per pull, the bytes in place.

Exchange (all on one connection to the rank's port in the handle's ``data_ports``):
  decode -> prefill  header: 4-byte length + JSON {request_id, secret, fingerprint, first_block, num_blocks}
  prefill -> decode  header: 4-byte length + JSON {ok, bytes} or {ok: false, code, message}
  prefill -> decode  the blocks' bytes, layer by layer in ``KvLayout.pieces`` order, then an 8-byte xxh3-64
  decode -> prefill  one byte: ``R`` (loaded: release the hold now) or ``K`` (keep it)

Copies: each side's kernel copy only, when the cache is dense (``sendmsg``/``recvmsg_into`` on the
KV tensors' own memory, a batch of pieces per call: ``vectored``); one xxh3 per transfer, in C, on
both sides. Every socket operation is bounded (the pull's deadline on the decode side,
``IO_TIMEOUT_S`` per batch on the prefill side), and the server takes at most ``MAX_CONNECTIONS`` at once, refusing more with UNAVAILABLE.
"""
from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
from typing import Callable, Iterator

import xxhash

from kv_transfer.layout import KvLayout, as_bytes, host_bytes, landing, settle
from kv_transfer.leases import Hold, PullRefused
from kv_transfer.transports import vectored
from kv_transfer.transports.base import KvTransferError, KvTransport, PullJob, ServeContext, Serving

log = logging.getLogger("pdserve.kv")
IO_TIMEOUT_S = 30.0
"""Bound on any one socket operation of the server (a stalled receiver frees its thread)."""
HEADER_TIMEOUT_S = 5.0
"""Bound on reading a request header (idle connections cannot hold a server slot)."""
MAX_CONNECTIONS = 64
"""Connections a server handles at once."""
MAX_HEADER = 64 << 10
_LEN = struct.Struct("!I")
_RECV_STEP = 8 << 20


class TcpTransport(KvTransport):
    name = "tcp"
    acks_release = True

    def serve(self, ctx: ServeContext) -> Serving:
        server = ConnectionServer(ctx, _serve_pull, "pdserve-kv-tcp")
        threading.Thread(target=server.accept_loop, daemon=True, name="pdserve-kv-tcp").start()
        return Serving(server.port, server.stop)

    def pull(self, job: PullJob) -> int:
        h, layout = job.handle, job.layout
        deadline = time.monotonic() + job.timeout_s
        try:
            with socket.create_connection((h.host, h.data_port(job.rank)), timeout=job.timeout_s) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                job.raise_if_cancelled()
                send_json(sock, {"request_id": h.request_id, "secret": h.secret, "fingerprint": layout.fingerprint,
                                  "first_block": job.first_block, "num_blocks": len(job.local_block_ids)})
                reply = recv_json(sock, deadline)
                if not reply.get("ok"):
                    raise KvTransferError(f"{reply.get('code', 'UNKNOWN')}: {reply.get('message', '')}")
                expected = len(job.local_block_ids) * layout.block_bytes()
                if reply.get("bytes") != expected:
                    raise KvTransferError(f"sender offers {reply.get('bytes')} bytes, expected {expected}")
                digest = _receive_blocks(sock, job, deadline)
                if digest != recv_exact(sock, 8, deadline):
                    sock.sendall(b"K")
                    raise KvTransferError("checksum mismatch (xxh3 of the transfer)")
                sock.sendall(b"R")
                return expected
        except (OSError, ValueError) as err:
            raise KvTransferError(f"pull from {h.host}:{h.data_port(job.rank)}: {type(err).__name__}: {err}") from None


def _receive_blocks(sock: socket.socket, job: PullJob, deadline: float) -> bytes:
    """Receive every piece into the local blocks (in place when the cache is dense host memory),
    a batch of pieces per system call; the xxh3 of them."""
    digest = xxhash.xxh3_64()
    spans = job.layout.host_spans(job.local_block_ids)
    if spans is not None:
        for bufs in vectored.batches(spans, len):
            vectored.recv_all(sock, bufs, deadline, job.raise_if_cancelled)
            for buf in bufs:
                digest.update(buf)
        return digest.digest()
    for group in vectored.batches(job.layout.all_pieces(job.local_block_ids), lambda view: view.nbytes):
        targets = [landing(view) for view in group]
        bufs = [as_bytes(t) for t in targets]
        vectored.recv_all(sock, bufs, deadline, job.raise_if_cancelled)
        for view, target, buf in zip(group, targets, bufs):
            digest.update(buf)
            settle(view, target)
    return digest.digest()


class ConnectionServer:
    """A prefill-side listener: one thread per connection running ``handler(ctx, conn)``, at most
    MAX_CONNECTIONS at once (more get UNAVAILABLE); used by ``tcp`` and ``gloo``."""

    def __init__(self, ctx: ServeContext, handler: Callable[[ServeContext, socket.socket], None], name: str) -> None:
        self._ctx, self._handler, self._name = ctx, handler, name
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((ctx.host, ctx.port))  # no SO_REUSEPORT: a taken port is an error
        self._sock.listen(128)
        self.port: int = self._sock.getsockname()[1]
        """The bound port (the OS's pick when ``ctx.port`` is 0)."""
        self._stopped = False

    def accept_loop(self) -> None:
        """Accept until ``stop`` (run on a daemon thread)."""
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                threading.Thread(target=_refuse, args=(conn,), daemon=True).start()
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name=f"{self._name}-conn").start()

    def stop(self) -> None:
        """Stop accepting (connections in progress end by their own bounds)."""
        self._stopped = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._handler(self._ctx, conn)
        except (OSError, ValueError, RuntimeError) as err:
            log.debug("KV connection ended: %s", err)
        finally:
            self._slots.release()


def _refuse(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(1.0)
        try:
            send_json(conn, {"ok": False, "code": "UNAVAILABLE", "message": "KV server at its connection bound"})
        except OSError:
            pass


def _serve_pull(ctx: ServeContext, conn: socket.socket) -> None:
    """The prefill side of one ``tcp`` pull."""
    ask = recv_json(conn, time.monotonic() + HEADER_TIMEOUT_S)
    rid, secret = str(ask.get("request_id", "")), str(ask.get("secret", ""))
    first, count = int(ask.get("first_block", 0)), int(ask.get("num_blocks", 0))
    try:
        entry = ctx.gate.admit(rid, secret, str(ask.get("fingerprint", "")), first, count)
    except PullRefused as err:
        send_json(conn, {"ok": False, "code": err.code, "message": err.message})
        return
    try:
        _send_blocks(ctx.layout, conn, entry, first, count)
        if recv_exact(conn, 1, time.monotonic() + IO_TIMEOUT_S) == b"R":
            ctx.gate.held.release(rid, secret)
    finally:
        ctx.gate.held.unpin(rid)


def _send_blocks(layout: KvLayout, conn: socket.socket, entry: Hold, first: int, count: int) -> None:
    blocks = entry.block_ids[first:first + count]
    send_json(conn, {"ok": True, "bytes": count * layout.block_bytes()})
    digest = xxhash.xxh3_64()
    for bufs in _outgoing(layout, blocks):
        for buf in bufs:
            digest.update(buf)
        if entry.fault == "corrupt":  # test-only fault: flip the first byte of each piece on the wire
            bufs = [memoryview(bytes([b[0] ^ 0xFF]) + bytes(b[1:])) for b in bufs]
        vectored.send_all(conn, bufs, time.monotonic() + IO_TIMEOUT_S)
    conn.settimeout(IO_TIMEOUT_S)
    conn.sendall(digest.digest())


def _outgoing(layout: KvLayout, blocks: list[int]) -> Iterator[list[memoryview]]:
    """The blocks' bytes in wire order, a batch per system call: slices of the cache itself when
    it is dense host memory, else each piece in place or as a host copy."""
    spans = layout.host_spans(blocks)
    if spans is not None:
        yield from vectored.batches(spans, len)
        return
    for group in vectored.batches(layout.all_pieces(blocks), lambda view: view.nbytes):
        yield [host_bytes(view) for view in group]


def send_json(sock: socket.socket, obj: dict) -> None:
    """Send one header: 4-byte length, then JSON."""
    data = json.dumps(obj).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


def recv_json(sock: socket.socket, deadline: float) -> dict:
    """Receive one header (a JSON object) before ``deadline`` (``inf``: wait while idle)."""
    (size,) = _LEN.unpack(recv_exact(sock, _LEN.size, deadline))
    if size > MAX_HEADER:
        raise ValueError(f"header of {size} bytes")
    obj = json.loads(recv_exact(sock, size, deadline))
    if not isinstance(obj, dict):
        raise ValueError("header is not an object")
    return obj


def recv_exact(sock: socket.socket, size: int, deadline: float) -> bytes:
    """Receive exactly ``size`` bytes before ``deadline``."""
    buf = bytearray(size)
    _recv_into(sock, memoryview(buf), deadline)
    return bytes(buf)


def _recv_into(sock: socket.socket, buf: memoryview, deadline: float) -> None:
    """Fill ``buf`` from ``sock`` before ``deadline`` (socket.timeout past it; ConnectionError
    when the peer closes first)."""
    got = 0
    while got < len(buf):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("deadline passed")
        sock.settimeout(None if remaining == float("inf") else remaining)
        n = sock.recv_into(buf[got:], min(len(buf) - got, _RECV_STEP))
        if n == 0:
            raise ConnectionError("peer closed the connection")
        got += n


TRANSPORT = TcpTransport()
