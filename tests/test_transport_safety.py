"""The KV transports against misuse and load: a pull without the transfer's secret, a receiver
whose cache layout differs, calls for unknown ids crowding out a real one, and 32 transfers at
once. Each runs once per transport; real sockets over loopback, no vLLM (tests/kv_senders.py)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from kv_senders import NUM_BLOCKS, SECRET, TRANSPORTS, make_layout, pull_blocks, start_sender
from kv_transfer import leases
from kv_transfer.transports import KvTransferError


@pytest.mark.parametrize("name", TRANSPORTS)
def test_pull_without_the_secret_is_refused(name):
    src_layout, _ = make_layout(seed=1)
    sender = start_sender(src_layout, name)
    try:
        sender.held.hold("r", [0, 1], secret=SECRET)
        for wrong in ("", "guess"):
            with pytest.raises(KvTransferError, match="PERMISSION_DENIED"):
                pull_blocks(make_layout(seed=2)[0], sender.handle_for("r", secret=wrong), 0, [3, 4])
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
    src_layout, _ = make_layout(seed=1)
    dst_layout, dst = make_layout(seed=2, **receiver)
    assert dst_layout.block_bytes() == src_layout.block_bytes()   # a byte-length check would pass
    sender = start_sender(src_layout, name)
    try:
        sender.held.hold("r", [0, 1], secret=SECRET)
        before = {n: t.clone() for n, t in dst.items()}
        with pytest.raises(KvTransferError, match="FAILED_PRECONDITION.*fingerprint mismatch"):
            pull_blocks(dst_layout, sender.handle_for("r"), 0, [3, 4])
        assert all(torch.equal(dst[n], before[n]) for n in dst)
    finally:
        sender.stop()


@pytest.mark.parametrize("name", TRANSPORTS)
def test_bogus_pulls_cannot_starve_a_real_transfer(name, monkeypatch):
    """Calls for unknown ids may wait for a hold only so many at a time; the rest are refused at
    once, and a real pull still gets its blocks while the waiting slots are full."""
    monkeypatch.setattr(leases, "HOLD_WAIT_S", 3.0)
    src_layout, _ = make_layout(seed=1)
    sender = start_sender(src_layout, name)
    sender.held.hold("real", [0, 1, 2], secret=SECRET)
    errors: list[str] = []

    def bogus(i: int) -> None:
        try:
            pull_blocks(make_layout(seed=3)[0], sender.handle_for(f"nope-{i}", secret=""), 0, [0])
        except KvTransferError as err:
            errors.append(str(err))
    try:
        threads = [threading.Thread(target=bogus, args=(i,)) for i in range(leases.MAX_WAITING_PULLS + 6)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # the waiting slots fill up
        got = pull_blocks(make_layout(seed=2)[0], sender.handle_for("real"), 0, [5, 6, 7])
        still_waiting = sum(t.is_alive() for t in threads)  # the real pull did not queue behind them
        for t in threads:
            t.join()
    finally:
        sender.stop()
    assert got > 0 and still_waiting >= 1
    assert sum("UNAVAILABLE" in e for e in errors) >= 6 and sum("NOT_FOUND" in e for e in errors) >= 1


@pytest.mark.parametrize("name", TRANSPORTS)
def test_32_concurrent_transfers_finish_exactly(name):
    src_layout, src = make_layout(seed=1)
    sender = start_sender(src_layout, name)
    receivers = [make_layout(seed=10 + i) for i in range(32)]
    for i in range(32):
        sender.held.hold(f"c{i}", [i % NUM_BLOCKS, (i + 5) % NUM_BLOCKS], secret=SECRET)
    results: dict[int, int | str] = {}

    def pull(i: int) -> None:
        try:
            results[i] = pull_blocks(receivers[i][0], sender.handle_for(f"c{i}"), 0, [0, 1], timeout_s=30)
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
