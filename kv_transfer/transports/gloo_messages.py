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
    for layer in range(layout.num_layers):
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


def pack(layout: KvLayout, message: list[Part], index: torch.Tensor) -> torch.Tensor:
    """The sender's tensor for a message: a piece in place (contiguous), or one buffer the
    message's layers are gathered into."""
    if message[0].piece is not None:
        piece = message[0].piece
        return piece if piece.is_contiguous() else piece.contiguous()
    staging = torch.empty(sum(p.nbytes for p in message), dtype=torch.uint8, device=layout.device)
    for part, chunk in _chunks(message, staging):
        layout.select_into(part.layer, index, chunk)
    return staging


def receive_buffer(layout: KvLayout, message: list[Part]) -> torch.Tensor:
    """Where the receiver takes a message: a contiguous piece itself, else a buffer on the
    cache's device that ``unpack`` copies out of."""
    piece = message[0].piece
    if piece is None:
        return torch.empty(sum(p.nbytes for p in message), dtype=torch.uint8, device=layout.device)
    return piece if piece.is_contiguous() else torch.empty_like(piece, memory_format=torch.contiguous_format)


def unpack(layout: KvLayout, message: list[Part], received: torch.Tensor, index: torch.Tensor) -> None:
    """Copy a received message into the cache (nothing when it landed in place; asynchronous on
    a GPU, as ``settle`` is)."""
    if message[0].piece is not None:
        settle(message[0].piece, received)
        return
    for part, chunk in _chunks(message, received):
        layout.place_from(part.layer, index, chunk)


def _chunks(message: list[Part], flat: torch.Tensor) -> Iterator[tuple[Part, torch.Tensor]]:
    offset = 0
    for part in message:
        yield part, flat[offset:offset + part.nbytes]
        offset += part.nbytes
