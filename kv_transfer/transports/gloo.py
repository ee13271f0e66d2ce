"""The ``gloo`` transport: torch.distributed point-to-point sends between a prefill and a decode
engine, over one two-rank process group per (prefill rank, decode process) pair, built once and
cached. Gloo for CPU tensors, NCCL for CUDA tensors: the same code (``_group``); NCCL is only
exercised on GPU machines (``pytest -m gpu``).

Connections to the prefill rank's data port carry the control, as in the ``tcp`` transport:
- ``open``: the prefill opens a TCPStore, answers its port, both sides build the pair's group; the
  connection then stays open as the pair's liveness link (closing it drops the group);
- ``pull``: one connection per pull, carrying the header, the verdict, a go, the trailing xxh3
  (CPU tensors) and the acknowledgement, while the blocks go as ``send``/``recv`` of the layout's
  pieces on the group, received in place, with the pull's own tag. Verdicts are concurrent (a
  pull waiting for its hold delays no other); the blocks of one pair move one pull at a time, in
  the order the decode side gives its go.
Every wait is bounded (the pull's deadline on the decode side, ``GROUP_TIMEOUT_S`` on the prefill
side); a pair whose group failed is dropped on both sides and rebuilt by the next pull. A cancel
stops a pull before it starts, not during its sends (the peer's sends would stall to a timeout).
"""
from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist
import xxhash

from kv_transfer.layout import KvLayout, as_bytes, run_starts
from kv_transfer.leases import PullRefused
from kv_transfer.transports import gloo_messages, tcp
from kv_transfer.transports.base import KvTransferError, KvTransport, PullJob, ServeContext, Serving

log = logging.getLogger("pdserve.kv")
GROUP_TIMEOUT_S = 30.0
"""Bound on building a group and on any one send of the prefill side."""
_SENDER, _RECEIVER = 0, 1
_NO_DIGEST = bytes(8)


@dataclass
class _Pair:
    """The decode side's half of a pair: the liveness link, the group, its next tag."""

    link: socket.socket
    group: dist.ProcessGroup
    channel: int
    tags: itertools.count = field(default_factory=lambda: itertools.count(1))
    data: threading.Lock = field(default_factory=threading.Lock)
    """Held while a pull's blocks move: one transfer at a time per pair, in the decode's order."""


class GlooTransport(KvTransport):
    name = "gloo"
    acks_release = True

    def __init__(self) -> None:
        self._pairs: dict[tuple[str, int], _Pair] = {}
        self._opening: dict[tuple[str, int], threading.Lock] = {}
        self._lock = threading.Lock()

    def serve(self, ctx: ServeContext) -> Serving:
        server = tcp.ConnectionServer(ctx, _GlooServer().handle, "pdserve-kv-gloo")
        threading.Thread(target=server.accept_loop, daemon=True, name="pdserve-kv-gloo").start()
        return Serving(server.port, server.stop)

    def pull(self, job: PullJob) -> int:
        key = (job.handle.host, job.handle.data_port(job.rank))
        deadline = time.monotonic() + job.timeout_s
        job.raise_if_cancelled()
        try:
            for attempt in (1, 2):  # a pair the sender no longer knows (it restarted) is rebuilt once
                try:
                    pair = self._pair(key, job, deadline)
                    with socket.create_connection(key, timeout=job.timeout_s) as sock:
                        return _pull_on(pair, sock, job, deadline)
                except _StalePair:
                    self._drop(key)
                    if attempt == 2:
                        raise
        except _Refused:
            raise
        except (OSError, ValueError, RuntimeError) as err:
            self._drop(key)
            if isinstance(err, KvTransferError):
                raise
            raise KvTransferError(f"pull from {key[0]}:{key[1]}: {type(err).__name__}: {str(err)[:300]}") from None

    def _pair(self, key: tuple[str, int], job: PullJob, deadline: float) -> _Pair:
        """The cached pair for ``key``, opened by one caller at a time per peer (a silent peer
        delays only the pulls that need it)."""
        with self._lock:
            if key in self._pairs:
                return self._pairs[key]
            opening = self._opening.setdefault(key, threading.Lock())
        if not opening.acquire(timeout=max(0.01, deadline - time.monotonic())):
            raise KvTransferError(f"pull from {key[0]}:{key[1]}: timed out waiting for the pair to open")
        try:
            with self._lock:
                pair = self._pairs.get(key)
            if pair is None:
                pair = _open(key, job.layout, deadline)
                with self._lock:
                    self._pairs[key] = pair
            return pair
        finally:
            opening.release()

    def _drop(self, key: tuple[str, int]) -> None:
        with self._lock:
            pair = self._pairs.pop(key, None)
        if pair is not None:
            pair.link.close()


def _open(key: tuple[str, int], layout: KvLayout, deadline: float) -> _Pair:
    """Connect the liveness link, rendezvous through the prefill's store, build the group."""
    link = socket.create_connection(key, timeout=max(0.01, deadline - time.monotonic()))
    try:
        tcp.send_json(link, {"op": "open", "fingerprint": layout.fingerprint})
        reply = tcp.recv_json(link, deadline)
        if not reply.get("ok"):
            raise _Refused(f"{reply.get('code', 'UNKNOWN')}: {reply.get('message', '')}")
        timeout = timedelta(seconds=max(1.0, deadline - time.monotonic()))
        store = dist.TCPStore(key[0], int(reply["store_port"]), 2, False, timeout)
        group = _group(store, _RECEIVER, link.getsockname()[0], layout, timeout)
        if not tcp.recv_json(link, deadline).get("ready"):  # the sender registered the pair
            raise KvTransferError("the sender did not register the pair")
    except BaseException:
        link.close()
        raise
    return _Pair(link, group, int(reply["channel"]))


def _pull_on(pair: _Pair, sock: socket.socket, job: PullJob, deadline: float) -> int:
    h, layout = job.handle, job.layout
    tag = next(pair.tags) % (1 << 30)
    tcp.send_json(sock, {"op": "pull", "channel": pair.channel, "tag": tag, "request_id": h.request_id,
                         "secret": h.secret, "fingerprint": layout.fingerprint, "first_block": job.first_block,
                         "num_blocks": len(job.local_block_ids), "cuts": run_starts(job.local_block_ids)})
    reply = tcp.recv_json(sock, deadline)
    if not reply.get("ok"):
        error = _StalePair if reply.get("code") == "ABORTED" else _Refused
        raise error(f"{reply.get('code', 'UNKNOWN')}: {reply.get('message', '')}")
    if not pair.data.acquire(timeout=max(0.01, deadline - time.monotonic())):
        raise _Refused("DEADLINE_EXCEEDED: waited for the pair's previous transfers")
    try:
        sock.sendall(b"G")  # go: the sender starts its sends now
        digest = _recv_pieces(pair, job, tag, reply.get("cuts", []), deadline)
    finally:
        pair.data.release()
    sent = tcp.recv_exact(sock, 8, deadline)
    if sent != _NO_DIGEST and sent != digest:
        sock.sendall(b"K")
        raise _Refused("checksum mismatch (xxh3 of the transfer)")
    sock.sendall(b"R")
    return len(job.local_block_ids) * layout.block_bytes()


def _recv_pieces(pair: _Pair, job: PullJob, tag: int, cuts: list[int], deadline: float) -> bytes:
    """Receive the pieces (cut where either side's runs start) into the local blocks, in the
    messages of ``gloo_messages.plan`` (a large piece in place when contiguous); their xxh3."""
    digest, layout = xxhash.xxh3_64(), job.layout
    index = gloo_messages.block_index(layout, job.local_block_ids)
    for message in gloo_messages.plan(layout, job.local_block_ids, cuts):
        with gloo_messages.received(layout, message, index) as target:
            pair.group.recv([target], _SENDER, tag).wait(timedelta(seconds=max(0.01, deadline - time.monotonic())))
            if target.device.type == "cpu":
                digest.update(as_bytes(target))
    return digest.digest()


class _Refused(KvTransferError):
    """This pull failed but the pair's group is still good (refused, or bad bytes detected)."""


class _StalePair(_Refused):
    """The sender does not know the pair's channel (it restarted, or dropped the pair)."""


class _GlooServer:
    """The prefill side: the groups of its pairs by channel id, and the two kinds of connection."""

    def __init__(self) -> None:
        self._groups: dict[int, dist.ProcessGroup] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def handle(self, ctx: ServeContext, conn: socket.socket) -> None:
        """Serve one connection (run by ``tcp.ConnectionServer`` on its own thread)."""
        ask = tcp.recv_json(conn, time.monotonic() + tcp.HEADER_TIMEOUT_S)
        if ask.get("op") == "open":
            self._open(ctx, conn, ask)
        else:
            self._pull(ctx, conn, ask)

    def _open(self, ctx: ServeContext, conn: socket.socket, ask: dict) -> None:
        try:
            ctx.gate.check_fingerprint(str(ask.get("fingerprint", "")))
        except PullRefused as err:
            tcp.send_json(conn, {"ok": False, "code": err.code, "message": err.message})
            return
        timeout = timedelta(seconds=GROUP_TIMEOUT_S)
        store = dist.TCPStore(ctx.host, 0, 2, True, timeout, wait_for_workers=False)
        channel = next(self._ids)
        tcp.send_json(conn, {"ok": True, "store_port": store.port, "channel": channel})
        group = _group(store, _SENDER, ctx.host, ctx.layout, timeout)
        with self._lock:
            self._groups[channel] = group
        try:
            tcp.send_json(conn, {"ready": True})
            conn.settimeout(None)
            while conn.recv(1):  # the liveness link: the pair lives until the decode side closes it
                pass
        finally:
            with self._lock:
                self._groups.pop(channel, None)

    def _pull(self, ctx: ServeContext, conn: socket.socket, ask: dict) -> None:
        rid, secret = str(ask.get("request_id", "")), str(ask.get("secret", ""))
        first, count = int(ask.get("first_block", 0)), int(ask.get("num_blocks", 0))
        with self._lock:
            group = self._groups.get(int(ask.get("channel", 0)))
        try:
            if group is None:
                raise PullRefused("ABORTED", "unknown channel (the pair was dropped)")
            entry = ctx.gate.admit(rid, secret, str(ask.get("fingerprint", "")), first, count)
        except PullRefused as err:
            tcp.send_json(conn, {"ok": False, "code": err.code, "message": err.message})
            return
        try:
            blocks = entry.block_ids[first:first + count]
            tcp.send_json(conn, {"ok": True, "bytes": count * ctx.layout.block_bytes(), "cuts": run_starts(blocks)})
            if tcp.recv_exact(conn, 1, time.monotonic() + tcp.IO_TIMEOUT_S) != b"G":
                return
            cuts = [int(c) for c in ask.get("cuts", [])]
            digest = _send_pieces(ctx.layout, group, int(ask.get("tag", 0)), blocks, cuts, entry.fault == "corrupt")
            conn.sendall(digest)
            if tcp.recv_exact(conn, 1, time.monotonic() + tcp.IO_TIMEOUT_S) == b"R":
                ctx.gate.held.release(rid, secret)
        finally:
            ctx.gate.held.unpin(rid)


def _send_pieces(layout: KvLayout, group: dist.ProcessGroup, tag: int, blocks: list[int], cuts: list[int],
                 corrupt: bool) -> bytes:
    """Send the blocks' pieces (cut where either side's runs start) on ``group`` with ``tag``, in the
    messages of ``gloo_messages.plan``; the xxh3 of them (zeros on CUDA)."""
    digest, on_cpu = xxhash.xxh3_64(), True
    index = gloo_messages.block_index(layout, blocks)
    for message in gloo_messages.plan(layout, blocks, cuts):
        with gloo_messages.packed(layout, message, index) as piece:
            on_cpu = piece.device.type == "cpu"
            if on_cpu:
                digest.update(as_bytes(piece))
            if corrupt:  # test-only fault: flip the first byte of each message on the wire
                piece = piece.clone()
                as_bytes(piece)[0] ^= 0xFF
            group.send([piece], _RECEIVER, tag).wait(timedelta(seconds=GROUP_TIMEOUT_S))
    return digest.digest() if on_cpu else _NO_DIGEST


def _group(store: dist.Store, rank: int, host: str, layout: KvLayout, timeout: timedelta) -> dist.ProcessGroup:
    """A two-rank group on ``store``: NCCL for CUDA caches, gloo (bound to ``host``) otherwise."""
    if layout.device.type == "cuda":  # pragma: no cover - GPU machines only
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(dist.PrefixStore("pdserve-kv", store), rank, 2, options)
    return cpu_group(store, rank, host, timeout)


def cpu_group(store: dist.Store, rank: int, host: str, timeout: timedelta) -> dist.ProcessGroup:
    """A two-rank gloo group on ``store``, bound to ``host`` (also ``pdserve bench-kv``'s raw gloo
    reference)."""
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(dist.PrefixStore("pdserve-kv", store), rank, 2, options)


TRANSPORT = GlooTransport()
