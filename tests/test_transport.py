"""The KV transport on its own: real gRPC over loopback, real torch tensors, no vLLM."""
from __future__ import annotations

import pytest
import torch

from kv_transfer import transport
from kv_transfer.layout import KvLayout, KvLayoutError

NUM_BLOCKS, LAYERS = 12, 3


def _layout(seed: int) -> tuple[KvLayout, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    # [K/V, blocks, heads, tokens, dim], like the CPU backend's per-layer view.
    caches = {f"layer.{i}": torch.randn(2, NUM_BLOCKS, 3, 4, 8, generator=gen).to(torch.bfloat16) for i in range(LAYERS)}
    return KvLayout(caches, NUM_BLOCKS), caches


def _port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(held, layout):
    port = _port()
    server = transport.start_server(held, layout, "127.0.0.1", port, chunk_blocks=2)
    return server, port


@pytest.mark.parametrize("first_block,remote,local", [
    (0, [5, 1, 7], [0, 2, 4]),      # whole request, three blocks (two chunks per layer)
    (1, [5, 1, 7], [9, 3]),         # receiver already had the first block cached
    (0, [11], [6]),                  # one block
])
def test_pull_copies_exact_blocks(first_block, remote, local):
    src_layout, src = _layout(seed=1)
    dst_layout, dst = _layout(seed=2)
    held = transport.HeldKv(lease_s=30)
    server, port = _start(held, src_layout)
    try:
        held.hold("r1", remote)
        before = {n: t.clone() for n, t in dst.items()}
        received = transport.pull(dst_layout, "127.0.0.1", port, "r1", first_block, local, timeout_s=10)
        assert received == len(local) * LAYERS * 2 * 3 * 4 * 8 * 2
        for name in src:
            for r, l in zip(remote[first_block:], local):
                assert torch.equal(dst[name][:, l], src[name][:, r])
            untouched = [b for b in range(NUM_BLOCKS) if b not in local]
            assert torch.equal(dst[name][:, untouched], before[name][:, untouched])
        assert transport.release("127.0.0.1", port, "r1") is True
        assert held.take_finished() == {"r1"}
    finally:
        server.stop(grace=0)


def test_corrupted_chunk_is_rejected():
    src_layout, _ = _layout(seed=1)
    dst_layout, _ = _layout(seed=2)
    held = transport.HeldKv(lease_s=30)
    server, port = _start(held, src_layout)
    try:
        held.hold("bad", [0, 1], fault="corrupt")
        with pytest.raises(transport.KvTransferError, match="checksum mismatch"):
            transport.pull(dst_layout, "127.0.0.1", port, "bad", 0, [3, 4], timeout_s=10)
    finally:
        server.stop(grace=0)


def test_unknown_request_is_not_found_after_bounded_wait(monkeypatch):
    monkeypatch.setattr(transport, "HOLD_WAIT_S", 0.2)
    layout, _ = _layout(seed=1)
    server, port = _start(transport.HeldKv(lease_s=30), layout)
    try:
        with pytest.raises(transport.KvTransferError, match="NOT_FOUND"):
            transport.pull(layout, "127.0.0.1", port, "nope", 0, [0], timeout_s=10)
    finally:
        server.stop(grace=0)


def test_unreachable_sender_fails_within_timeout():
    layout, _ = _layout(seed=1)
    with pytest.raises(transport.KvTransferError, match="UNAVAILABLE|DEADLINE_EXCEEDED"):
        transport.pull(layout, "127.0.0.1", _port(), "r", 0, [0], timeout_s=1)
    assert transport.release("127.0.0.1", _port(), "r", timeout_s=1) is False


def test_lease_expiry_waits_for_pulls_in_flight():
    held = transport.HeldKv(lease_s=10)
    held.hold("a", [1])
    held.hold("b", [2])
    assert held.pin("a") is not None
    assert held.take_finished(now=1e12) == {"b"}          # a is being pulled: not freed under it
    held.unpin("a")
    assert held.take_finished(now=1e12) == {"a"}
    assert len(held) == 0


def test_release_before_hold_frees_on_arrival():
    held = transport.HeldKv(lease_s=10)
    assert held.release("early") is False
    held.hold("early", [4])
    assert held.pin("early") is None                        # nobody may pull released blocks
    assert held.take_finished() == {"early"}


def test_scatter_rejects_wrong_size():
    layout, _ = _layout(seed=1)
    with pytest.raises(KvLayoutError, match="expected"):
        layout.scatter(0, [0, 1], b"\x00" * 10)


def test_layout_needs_one_block_axis():
    with pytest.raises(KvLayoutError, match="block axis"):
        KvLayout({"l": torch.zeros(4, 4)}, num_blocks=4)
