"""Gather and scatter whole KV blocks of an engine's paged KV-cache tensors.

The layer tensors vLLM registers with a connector differ by attention backend (which axis holds
the blocks, whether K and V are split). ``KvLayout`` finds the block axis of each layer from the
engine's block count and moves runs of blocks as raw bytes, so sender and receiver agree as long
as both run the same model, dtype and backend (which a deployment guarantees).
"""
from __future__ import annotations

import hashlib
import itertools
import json
from typing import Iterable, Iterator

import numpy as np
import torch


class KvLayoutError(RuntimeError):
    """The KV tensors do not have the expected shape, or received bytes do not fit."""


class KvLayout:
    """The worker's registered KV tensors, indexed by a stable layer order (sorted names)."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], num_blocks: int, identity: str = "") -> None:
        self.layer_names = sorted(kv_caches)
        self._tensors = [kv_caches[name] for name in self.layer_names]
        self._block_dims = [_block_dim(t, num_blocks, n) for t, n in zip(self._tensors, self.layer_names)]
        self._memory = [_memory_order(t, d) for t, d in zip(self._tensors, self._block_dims)]
        self._host = [_host_memory(view) for view, _ in self._memory]
        self.num_blocks = num_blocks
        self.device = self._tensors[0].device if self._tensors else torch.device("cpu")
        """Where the cache lives (cpu or cuda); transports pick their backend by it."""
        self.fingerprint = self._fingerprint(identity)
        """What a peer's layout must equal for these bytes to mean the same KV: ``identity`` (model,
        tensor-parallel rank and size) plus every layer's name, dtype and per-block shape."""

    def _fingerprint(self, identity: str) -> str:
        layers = [(name, str(t.dtype), [s if i != d else -1 for i, s in enumerate(t.shape)], d, order)
                  for name, t, d, (_, order) in zip(self.layer_names, self._tensors, self._block_dims, self._memory)]
        return hashlib.sha256(json.dumps([identity, layers]).encode()).hexdigest()[:32]

    @property
    def num_layers(self) -> int:
        """Number of KV layers."""
        return len(self._tensors)

    def block_bytes(self) -> int:
        """Bytes of one block across all layers."""
        return sum(t.numel() // t.shape[d] * t.element_size() for t, d in zip(self._tensors, self._block_dims))

    def pieces(self, layer: int, block_ids: list[int], cuts: Iterable[int] = ()) -> Iterator[torch.Tensor]:
        """Views of the given blocks of one layer that together cover their bytes once, in an order
        equal layouts agree on: per index of the dimensions stored outside the block axis, one view
        per segment of ``block_ids`` (a new segment starts at every position in ``run_starts`` and
        in ``cuts``), so one view per run of consecutive ids when the cache is block-major in
        memory. A peer that passes the other side's run starts as ``cuts`` gets views of the same
        sizes (message-based transports need that). On a dense cache every view is contiguous:
        its bytes are sent or received in place (``as_bytes``)."""
        view, order = self._memory[layer]
        axis = order.index(self._block_dims[layer])
        segments = _segments(block_ids, cuts)
        for idx in itertools.product(*(range(n) for n in view.shape[:axis])):
            part = view[idx] if idx else view
            for a, b in segments:
                yield part.narrow(0, block_ids[a], b - a)

    def all_pieces(self, block_ids: list[int], cuts: Iterable[int] = ()) -> Iterator[torch.Tensor]:
        """``pieces`` of every layer, layer by layer: the order of a whole transfer on the wire."""
        for layer in range(self.num_layers):
            yield from self.pieces(layer, block_ids, cuts)

    def layer_block_bytes(self, layer: int) -> int:
        """Bytes of one block of one layer."""
        tensor, dim = self._tensors[layer], self._block_dims[layer]
        return tensor.numel() // tensor.shape[dim] * tensor.element_size()

    def smallest_piece(self, layer: int, block_ids: list[int], cuts: Iterable[int] = ()) -> int:
        """Bytes of the smallest view ``pieces(layer, block_ids, cuts)`` yields (0 for no blocks),
        without making the views."""
        view, order = self._memory[layer]
        outer = view.shape[:order.index(self._block_dims[layer])].numel()
        shortest = min((b - a for a, b in _segments(block_ids, cuts)), default=0)
        return shortest * self.layer_block_bytes(layer) // outer

    def select_into(self, layer: int, index: torch.Tensor, out: torch.Tensor) -> None:
        """Copy the blocks ``index`` (a long tensor on the cache's device) of one layer into
        ``out``, a contiguous uint8 tensor of ``len(index) * layer_block_bytes(layer)`` bytes, in
        the byte order of ``pieces``: one ``index_select`` per index of the outer dimensions."""
        for rows, chunk in self._row_chunks(layer, len(index), out):
            torch.index_select(rows, 0, index, out=chunk)

    def place_from(self, layer: int, index: torch.Tensor, src: torch.Tensor) -> None:
        """Write bytes laid out by ``select_into`` (on a same-layout peer) into the blocks ``index``
        of one layer (asynchronously on a GPU: ``synchronize`` before the load is reported done).
        On dense host memory numpy's row assignment does it, twice as fast here as
        ``index_copy_`` (4.8 against 10.4 ms for 44 MB in 1,800 rows)."""
        for rows, chunk in self._row_chunks(layer, len(index), src):
            if rows.device.type == "cpu" and rows.is_contiguous():
                _byte_rows(rows)[index.numpy()] = _byte_rows(chunk)
            else:
                rows.index_copy_(0, index, chunk)

    def _row_chunks(self, layer: int, count: int, flat: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per index of the outer dimensions: the layer's blocks there ([blocks, ...]) and the
        matching slice of ``flat`` viewed as ``count`` of them."""
        view, order = self._memory[layer]
        axis = order.index(self._block_dims[layer])
        row_shape = list(view.shape[axis + 1:])
        size = count * torch.Size(row_shape).numel() * view.element_size()
        if flat.nbytes != size * view.shape[:axis].numel():
            raise KvLayoutError(f"layer {layer}: {flat.nbytes} bytes for {count} blocks")
        for n, idx in enumerate(itertools.product(*(range(k) for k in view.shape[:axis]))):
            chunk = flat[n * size:(n + 1) * size].view(view.dtype).view([count, *row_shape])
            yield (view[idx] if idx else view), chunk

    def host_spans(self, block_ids: list[int]) -> list[memoryview] | None:
        """The bytes of ``all_pieces(block_ids)``, in the same order, as writable memoryviews of
        the cache itself; None unless every layer is dense host memory (then use the tensors).

        The cheap path for the ``tcp`` transport: a slice of a memoryview per run of blocks costs
        well under a microsecond, where a tensor view plus its buffer costs 10-25 us. That matters
        once a cache has cycled and a request's blocks are scattered: at 1,900 tokens, 60 blocks
        in up to 60 runs are 3,600 pieces (docs/performance.md, "Overheads")."""
        if any(flat is None for flat in self._host):
            return None
        segments = _segments(block_ids)
        out = []
        for flat, (view, order), dim in zip(self._host, self._memory, self._block_dims):
            axis = order.index(dim)
            unit, step = view.element_size(), view.stride(axis) * view.element_size()
            for idx in itertools.product(*(range(n) for n in view.shape[:axis])):
                base = sum(i * view.stride(k) for k, i in enumerate(idx)) * unit
                out += [flat[base + block_ids[a] * step: base + (block_ids[a] + b - a) * step] for a, b in segments]
        return out

    def synchronize(self) -> None:
        """Wait for copies into the cache still in flight on the GPU (no-op on a CPU cache); the
        worker side calls it before it reports a load done."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def gather(self, layer: int, block_ids: list[int]) -> bytes:
        """Copy the given blocks of one layer into a contiguous byte string."""
        tensor, dim = self._tensors[layer], self._block_dims[layer]
        index = torch.tensor(block_ids, dtype=torch.long, device=tensor.device)
        part = tensor.index_select(dim, index).contiguous().cpu()
        return part.view(torch.uint8).numpy().tobytes()

    def scatter(self, layer: int, block_ids: list[int], data: bytes) -> None:
        """Write bytes made by ``gather`` (on a same-layout peer) into the given blocks."""
        tensor, dim = self._tensors[layer], self._block_dims[layer]
        shape = list(tensor.shape)
        shape[dim] = len(block_ids)
        expected = torch.Size(shape).numel() * tensor.element_size()
        if len(data) != expected:
            raise KvLayoutError(f"layer {layer}: got {len(data)} bytes for {len(block_ids)} blocks, expected {expected}")
        src = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(tensor.dtype).reshape(shape)
        index = torch.tensor(block_ids, dtype=torch.long, device=tensor.device)
        tensor.index_copy_(dim, index, src.to(tensor.device))


def as_bytes(view: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy)."""
    return memoryview(view.view(-1).view(torch.uint8).numpy()).cast("B")


def host_bytes(view: torch.Tensor) -> memoryview:
    """The bytes of a piece to send: in place for a contiguous CPU view, else a host copy."""
    if view.device.type == "cpu" and view.is_contiguous():
        return as_bytes(view)
    return as_bytes(view.contiguous().cpu())


def landing(view: torch.Tensor) -> torch.Tensor:
    """Where a piece's bytes are received: the view itself when it is contiguous host memory,
    else a host buffer (pinned for a GPU cache) that ``settle`` copies into the view."""
    if view.device.type == "cpu" and view.is_contiguous():
        return view
    return torch.empty(view.shape, dtype=view.dtype, pin_memory=view.device.type == "cuda")


def settle(view: torch.Tensor, received: torch.Tensor) -> None:
    """Copy a piece received into a ``landing`` buffer into its view (asynchronously on a GPU:
    ``KvLayout.synchronize`` before the load is reported done)."""
    if received is not view:
        view.copy_(received, non_blocking=view.device.type == "cuda")


def run_starts(block_ids: list[int]) -> list[int]:
    """Positions in ``block_ids`` where a run of consecutive ids starts (0 first, if any)."""
    return [i for i, b in enumerate(block_ids) if i == 0 or b != block_ids[i - 1] + 1]


def _segments(block_ids: list[int], cuts: Iterable[int] = ()) -> list[tuple[int, int]]:
    """[start, end) positions in ``block_ids`` of its runs of consecutive ids, also cut at ``cuts``."""
    starts = sorted(set(run_starts(block_ids)) | {c for c in cuts if 0 < c < len(block_ids)})
    return list(zip(starts, starts[1:] + [len(block_ids)]))


def _byte_rows(rows: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor as a numpy array of one row of bytes per entry of its first axis."""
    return rows.reshape(rows.shape[0], -1).view(torch.uint8).numpy()


def _host_memory(view: torch.Tensor) -> memoryview | None:
    """All of a layer's bytes, in memory order, when it is dense host memory (else None)."""
    return as_bytes(view) if view.device.type == "cpu" and view.is_contiguous() else None


def _memory_order(tensor: torch.Tensor, block_dim: int) -> tuple[torch.Tensor, list[int]]:
    """The tensor permuted into its memory order (outermost first), and that order; the block
    axis keeps its place among equal strides."""
    order = sorted(range(tensor.dim()), key=lambda i: (-tensor.stride(i), i != block_dim, i))
    return tensor.permute(order), order


def _block_dim(tensor: torch.Tensor, num_blocks: int, name: str) -> int:
    dims = [i for i, size in enumerate(tensor.shape) if size == num_blocks]
    if len(dims) != 1:
        raise KvLayoutError(f"{name}: cannot find the block axis of shape {tuple(tensor.shape)} "
                            f"for {num_blocks} blocks")
    return dims[0]
