"""The KV transports on their own: real sockets over loopback, real torch tensors, no vLLM. Every
test that moves bytes runs once per transport (``TRANSPORTS``); the lease registry and the
control channel (release, renew) are shared by all of them. The registry's own rules, as plain
objects, are in tests/test_leases.py."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

import pytest
import torch

from kv_transfer import control, grpc_server, leases, transports
from kv_transfer.handle import KvHandle
from kv_transfer.layout import KvLayout, KvLayoutError
from kv_transfer.leases import HeldKv, PullGate
from kv_transfer.transports import KvTransferError, PullJob, ServeContext
from pdserve.base.config import KV_TRANSPORTS

NUM_BLOCKS, LAYERS = 12, 3
SECRET = "s3cret-of-this-transfer"
TRANSPORTS = ["grpc", "tcp", "gloo"]


def _layout(seed: int, dtype: torch.dtype = torch.bfloat16, identity: str = "model|tp 0/1",
            heads: int = 3, block_major: bool = False, device: str = "cpu") -> tuple[KvLayout, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    if block_major:  # [blocks, K/V, ...] in memory, registered as a [K/V, blocks, ...] view
        caches = {f"layer.{i}": torch.randn(NUM_BLOCKS, 2, heads, 4, 8, generator=gen).to(dtype).transpose(0, 1)
                  for i in range(LAYERS)}
    else:  # [K/V, blocks, heads, tokens, dim], like the CPU backend's per-layer view
        caches = {f"layer.{i}": torch.randn(2, NUM_BLOCKS, heads, 4, 8, generator=gen).to(dtype) for i in range(LAYERS)}
    caches = {n: t.to(device) for n, t in caches.items()}
    return KvLayout(caches, NUM_BLOCKS, identity), caches


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Sender:
    """A prefill side: its holds, served by the control server and one transport."""

    held: HeldKv
    handle: KvHandle
    stop: Callable[[], None]

    def handle_for(self, request_id: str, secret: str = SECRET) -> KvHandle:
        return replace(self.handle, request_id=request_id, secret=secret)


def _sender(layout: KvLayout, name: str, lease_s: float = 30) -> Sender:
    held = HeldKv(lease_s=lease_s)
    gate = PullGate(held, layout.fingerprint)
    port, data_port = _port(), _port()
    server = grpc_server.start_server(gate, layout, "127.0.0.1", port, chunk_blocks=2)
    stop_data = transports.get(name).serve(ServeContext(gate, layout, "127.0.0.1", data_port, 2))

    def stop() -> None:
        server.stop(grace=0)
        if stop_data:
            stop_data()
    handle = KvHandle("127.0.0.1", port, "", 0, 0, 4, SECRET, name, data_port)
    return Sender(held, handle, stop)


def _pull(layout: KvLayout, handle: KvHandle, first_block: int, local: list[int], timeout_s: float = 10,
          cancelled: threading.Event | None = None) -> int:
    job = PullJob(layout, handle, first_block, local, timeout_s, cancelled=cancelled or threading.Event())
    return transports.get(handle.transport).pull(job)


def test_registry_matches_the_config():
    assert set(transports.NAMES) == set(KV_TRANSPORTS)
    with pytest.raises(KvTransferError, match="unknown KV transport"):
        transports.get("carrier-pigeon")


@pytest.mark.parametrize("name", TRANSPORTS)
@pytest.mark.parametrize("first_block,remote,local,block_major", [
    (0, [5, 1, 7], [0, 2, 4], False),      # whole request, three blocks (two chunks per layer)
    (1, [5, 1, 7], [9, 3], False),         # receiver already had the first block cached
    (0, [11], [6], False),                  # one block
    (0, [3, 4, 5, 9], [6, 7, 8, 2], True),  # block-major memory: runs move as single pieces
    (0, [2, 3, 8], [4, 9, 10], True),       # runs that differ between the two sides
])
def test_pull_copies_exact_blocks(name, first_block, remote, local, block_major):
    src_layout, src = _layout(seed=1, block_major=block_major)
    dst_layout, dst = _layout(seed=2, block_major=block_major)
    sender = _sender(src_layout, name)
    try:
        sender.held.hold("r1", remote, secret=SECRET)
        before = {n: t.clone() for n, t in dst.items()}
        received = _pull(dst_layout, sender.handle_for("r1"), first_block, local)
        assert received == len(local) * LAYERS * 2 * 3 * 4 * 8 * 2
        for n in src:
            for r, l in zip(remote[first_block:], local):
                assert torch.equal(dst[n][:, l], src[n][:, r])
            untouched = [b for b in range(NUM_BLOCKS) if b not in local]
            assert torch.equal(dst[n][:, untouched], before[n][:, untouched])
        if transports.get(name).acks_release:   # the pull's acknowledgement released the hold
            assert _wait(lambda: sender.held.take_finished() == {"r1"})
            return
        assert control.release(sender.handle_for("r1", secret="guess")) is False     # refused: blocks kept
        assert sender.held.take_finished() == set()
        assert control.release(sender.handle_for("r1")) is True
        assert sender.held.take_finished() == {"r1"}
    finally:
        sender.stop()


def _wait(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("name", TRANSPORTS)
def test_corrupted_transfer_is_rejected_and_the_hold_kept(name):
    src_layout, _ = _layout(seed=1)
    dst_layout, _ = _layout(seed=2)
    sender = _sender(src_layout, name)
    try:
        sender.held.hold("bad", [0, 1], fault="corrupt", secret=SECRET)
        with pytest.raises(KvTransferError, match="checksum mismatch"):
            _pull(dst_layout, sender.handle_for("bad"), 0, [3, 4])
        time.sleep(0.1)
        assert sender.held.take_finished() == set()   # not released by a failed pull
    finally:
        sender.stop()


@pytest.mark.parametrize("name", TRANSPORTS)
def test_unknown_request_is_not_found_after_bounded_wait(name, monkeypatch):
    monkeypatch.setattr(leases, "HOLD_WAIT_S", 0.2)
    layout, _ = _layout(seed=1)
    sender = _sender(layout, name)
    try:
        with pytest.raises(KvTransferError, match="NOT_FOUND"):
            _pull(layout, sender.handle_for("nope"), 0, [0])
    finally:
        sender.stop()


@pytest.mark.parametrize("name", TRANSPORTS)
def test_unreachable_sender_fails_within_timeout(name):
    layout, _ = _layout(seed=1)
    handle = KvHandle("127.0.0.1", _port(), "r", 4, 1, 4, SECRET, name, _port())
    start = time.monotonic()
    with pytest.raises(KvTransferError):
        _pull(layout, handle, 0, [0], timeout_s=1)
    assert time.monotonic() - start < 5
    assert control.release(handle, timeout_s=1) is False
    assert control.renew(handle, timeout_s=1) == 0.0


@pytest.mark.parametrize("name", TRANSPORTS)
def test_a_sender_that_stops_answering_costs_one_bounded_wait(name):
    """A black-holed peer (accepts, never answers) fails that pull by its deadline, while a pull
    from a healthy sender, started during the wait, finishes at once."""
    layout, _ = _layout(seed=1)
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    port = hole.getsockname()[1]
    handle = KvHandle("127.0.0.1", port, "r", 4, 1, 4, SECRET, name, port)
    sender = _sender(_layout(seed=5)[0], name)
    sender.held.hold("ok", [0, 1], secret=SECRET)
    errors: list[str] = []

    def doomed() -> None:
        try:
            _pull(layout, handle, 0, [0], timeout_s=2.0)
        except KvTransferError as err:
            errors.append(str(err))
    start = time.monotonic()
    waiting = threading.Thread(target=doomed)
    try:
        waiting.start()
        time.sleep(0.2)
        assert _pull(_layout(seed=2)[0], sender.handle_for("ok"), 0, [3, 4]) > 0
        still_waiting = waiting.is_alive()  # the healthy pull did not queue behind the doomed one
        waiting.join(10)
    finally:
        hole.close()
        sender.stop()
    assert still_waiting and errors and 2.0 < time.monotonic() - start < 8


@pytest.mark.parametrize("name", TRANSPORTS)
def test_a_cancelled_pull_stops(name):
    src_layout, _ = _layout(seed=1)
    sender = _sender(src_layout, name)
    cancelled = threading.Event()
    cancelled.set()
    try:
        sender.held.hold("c", [0, 1], secret=SECRET)
        with pytest.raises(KvTransferError, match="cancelled"):
            _pull(_layout(seed=2)[0], sender.handle_for("c"), 0, [3, 4], cancelled=cancelled)
    finally:
        sender.stop()


def test_renewal_extends_the_lease_only_with_the_secret():
    """The router's heartbeat: a renewed hold outlives its first lease; a wrong secret is refused
    and an ended hold grants nothing."""
    layout, _ = _layout(seed=1)
    sender = _sender(layout, "grpc", lease_s=0.6)
    try:
        sender.held.hold("q", [0], secret=SECRET)
        for _ in range(4):                                   # 1.2 s: twice the lease
            time.sleep(0.3)
            assert control.renew(sender.handle_for("q")) == pytest.approx(0.6)
            assert sender.held.take_finished() == set()
        assert control.renew(sender.handle_for("q", secret="guess")) == 0.0   # PERMISSION_DENIED
        time.sleep(0.7)                                      # no renewal: the lease runs out
        assert sender.held.take_finished() == {"q"}
        assert control.renew(sender.handle_for("q")) == 0.0
    finally:
        sender.stop()


def test_scatter_rejects_wrong_size():
    layout, _ = _layout(seed=1)
    with pytest.raises(KvLayoutError, match="expected"):
        layout.scatter(0, [0, 1], b"\x00" * 10)


def test_layout_needs_one_block_axis():
    with pytest.raises(KvLayoutError, match="block axis"):
        KvLayout({"l": torch.zeros(4, 4)}, num_blocks=4)


@pytest.mark.parametrize("name", TRANSPORTS)
def test_pull_without_the_secret_is_refused(name):
    src_layout, _ = _layout(seed=1)
    sender = _sender(src_layout, name)
    try:
        sender.held.hold("r", [0, 1], secret=SECRET)
        for wrong in ("", "guess"):
            with pytest.raises(KvTransferError, match="PERMISSION_DENIED"):
                _pull(_layout(seed=2)[0], sender.handle_for("r", secret=wrong), 0, [3, 4])
        assert sender.held.pin("r") is not None  # still held for its rightful receiver
    finally:
        sender.stop()


@pytest.mark.parametrize("name", TRANSPORTS)
@pytest.mark.parametrize("receiver", [
    {"dtype": torch.float16},                     # same bytes per block, different dtype
    {"identity": "other-model|tp 0/1"},           # another checkpoint
    {"identity": "model|tp 1/2", "heads": 3},     # another tensor-parallel shard of the same size
    {"block_major": True},                        # same shapes, another memory order
])
def test_layout_fingerprint_mismatch_is_refused_before_any_byte(name, receiver):
    src_layout, _ = _layout(seed=1)
    dst_layout, dst = _layout(seed=2, **receiver)
    assert dst_layout.block_bytes() == src_layout.block_bytes()   # a byte-length check would pass
    sender = _sender(src_layout, name)
    try:
        sender.held.hold("r", [0, 1], secret=SECRET)
        before = {n: t.clone() for n, t in dst.items()}
        with pytest.raises(KvTransferError, match="FAILED_PRECONDITION.*fingerprint mismatch"):
            _pull(dst_layout, sender.handle_for("r"), 0, [3, 4])
        assert all(torch.equal(dst[n], before[n]) for n in dst)
    finally:
        sender.stop()


@pytest.mark.parametrize("name", TRANSPORTS)
def test_bogus_pulls_cannot_starve_a_real_transfer(name, monkeypatch):
    """Calls for unknown ids may wait for a hold only so many at a time; the rest are refused at
    once, and a real pull still gets its blocks while the waiting slots are full."""
    monkeypatch.setattr(leases, "HOLD_WAIT_S", 3.0)
    src_layout, _ = _layout(seed=1)
    sender = _sender(src_layout, name)
    sender.held.hold("real", [0, 1, 2], secret=SECRET)
    errors: list[str] = []

    def bogus(i: int) -> None:
        try:
            _pull(_layout(seed=3)[0], sender.handle_for(f"nope-{i}", secret=""), 0, [0])
        except KvTransferError as err:
            errors.append(str(err))
    try:
        threads = [threading.Thread(target=bogus, args=(i,)) for i in range(leases.MAX_WAITING_PULLS + 6)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # the waiting slots fill up
        got = _pull(_layout(seed=2)[0], sender.handle_for("real"), 0, [5, 6, 7])
        still_waiting = sum(t.is_alive() for t in threads)  # the real pull did not queue behind them
        for t in threads:
            t.join()
    finally:
        sender.stop()
    assert got > 0 and still_waiting >= 1
    assert sum("UNAVAILABLE" in e for e in errors) >= 6 and sum("NOT_FOUND" in e for e in errors) >= 1


@pytest.mark.parametrize("name", TRANSPORTS)
def test_32_concurrent_transfers_finish_exactly(name):
    src_layout, src = _layout(seed=1)
    sender = _sender(src_layout, name)
    receivers = [_layout(seed=10 + i) for i in range(32)]
    for i in range(32):
        sender.held.hold(f"c{i}", [i % NUM_BLOCKS, (i + 5) % NUM_BLOCKS], secret=SECRET)
    results: dict[int, int | str] = {}

    def pull(i: int) -> None:
        try:
            results[i] = _pull(receivers[i][0], sender.handle_for(f"c{i}"), 0, [0, 1], timeout_s=30)
        except KvTransferError as err:
            results[i] = str(err)
    try:
        threads = [threading.Thread(target=pull, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sender.stop()
    assert all(isinstance(results.get(i), int) for i in range(32)), results
    for i, (_, dst) in enumerate(receivers):
        for n in src:
            assert torch.equal(dst[n][:, [0, 1]], src[n][:, [i % NUM_BLOCKS, (i + 5) % NUM_BLOCKS]])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (NCCL pairs distinct devices)")
@pytest.mark.parametrize("name", TRANSPORTS)
def test_pull_between_gpu_caches_is_exact(name):
    """The GPU path of every transport (NCCL for gloo's code path): staged or direct copies are
    complete once the worker side synchronizes, and the blocks are exact."""
    src_layout, src = _layout(seed=1, device="cuda:0")
    dst_layout, dst = _layout(seed=2, device="cuda:1")
    sender = _sender(src_layout, name)
    try:
        sender.held.hold("g", [5, 1, 7], secret=SECRET)
        _pull(dst_layout, sender.handle_for("g"), 0, [0, 2, 4])
        dst_layout.synchronize()
        for n in src:
            assert torch.equal(dst[n][:, [0, 2, 4]].cpu(), src[n][:, [5, 1, 7]].cpu())
    finally:
        sender.stop()
