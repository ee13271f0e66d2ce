"""The KV transports on their own: real sockets over loopback, real torch tensors, no vLLM. Every
test that moves bytes runs once per transport (``TRANSPORTS``); the lease registry and the
control channel (release, renew) are shared by all of them. The registry's own rules, as plain
objects, are in tests/test_leases.py; misuse and load (secret, fingerprint, starvation, 32 pulls)
in tests/test_transport_safety.py; the sender and receiver in tests/kv_senders.py."""
from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from kv_senders import (LAYERS, NUM_BLOCKS, SECRET, TRANSPORTS, make_layout, pull_blocks, start_sender,
                        wait_for)
from kv_transfer import control, leases, transports
from kv_transfer.handle import KvHandle
from kv_transfer.layout import KvLayout, KvLayoutError
from kv_transfer.transports import KvTransferError
from pdserve.base.config import KV_TRANSPORTS
from pdserve.base.net import free_port


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
    src_layout, src = make_layout(seed=1, block_major=block_major)
    dst_layout, dst = make_layout(seed=2, block_major=block_major)
    sender = start_sender(src_layout, name)
    try:
        sender.held.hold("r1", remote, secret=SECRET)
        before = {n: t.clone() for n, t in dst.items()}
        received = pull_blocks(dst_layout, sender.handle_for("r1"), first_block, local)
        assert received == len(local) * LAYERS * 2 * 3 * 4 * 8 * 2
        for n in src:
            for r, l in zip(remote[first_block:], local):
                assert torch.equal(dst[n][:, l], src[n][:, r])
            untouched = [b for b in range(NUM_BLOCKS) if b not in local]
            assert torch.equal(dst[n][:, untouched], before[n][:, untouched])
        if transports.get(name).acks_release:   # the pull's acknowledgement released the hold
            assert wait_for(lambda: sender.held.take_finished() == {"r1"})
            return
        assert control.release(sender.handle_for("r1", secret="guess")) is False     # refused: blocks kept
        assert sender.held.take_finished() == set()
        assert control.release(sender.handle_for("r1")) is True
        assert sender.held.take_finished() == {"r1"}
    finally:
        sender.stop()


@pytest.mark.parametrize("name", TRANSPORTS)
def test_corrupted_transfer_is_rejected_and_the_hold_kept(name):
    src_layout, _ = make_layout(seed=1)
    dst_layout, _ = make_layout(seed=2)
    sender = start_sender(src_layout, name)
    try:
        sender.held.hold("bad", [0, 1], fault="corrupt", secret=SECRET)
        with pytest.raises(KvTransferError, match="checksum mismatch"):
            pull_blocks(dst_layout, sender.handle_for("bad"), 0, [3, 4])
        time.sleep(0.1)
        assert sender.held.take_finished() == set()   # not released by a failed pull
    finally:
        sender.stop()


@pytest.mark.parametrize("name", TRANSPORTS)
def test_unknown_request_is_not_found_after_bounded_wait(name, monkeypatch):
    monkeypatch.setattr(leases, "HOLD_WAIT_S", 0.2)
    layout, _ = make_layout(seed=1)
    sender = start_sender(layout, name)
    try:
        with pytest.raises(KvTransferError, match="NOT_FOUND"):
            pull_blocks(layout, sender.handle_for("nope"), 0, [0])
    finally:
        sender.stop()


@pytest.mark.parametrize("name", TRANSPORTS)
def test_unreachable_sender_fails_within_timeout(name):
    layout, _ = make_layout(seed=1)
    handle = KvHandle("127.0.0.1", (free_port(),), "r", 4, 1, 4, SECRET, name, (free_port(),))
    start = time.monotonic()
    with pytest.raises(KvTransferError):
        pull_blocks(layout, handle, 0, [0], timeout_s=1)
    assert time.monotonic() - start < 5
    assert control.release(handle, timeout_s=1) is False
    assert control.renew(handle, timeout_s=1) == 0.0


@pytest.mark.parametrize("name", TRANSPORTS)
def test_a_sender_that_stops_answering_costs_one_bounded_wait(name):
    """A black-holed peer (accepts, never answers) fails that pull by its deadline, while a pull
    from a healthy sender, started during the wait, finishes at once."""
    layout, _ = make_layout(seed=1)
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    port = hole.getsockname()[1]
    handle = KvHandle("127.0.0.1", (port,), "r", 4, 1, 4, SECRET, name, (port,))
    sender = start_sender(make_layout(seed=5)[0], name)
    sender.held.hold("ok", [0, 1], secret=SECRET)
    errors: list[str] = []

    def doomed() -> None:
        try:
            pull_blocks(layout, handle, 0, [0], timeout_s=2.0)
        except KvTransferError as err:
            errors.append(str(err))
    start = time.monotonic()
    waiting = threading.Thread(target=doomed)
    try:
        waiting.start()
        time.sleep(0.2)
        assert pull_blocks(make_layout(seed=2)[0], sender.handle_for("ok"), 0, [3, 4]) > 0
        still_waiting = waiting.is_alive()  # the healthy pull did not queue behind the doomed one
        waiting.join(10)
    finally:
        hole.close()
        sender.stop()
    assert still_waiting and errors and 2.0 < time.monotonic() - start < 8


@pytest.mark.parametrize("name", TRANSPORTS)
def test_a_cancelled_pull_stops(name):
    src_layout, _ = make_layout(seed=1)
    sender = start_sender(src_layout, name)
    cancelled = threading.Event()
    cancelled.set()
    try:
        sender.held.hold("c", [0, 1], secret=SECRET)
        with pytest.raises(KvTransferError, match="cancelled"):
            pull_blocks(make_layout(seed=2)[0], sender.handle_for("c"), 0, [3, 4], cancelled=cancelled)
    finally:
        sender.stop()


def test_renewal_extends_the_lease_only_with_the_secret():
    """The router's heartbeat: a renewed hold outlives its first lease; a wrong secret is refused
    and an ended hold grants nothing."""
    layout, _ = make_layout(seed=1)
    sender = start_sender(layout, "grpc", lease_s=0.6)
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
    layout, _ = make_layout(seed=1)
    with pytest.raises(KvLayoutError, match="expected"):
        layout.scatter(0, [0, 1], b"\x00" * 10)


def test_layout_needs_one_block_axis():
    with pytest.raises(KvLayoutError, match="block axis"):
        KvLayout({"l": torch.zeros(4, 4)}, num_blocks=4)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (NCCL pairs distinct devices)")
@pytest.mark.parametrize("name", TRANSPORTS)
def test_pull_between_gpu_caches_is_exact(name):
    """The GPU path of every transport (NCCL for gloo's code path): staged or direct copies are
    complete once the worker side synchronizes, and the blocks are exact."""
    src_layout, src = make_layout(seed=1, device="cuda:0")
    dst_layout, dst = make_layout(seed=2, device="cuda:1")
    sender = start_sender(src_layout, name)
    try:
        sender.held.hold("g", [5, 1, 7], secret=SECRET)
        pull_blocks(dst_layout, sender.handle_for("g"), 0, [0, 2, 4])
        dst_layout.synchronize()
        for n in src:
            assert torch.equal(dst[n][:, [0, 2, 4]].cpu(), src[n][:, [5, 1, 7]].cpu())
    finally:
        sender.stop()
