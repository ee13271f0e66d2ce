"""``KvLayout.host_spans``: the ``tcp`` transport's cheap path over a dense host cache must give
exactly the bytes, in exactly the order, of the tensor pieces every transport agrees on."""
from __future__ import annotations

import random

import pytest
import torch

from kv_transfer.layout import KvLayout

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


@pytest.mark.parametrize("shape,permute", [
    ((2, BLOCKS, 3, 4, 8), None),              # [K/V, blocks, ...]: two pieces per run and layer
    ((BLOCKS, 2, 3, 4, 8), (1, 0, 2, 3, 4)),   # block-major memory seen as [K/V, blocks, ...]
    ((BLOCKS, 4, 3, 8), None),                 # blocks outermost, nothing outside the block axis
    ((3, 2, BLOCKS, 4, 8), (1, 2, 0, 3, 4)),   # heads outermost in memory
])
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
