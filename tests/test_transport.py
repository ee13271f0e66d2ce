"""The KV transport on its own: real gRPC over loopback, real torch tensors, no vLLM."""
from __future__ import annotations

import pytest
import torch

from kv_transfer import transport
from kv_transfer.layout import KvLayout, KvLayoutError

NUM_BLOCKS, LAYERS = 12, 3
SECRET = "s3cret-of-this-transfer"


def _layout(seed: int, dtype: torch.dtype = torch.bfloat16, identity: str = "model|tp 0/1",
            heads: int = 3) -> tuple[KvLayout, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    # [K/V, blocks, heads, tokens, dim], like the CPU backend's per-layer view.
    caches = {f"layer.{i}": torch.randn(2, NUM_BLOCKS, heads, 4, 8, generator=gen).to(dtype) for i in range(LAYERS)}
    return KvLayout(caches, NUM_BLOCKS, identity), caches


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
        held.hold("r1", remote, secret=SECRET)
        before = {n: t.clone() for n, t in dst.items()}
        received = transport.pull(dst_layout, "127.0.0.1", port, "r1", first_block, local, timeout_s=10, secret=SECRET)
        assert received == len(local) * LAYERS * 2 * 3 * 4 * 8 * 2
        for name in src:
            for r, l in zip(remote[first_block:], local):
                assert torch.equal(dst[name][:, l], src[name][:, r])
            untouched = [b for b in range(NUM_BLOCKS) if b not in local]
            assert torch.equal(dst[name][:, untouched], before[name][:, untouched])
        assert transport.release("127.0.0.1", port, "r1", secret="guess") is False     # refused: blocks kept
        assert held.take_finished() == set()
        assert transport.release("127.0.0.1", port, "r1", secret=SECRET) is True
        assert held.take_finished() == {"r1"}
    finally:
        server.stop(grace=0)


def test_corrupted_chunk_is_rejected():
    src_layout, _ = _layout(seed=1)
    dst_layout, _ = _layout(seed=2)
    held = transport.HeldKv(lease_s=30)
    server, port = _start(held, src_layout)
    try:
        held.hold("bad", [0, 1], fault="corrupt", secret=SECRET)
        with pytest.raises(transport.KvTransferError, match="checksum mismatch"):
            transport.pull(dst_layout, "127.0.0.1", port, "bad", 0, [3, 4], timeout_s=10, secret=SECRET)
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


def test_pull_without_the_secret_is_refused():
    src_layout, _ = _layout(seed=1)
    held = transport.HeldKv(lease_s=30)
    server, port = _start(held, src_layout)
    try:
        held.hold("r", [0, 1], secret=SECRET)
        for wrong in ("", "guess"):
            with pytest.raises(transport.KvTransferError, match="PERMISSION_DENIED"):
                transport.pull(_layout(seed=2)[0], "127.0.0.1", port, "r", 0, [3, 4], timeout_s=10, secret=wrong)
        assert held.pin("r") is not None  # still held for its rightful receiver
    finally:
        server.stop(grace=0)


@pytest.mark.parametrize("receiver", [
    {"dtype": torch.float16},                     # same bytes per block, different dtype
    {"identity": "other-model|tp 0/1"},           # another checkpoint
    {"identity": "model|tp 1/2", "heads": 3},     # another tensor-parallel shard of the same size
])
def test_layout_fingerprint_mismatch_is_refused_before_any_byte(receiver):
    src_layout, _ = _layout(seed=1)
    dst_layout, dst = _layout(seed=2, **receiver)
    assert dst_layout.block_bytes() == src_layout.block_bytes()   # a byte-length check would pass
    held = transport.HeldKv(lease_s=30)
    server, port = _start(held, src_layout)
    try:
        held.hold("r", [0, 1], secret=SECRET)
        before = {n: t.clone() for n, t in dst.items()}
        with pytest.raises(transport.KvTransferError, match="FAILED_PRECONDITION.*fingerprint mismatch"):
            transport.pull(dst_layout, "127.0.0.1", port, "r", 0, [3, 4], timeout_s=10, secret=SECRET)
        assert all(torch.equal(dst[n], before[n]) for n in dst)
    finally:
        server.stop(grace=0)


def test_bogus_pulls_cannot_starve_a_real_transfer(monkeypatch):
    """Calls for unknown ids may wait for a hold only so many at a time; the rest are refused at
    once, and a real pull still gets its blocks while the waiting slots are full."""
    monkeypatch.setattr(transport, "HOLD_WAIT_S", 3.0)
    src_layout, _ = _layout(seed=1)
    held = transport.HeldKv(lease_s=30)
    server, port = _start(held, src_layout)
    held.hold("real", [0, 1, 2], secret=SECRET)
    errors: list[str] = []

    def bogus(i: int) -> None:
        try:
            transport.pull(_layout(seed=3)[0], "127.0.0.1", port, f"nope-{i}", 0, [0], timeout_s=10)
        except transport.KvTransferError as err:
            errors.append(str(err))
    try:
        import threading
        threads = [threading.Thread(target=bogus, args=(i,)) for i in range(transport.MAX_WAITING_PULLS + 6)]
        for t in threads:
            t.start()
        import time
        time.sleep(0.5)  # the waiting slots fill up
        got = transport.pull(_layout(seed=2)[0], "127.0.0.1", port, "real", 0, [5, 6, 7], timeout_s=10, secret=SECRET)
        still_waiting = sum(t.is_alive() for t in threads)  # the real pull did not queue behind them
        for t in threads:
            t.join()
    finally:
        server.stop(grace=0)
    assert got > 0 and still_waiting >= 1
    assert sum("UNAVAILABLE" in e for e in errors) >= 6 and sum("NOT_FOUND" in e for e in errors) >= 1
