"""``LatencyModel``: prefill and decode-step time fitted to a measured profile (``pdserve
profile``). Pure Python: the router and the simulator load it; no numpy or torch needed.

prefill_s(n, h) = a + b*n + c*(n^2 + 2*n*h) for n uncached prompt tokens after h cached ones
(attention makes it superlinear: the new tokens attend to each other and to the cached prefix);
decode_step_s(batch, context) = d + e*batch + f*batch*context (weights once, KV per token).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

DEFAULT_PROFILE = Path(__file__).resolve().parents[1] / "deploy" / "profiles" / "cpu-smollm2-135m.json"
DEFAULT_KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2
"""KV bytes of one token of the default profile's model (SmolLM2-135M in bf16: 30 layers, K and V, 3
KV heads of 64), for profiles that give none."""
DEFAULT_KV_TOKENS = 46_592
"""KV capacity of one of its CPU engines (1 GiB in 32-token blocks), tokens."""
DEFAULT_KV_BANDWIDTH_BPS = 700 * 2**20
"""Prefill -> decode KV bandwidth on this machine's loopback (gRPC stream, 650-785 MiB/s)."""


@dataclass(frozen=True)
class LatencyModel:
    """Fitted coefficients (seconds) and where the profile came from."""

    prefill: tuple[float, float, float]
    decode: tuple[float, float, float]
    origin: str = ""

    def prefill_s(self, tokens: int, cached: int = 0) -> float:
        """Time to prefill ``tokens`` uncached tokens that follow ``cached`` cached ones."""
        a, b, c = self.prefill
        return max(0.0, a + b * tokens + c * (tokens * tokens + 2 * tokens * cached)) if tokens > 0 else 0.0

    def prefill_batch_s(self, lengths: Sequence[int]) -> float:
        """Time of one forward pass over several whole prompts (no cached prefix): the fixed cost
        once, each prompt's own token and attention terms (prompts do not attend to each other)."""
        a, b, c = self.prefill
        return max(0.0, a + sum(b * n + c * n * n for n in lengths)) if lengths else 0.0

    def mixed_step_s(self, lengths: Sequence[int], batch: int, context: float) -> float:
        """Time of one step that prefills whole prompts of ``lengths`` and decodes ``batch`` requests
        of mean ``context`` (chunked-prefill scheduling): the larger fixed cost once, every term of both."""
        if not batch:
            return self.prefill_batch_s(lengths)
        if not lengths:
            return self.decode_step_s(batch, context)
        (a, _, _), (d, e, f) = self.prefill, self.decode
        return max(a, d) + self.prefill_batch_s(lengths) - a + e * batch + f * batch * context

    def decode_step_s(self, batch: int, context: float) -> float:
        """Time of one decode step for ``batch`` requests of mean ``context`` tokens."""
        d, e, f = self.decode
        return max(1e-6, d + e * batch + f * batch * context)

    @classmethod
    def fit(cls, prefill_points: Sequence[tuple[int, float]], decode_points: Sequence[tuple[int, float, float]],
            origin: str) -> LatencyModel:
        """Least-squares fit of (tokens, seconds) and (batch, context, seconds) points, in relative
        error (each point weighted by 1 / its time): the points span 40 ms to seconds, and an
        absolute fit would trade the short prompts' accuracy for the long ones'."""
        prefill = _lstsq([(1 / t, n / t, n * n / t) for n, t in prefill_points], [1.0] * len(prefill_points))
        decode = _lstsq([(1 / t, b / t, b * c / t) for b, c, t in decode_points], [1.0] * len(decode_points))
        return cls(tuple(prefill), tuple(decode), origin)

    @classmethod
    def load(cls, path: str | Path = DEFAULT_PROFILE) -> LatencyModel:
        """The model of a profile JSON: fitted to the points ``pdserve profile`` measured, or, for a
        derived profile (roofline, published numbers), its ``coefficients`` as given."""
        data = json.loads(Path(path).read_text())
        if "coefficients" in data:
            coef = data["coefficients"]
            return cls(tuple(coef["prefill"]), tuple(coef["decode"]), data["origin"])
        return cls.fit([tuple(p) for p in data["prefill"]], [tuple(p) for p in data["decode"]], data["origin"])

    def to_dict(self) -> dict:
        """JSON-ready coefficients."""
        return asdict(self)


def _lstsq(rows: list[tuple[float, float, float]], ys: list[float]) -> list[float]:
    """Solve the 3x3 normal equations by Gaussian elimination (columns scaled for conditioning)."""
    scale = [max(abs(r[j]) for r in rows) or 1.0 for j in range(3)]
    xs = [[r[j] / scale[j] for j in range(3)] for r in rows]
    m = [[sum(x[i] * x[j] for x in xs) for j in range(3)] + [sum(x[i] * y for x, y in zip(xs, ys))] for i in range(3)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        if abs(m[col][col]) < 1e-12:
            continue
        for r in range(3):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [a - f * b for a, b in zip(m[r], m[col])]
    return [(m[i][3] / m[i][i] if abs(m[i][i]) > 1e-12 else 0.0) / scale[i] for i in range(3)]


def profile_path(name: str) -> Path:
    """A latency profile's file: ``NAME`` under ``deploy/profiles`` (without .json), or a path."""
    named = DEFAULT_PROFILE.parent / f"{name}.json"
    return named if named.is_file() else Path(name)


class OnlineLatencyModel:
    """A ``LatencyModel`` refitted online: every prediction is the base model's times a scale that
    follows observed prefill times (an exponentially weighted mean of log(observed / predicted)),
    so predictions settle on whatever hardware runs, whichever profile was shipped.

    Reads (``prefill_s``, ``decode_step_s``) come from the policies and the admission queue;
    ``observe`` from the admission queue when a prefill that ran alone on its engine finishes.
    """

    def __init__(self, base: LatencyModel, weight: float = 0.2, refit: bool = True) -> None:
        self.base, self.weight, self.refit = base, weight, refit
        self._log_scale = 0.0
        self.observations = 0

    @property
    def scale(self) -> float:
        """observed / base-predicted prefill time, as currently fitted."""
        return math.exp(self._log_scale)

    def prefill_s(self, tokens: int, cached: int = 0) -> float:
        """The base model's prefill time, rescaled."""
        return self.scale * self.base.prefill_s(tokens, cached)

    def decode_step_s(self, batch: int, context: float) -> float:
        """The base model's decode step, rescaled by the same factor."""
        return self.scale * self.base.decode_step_s(batch, context)

    def observe(self, tokens: int, cached: int, seconds: float) -> None:
        """Take one observed prefill (``tokens`` uncached after ``cached``) into the fit."""
        predicted = self.base.prefill_s(tokens, cached)
        if not self.refit or predicted <= 0 or seconds <= 0:
            return
        self.observations += 1
        weight = max(self.weight, 1.0 / self.observations)  # the first observations count fully
        self._log_scale += weight * (math.log(seconds / predicted) - self._log_scale)
