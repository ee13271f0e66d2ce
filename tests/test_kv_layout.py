"""The cheap paths over a cache, which must give exactly the bytes, in exactly the order, of the
tensor pieces every transport agrees on: ``KvLayout.host_spans`` (the ``tcp`` transport) and
``select_into``/``place_from`` with the message plan of the ``gloo`` transport."""
from __future__ import annotations

import random

import pytest
import torch

from kv_transfer.layout import KvLayout, run_starts
from kv_transfer.transports import gloo_messages

BLOCKS = 24


def _caches(shape: tuple[int, ...], permute: tuple[int, ...] | None, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(3):
        t = torch.randn(*shape, generator=gen).to(torch.bfloat16)
        out[f"layer.{i}"] = t.permute(*permute) if permute else t
    return out


def _block_lists() -> list[list[int]]:
    rng = random.Random(7)
    return [[4], [3, 4, 5, 6], [9, 2, 17], [0, 1, 2, 10, 11, 23], rng.sample(range(BLOCKS), 12), list(range(BLOCKS))]


LAYOUTS = [
    ((2, BLOCKS, 3, 4, 8), None),              # [K/V, blocks, ...]: two pieces per run and layer
    ((BLOCKS, 2, 3, 4, 8), (1, 0, 2, 3, 4)),   # block-major memory seen as [K/V, blocks, ...]
    ((BLOCKS, 4, 3, 8), None),                 # blocks outermost, nothing outside the block axis
    ((3, 2, BLOCKS, 4, 8), (1, 2, 0, 3, 4)),   # heads outermost in memory
]


def _bytes(pieces) -> bytes:
    return b"".join(p.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() for p in pieces)


@pytest.mark.parametrize("shape,permute", LAYOUTS)
@pytest.mark.parametrize("block_ids", _block_lists())
def test_host_spans_are_the_pieces_bytes_in_order(shape, permute, block_ids):
    layout = KvLayout(_caches(shape, permute, seed=len(block_ids)), BLOCKS)
    pieces = [p.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() for p in layout.all_pieces(block_ids)]
    spans = layout.host_spans(block_ids)
    assert [bytes(s) for s in spans] == pieces
    assert sum(len(s) for s in spans) == len(block_ids) * layout.block_bytes()


def test_host_spans_write_into_the_cache():
    caches = _caches((2, BLOCKS, 3, 4, 8), None, seed=1)
    layout = KvLayout(caches, BLOCKS)
    for span in layout.host_spans([5, 6, 11]):
        span[:] = b"\x00" * len(span)
    for t in caches.values():
        assert not t[:, [5, 6, 11]].any() and t[:, 7].any()


def test_no_host_spans_for_a_cache_with_gaps():
    gapped = {"layer.0": torch.zeros(2, BLOCKS, 3, 4, 16, dtype=torch.bfloat16)[..., :8]}
    assert KvLayout(gapped, BLOCKS).host_spans([1, 2]) is None


@pytest.mark.parametrize("blocks,scattered,runs", [(6, False, 1), (6, True, 6), (1, True, 1)])
def test_bench_kv_scattered_blocks_are_one_piece_each(blocks, scattered, runs):
    """``pdserve bench-kv --scattered`` holds blocks as a cycled cache hands them out: no two
    consecutive, so each block of each layer is a piece of its own."""
    from pdserve.bench.kv import block_ids

    ids = block_ids(blocks, scattered)
    assert sorted(ids) == list(range(blocks))
    layout = KvLayout(_caches((BLOCKS, 4, 3, 8), None, seed=3), BLOCKS)
    assert len(layout.host_spans(ids)) == layout.num_layers * runs


@pytest.mark.parametrize("shape,permute", LAYOUTS)
@pytest.mark.parametrize("block_ids", _block_lists())
def test_select_into_gives_the_pieces_bytes_and_place_from_writes_them_back(shape, permute, block_ids):
    layout = KvLayout(_caches(shape, permute, seed=len(block_ids)), BLOCKS)
    index = torch.tensor(block_ids)
    for layer in range(layout.num_layers):
        out = torch.empty(len(block_ids) * layout.layer_block_bytes(layer), dtype=torch.uint8)
        layout.select_into(layer, index, out)
        assert out.numpy().tobytes() == _bytes(layout.pieces(layer, block_ids))
    peer = KvLayout(_caches(shape, permute, seed=99), BLOCKS)
    for layer in range(layout.num_layers):
        out = torch.empty(len(block_ids) * layout.layer_block_bytes(layer), dtype=torch.uint8)
        layout.select_into(layer, index, out)
        peer.place_from(layer, index, out)
    assert _bytes(peer.all_pieces(block_ids)) == _bytes(layout.all_pieces(block_ids))


@pytest.mark.parametrize("in_place", [0, 1 << 30])           # every layer in place / every layer gathered
@pytest.mark.parametrize("stage", [1, 1 << 30])              # a message per gathered layer / one for all
@pytest.mark.parametrize("sent,received", [
    (list(range(BLOCKS)), list(range(BLOCKS))),                # a fresh cache on both sides
    (list(range(BLOCKS - 1, -1, -1)), list(range(BLOCKS))),    # a cycled sender, a fresh receiver
    ([0, 1, 2, 10, 11, 23], [5, 6, 7, 8, 1, 2]),               # runs that differ on each side
])
def test_the_gloo_plan_moves_the_pieces_bytes_between_layouts_that_differ_in_runs(
        monkeypatch, in_place, stage, sent, received):
    """Both sides plan from the same cuts (either side's run starts), so every message has one
    size on both sides, and what lands in the receiver's blocks is the sender's pieces."""
    monkeypatch.setattr(gloo_messages, "IN_PLACE_BYTES", in_place)
    monkeypatch.setattr(gloo_messages, "STAGE_BYTES", stage)
    shape, permute = LAYOUTS[0]
    src, dst = KvLayout(_caches(shape, permute, seed=1), BLOCKS), KvLayout(_caches(shape, permute, seed=2), BLOCKS)
    cuts = sorted(set(run_starts(sent)) | set(run_starts(received)))
    out_plan, in_plan = list(gloo_messages.plan(src, sent, cuts)), list(gloo_messages.plan(dst, received, cuts))
    assert [sum(p.nbytes for p in m) for m in out_plan] == [sum(p.nbytes for p in m) for m in in_plan]
    assert all(m[0].piece is None for m in out_plan) == (in_place > 0)
    src_index, dst_index = gloo_messages.block_index(src, sent), gloo_messages.block_index(dst, received)
    for out_message, in_message in zip(out_plan, in_plan):
        with gloo_messages.packed(src, out_message, src_index) as wire, \
                gloo_messages.received(dst, in_message, dst_index) as target:
            target.view(torch.uint8).reshape(-1).copy_(wire.view(torch.uint8).reshape(-1))
    assert _bytes(dst.all_pieces(received)) == _bytes(src.all_pieces(sent))
    assert list(gloo_messages.plan(src, [], [])) == []


def test_staging_buffers_are_reused_never_shared_and_bounded():
    staging = gloo_messages.Staging(keep=2)
    cpu = torch.device("cpu")
    with staging.borrow(100, cpu) as a, staging.borrow(100, cpu) as b, staging.borrow(10, cpu) as c:
        assert len({a.data_ptr(), b.data_ptr(), c.data_ptr()}) == 3 and (a.numel(), c.numel()) == (100, 10)
        first = a.data_ptr()
    with staging.borrow(50, cpu) as again:   # a kept buffer, not a fresh one
        assert again.data_ptr() in {first, b.data_ptr(), c.data_ptr()}
    assert len(staging._free) == 2
    with pytest.raises(RuntimeError), staging.borrow(8, cpu):
        raise RuntimeError("a failed transfer still returns its buffer")
    assert len(staging._free) == 2
