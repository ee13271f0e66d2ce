"""How the ``gloo`` transport groups a transfer into point-to-point messages; both sides plan
from the same piece sizes (cut where either side's runs start), so their messages agree.

Each message costs a round of the group's protocol, and each tensor view made in Python costs
10-25 us. Once a cache has cycled, a request's blocks are scattered and each is a piece of its
own (24-32 KB per layer): one message per piece ran at 5-8% of raw TCP in ``pdserve bench-kv
--scattered``, one copy per piece into a packed message at 27-51%. So a layer whose pieces are all
large travels piece by piece, in place; any other layer is gathered whole with one
``index_select`` per outer index (``KvLayout.select_into``), and such layers are packed together
into messages of up to STAGE_BYTES: one copy on each side, no view per piece.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator

import torch

from kv_transfer.layout import KvLayout, settle

IN_PLACE_BYTES = 256 << 10
"""A layer whose pieces are all at least this large travels piece by piece, in place."""
STAGE_BYTES = 16 << 20
"""Most bytes of gathered layers packed into one message (a larger layer is a message alone)."""


@dataclass(frozen=True)
class Part:
    """One part of a message: a piece in place, or (``piece`` None) a layer's blocks gathered."""

    nbytes: int
    piece: torch.Tensor | None = None
    layer: int = -1


def plan(layout: KvLayout, block_ids: list[int], cuts: list[int]) -> Iterator[list[Part]]:
    """The transfer's messages, layer by layer: a large piece alone; gathered layers together up
    to STAGE_BYTES. The bytes on the wire are those of ``layout.all_pieces(block_ids, cuts)``."""
    run: list[Part] = []
    size = 0
    for layer in range(layout.num_layers if block_ids else 0):
        if layout.smallest_piece(layer, block_ids, cuts) >= IN_PLACE_BYTES:
            if run:
                yield run
            run, size = [], 0
            yield from ([Part(p.nbytes, piece=p)] for p in layout.pieces(layer, block_ids, cuts))
            continue
        part = Part(len(block_ids) * layout.layer_block_bytes(layer), layer=layer)
        if run and size + part.nbytes > STAGE_BYTES:
            yield run
            run, size = [], 0
        run.append(part)
        size += part.nbytes
    if run:
        yield run


def block_index(layout: KvLayout, block_ids: list[int]) -> torch.Tensor:
    """The block ids as the index tensor ``pack`` and ``unpack`` take (once per transfer)."""
    return torch.tensor(block_ids, dtype=torch.long, device=layout.device)


@contextlib.contextmanager
def packed(layout: KvLayout, message: list[Part], index: torch.Tensor) -> Iterator[torch.Tensor]:
    """The sender's tensor for a message, until it is sent: a piece in place (contiguous), or a
    staging buffer the message's layers are gathered into."""
    if message[0].piece is not None:
        piece = message[0].piece
        yield piece if piece.is_contiguous() else piece.contiguous()
        return
    with STAGING.borrow(sum(p.nbytes for p in message), layout.device) as staging:
        for part, chunk in _chunks(message, staging):
            layout.select_into(part.layer, index, chunk)
        yield staging


@contextlib.contextmanager
def received(layout: KvLayout, message: list[Part], index: torch.Tensor) -> Iterator[torch.Tensor]:
    """Where the receiver takes a message: a contiguous piece itself, else a staging buffer on
    the cache's device. Once the message is in it and the block exits, its bytes are copied into
    the cache (asynchronously on a GPU, as ``settle`` is); not when the block raised."""
    piece = message[0].piece
    if piece is not None:
        target = piece if piece.is_contiguous() else torch.empty_like(piece, memory_format=torch.contiguous_format)
        yield target
        settle(piece, target)
        return
    with STAGING.borrow(sum(p.nbytes for p in message), layout.device) as staging:
        yield staging
        for part, chunk in _chunks(message, staging):
            layout.place_from(part.layer, index, chunk)


class Staging:
    """Host buffers for packed messages, reused across messages and transfers: a fresh buffer of
    16 MB is mapped by the kernel page by page as it is first written (about 4,000 page faults,
    6-9 ms here, as long as gathering into it). At most ``keep`` buffers are kept, each of at least
    STAGE_BYTES; GPU buffers come from torch's caching allocator instead."""

    def __init__(self, keep: int = 4) -> None:
        self._free: list[torch.Tensor] = []
        self._keep = keep
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def borrow(self, nbytes: int, device: torch.device) -> Iterator[torch.Tensor]:
        """A uint8 tensor of ``nbytes`` on ``device``, the caller's alone until the block exits."""
        if device.type != "cpu":
            yield torch.empty(nbytes, dtype=torch.uint8, device=device)
            return
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]  # sorted by size
            buffer = self._free.pop(fits[0]) if fits else None
        if buffer is None:
            buffer = torch.empty(max(nbytes, STAGE_BYTES), dtype=torch.uint8)
        try:
            yield buffer[:nbytes]
        finally:
            with self._lock:
                self._free = sorted(self._free + [buffer], key=torch.Tensor.numel)[-self._keep:]


STAGING = Staging()


def _chunks(message: list[Part], flat: torch.Tensor) -> Iterator[tuple[Part, torch.Tensor]]:
    offset = 0
    for part in message:
        yield part, flat[offset:offset + part.nbytes]
        offset += part.nbytes
