"""How the ``gloo`` transport groups a transfer's pieces into point-to-point messages; both sides
group the same sequence of piece sizes, so their messages agree.

Each message costs a round of the group's protocol. Once a cache has cycled, a request's blocks
are scattered and each is a piece of its own (24-32 KB per layer), so one message per piece ran
at 5-8% of raw TCP in ``pdserve bench-kv --scattered``. Small pieces are therefore packed, with
one copy on each side; large ones travel alone, in place.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from kv_transfer.layout import settle

IN_PLACE_BYTES = 256 << 10
"""A piece this large travels alone, in place."""
STAGE_BYTES = 16 << 20
"""Most bytes of smaller pieces packed into one message (one copy on each side)."""


def group(pieces: Iterable[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """The pieces grouped into messages: a piece of at least IN_PLACE_BYTES alone, consecutive
    smaller ones together up to STAGE_BYTES."""
    run: list[torch.Tensor] = []
    size = 0
    for piece in pieces:
        if piece.nbytes >= IN_PLACE_BYTES or (run and size + piece.nbytes > STAGE_BYTES):
            if run:
                yield run
            run, size = [], 0
        if piece.nbytes >= IN_PLACE_BYTES:
            yield [piece]
            continue
        run.append(piece)
        size += piece.nbytes
    if run:
        yield run


def pack(message: list[torch.Tensor]) -> torch.Tensor:
    """The sender's tensor for a message: the piece itself when it is one and contiguous, else
    one contiguous copy of the message's bytes."""
    if len(message) == 1:
        return message[0] if message[0].is_contiguous() else message[0].contiguous()
    return torch.cat([p.reshape(-1).view(torch.uint8) for p in message])


def receive_buffer(message: list[torch.Tensor]) -> torch.Tensor:
    """Where the receiver takes a message: the piece itself when it is one and contiguous, else a
    buffer on the piece's device that ``unpack`` copies out of."""
    first = message[0]
    if len(message) > 1:
        return torch.empty(sum(p.nbytes for p in message), dtype=torch.uint8, device=first.device)
    return first if first.is_contiguous() else torch.empty_like(first, memory_format=torch.contiguous_format)


def unpack(message: list[torch.Tensor], received: torch.Tensor) -> None:
    """Copy a received message into its pieces (nothing when it landed in place; asynchronous
    on a GPU, as ``settle`` is)."""
    if len(message) == 1:
        settle(message[0], received)
        return
    offset = 0
    for piece in message:
        settle(piece, received[offset:offset + piece.nbytes].view(piece.dtype).view(piece.shape))
        offset += piece.nbytes
