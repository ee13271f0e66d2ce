"""Engines that share a host's cores slow each other (``ServingConfig.contention``).

A latency profile times one engine with the machine otherwise idle. Live, on a CPU host, a
second engine's work (its forward passes, and the threads that stream its tokens) takes memory
bandwidth and CPU from the first. ``pdserve profile --contention`` measures that slowdown for
the two loads a neighbour engine runs: decoding a batch of B, or prefilling. ``ServingSim``
scales a pass by the slowdown the other instances' state calls for when the pass starts (a pass
is short next to the changes of that state; it is not re-timed when they change mid-pass).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Contention:
    """The profiled engine's slowdown (loaded / idle neighbour) per neighbour load."""

    neighbour_decode_batches: tuple[int, ...]
    """Neighbour decode batches measured, ascending."""
    prefill_vs_decoding: tuple[float, ...]
    """A prefill's slowdown per neighbour decode batch."""
    decode_vs_decoding: tuple[float, ...]
    """A decode step's slowdown per neighbour decode batch."""
    prefill_vs_prefilling: float
    """A prefill's slowdown while the neighbour prefills."""
    decode_vs_prefilling: float
    """A decode step's slowdown while the neighbour prefills."""

    def __post_init__(self) -> None:
        n = len(self.neighbour_decode_batches)
        if not n or len(self.prefill_vs_decoding) != n or len(self.decode_vs_decoding) != n:
            raise ValueError("contention: one prefill and one decode slowdown per neighbour decode batch")
        if list(self.neighbour_decode_batches) != sorted(set(self.neighbour_decode_batches)) or \
                self.neighbour_decode_batches[0] < 1:
            raise ValueError("contention: neighbour decode batches must be ascending and >= 1")

    @classmethod
    def from_dict(cls, d: dict) -> Contention:
        """From a profile's ``contention`` section (``pdserve.contention.measure``)."""
        return cls(tuple(d["neighbour_decode_batches"]), tuple(d["prefill_vs_decoding"]),
                   tuple(d["decode_vs_decoding"]), float(d["prefill_vs_prefilling"]),
                   float(d["decode_vs_prefilling"]))

    def slowdown(self, prefill: bool, neighbour_prefilling: bool, neighbour_batch: int) -> float:
        """The factor on a pass (``prefill``: it computes prompts; else a decode step) while the
        neighbours prefill, or else decode ``neighbour_batch`` requests in all (0: idle, 1.0).
        Between measured batches the factor is interpolated; past the last, it stays there."""
        if neighbour_prefilling:
            return self.prefill_vs_prefilling if prefill else self.decode_vs_prefilling
        return _interpolate(self.neighbour_decode_batches,
                            self.prefill_vs_decoding if prefill else self.decode_vs_decoding, neighbour_batch)


def _interpolate(xs: Sequence[int], ys: Sequence[float], x: int) -> float:
    """Piecewise linear through (0, 1.0) and the points, flat past the last."""
    px, py = 0, 1.0
    for qx, qy in zip(xs, ys):
        if x <= qx:
            return py + (qy - py) * (x - px) / (qx - px)
        px, py = qx, qy
    return py
