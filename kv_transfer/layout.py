"""Gather and scatter whole KV blocks of an engine's paged KV-cache tensors.

The layer tensors vLLM registers with a connector differ by attention backend (which axis holds
the blocks, whether K and V are split). ``KvLayout`` finds the block axis of each layer from the
engine's block count and moves runs of blocks as raw bytes, so sender and receiver agree as long
as both run the same model, dtype and backend (which a deployment guarantees).
"""
from __future__ import annotations

import hashlib
import json

import torch


class KvLayoutError(RuntimeError):
    """The KV tensors do not have the expected shape, or received bytes do not fit."""


class KvLayout:
    """The worker's registered KV tensors, indexed by a stable layer order (sorted names)."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], num_blocks: int, identity: str = "") -> None:
        self.layer_names = sorted(kv_caches)
        self._tensors = [kv_caches[name] for name in self.layer_names]
        self._block_dims = [_block_dim(t, num_blocks, n) for t, n in zip(self._tensors, self.layer_names)]
        self.num_blocks = num_blocks
        self.fingerprint = self._fingerprint(identity)
        """What a peer's layout must equal for these bytes to mean the same KV: ``identity`` (model,
        tensor-parallel rank and size) plus every layer's name, dtype and per-block shape."""

    def _fingerprint(self, identity: str) -> str:
        layers = [(name, str(t.dtype), [s if i != d else -1 for i, s in enumerate(t.shape)], d)
                  for name, t, d in zip(self.layer_names, self._tensors, self._block_dims)]
        return hashlib.sha256(json.dumps([identity, layers]).encode()).hexdigest()[:32]

    @property
    def num_layers(self) -> int:
        """Number of KV layers."""
        return len(self._tensors)

    def block_bytes(self) -> int:
        """Bytes of one block across all layers."""
        return sum(t.numel() // t.shape[d] * t.element_size() for t, d in zip(self._tensors, self._block_dims))

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


def _block_dim(tensor: torch.Tensor, num_blocks: int, name: str) -> int:
    dims = [i for i, size in enumerate(tensor.shape) if size == num_blocks]
    if len(dims) != 1:
        raise KvLayoutError(f"{name}: cannot find the block axis of shape {tuple(tensor.shape)} "
                            f"for {num_blocks} blocks")
    return dims[0]
