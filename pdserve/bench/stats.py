"""The bench's statistics (pure): per-request timings in, percentiles, SLO attainment, goodput
and throughput out. Percentiles are numpy's linear interpolation."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from pdserve.sim.study import percentile


@dataclass(frozen=True)
class RequestTiming:
    """What the client saw of one request."""

    ok: bool
    ttft_s: float | None = None
    tpot_s: float | None = None
    """Mean gap between tokens after the first (None with fewer than two tokens)."""
    e2e_s: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""
    queue_ms: float | None = None
    """The router's own account (its final message): arrival until the prefill call started."""
    prefill_ms: float | None = None
    """The prefill call on the prefill engine, the engine's own wait for a pass included."""


@dataclass(frozen=True)
class Slo:
    """A pair of targets; a request meets the SLO when it succeeded and meets both."""

    name: str
    ttft_s: float
    tpot_s: float

    def met(self, t: RequestTiming) -> bool:
        """Whether ``t`` met both targets (a single-token answer has no TPOT to miss)."""
        return t.ok and t.ttft_s is not None and t.ttft_s <= self.ttft_s and (t.tpot_s is None or t.tpot_s <= self.tpot_s)


def distribution(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99 and mean of the values (NaN when empty)."""
    vals = list(values)
    mean = sum(vals) / len(vals) if vals else float("nan")
    return {"p50": percentile(vals, 50), "p90": percentile(vals, 90), "p99": percentile(vals, 99), "mean": mean}


def summarize(timings: Sequence[RequestTiming], duration_s: float, slos: Sequence[Slo]) -> dict:
    """One run's summary: latency distributions, and per SLO its attainment and goodput."""
    ok = [t for t in timings if t.ok]
    return {
        "requests": len(timings), "succeeded": len(ok), "failed": len(timings) - len(ok), "duration_s": duration_s,
        "throughput_rps": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_tokens_per_s": sum(t.output_tokens for t in ok) / duration_s if duration_s > 0 else 0.0,
        "ttft_s": distribution([t.ttft_s for t in ok if t.ttft_s is not None]),
        "tpot_s": distribution([t.tpot_s for t in ok if t.tpot_s is not None]),
        "e2e_s": distribution([t.e2e_s for t in ok if t.e2e_s is not None]),
        "slo": {s.name: slo_summary(s, timings, duration_s) for s in slos},
    }


def slo_summary(slo: Slo, timings: Sequence[RequestTiming], duration_s: float) -> dict:
    """One SLO set over one run: its targets, the attainment and the goodput (met requests/s)."""
    met = sum(slo.met(t) for t in timings)
    return {**asdict(slo), "attainment": met / len(timings) if timings else 0.0,
            "goodput_rps": met / duration_s if duration_s > 0 else 0.0}


GOODPUT_ATTAINMENT = 0.9
"""The attainment a rate must reach to count toward goodput (DistServe's 90%)."""


def attainment_points(result: dict, name: str) -> list[tuple[float, float]]:
    """(offered rate, attainment of SLO set ``name``) per run of a sweep's results."""
    return [(r["rate_rps"], r["summary"]["slo"][name]["attainment"]) for r in result["runs"]]


def sustained_goodput(points: Sequence[tuple[float, float]], target: float = GOODPUT_ATTAINMENT) -> float:
    """The highest rate up to which every measured rate reached ``target`` (0.0 if the lowest did
    not): unlike ``max_goodput_rate``, a pass above a failed rate does not count."""
    best = 0.0
    for rate, attainment in sorted(points):
        if attainment < target:
            break
        best = rate
    return best


def max_goodput_rate(points: Sequence[tuple[float, float]], target: float = GOODPUT_ATTAINMENT) -> float:
    """The highest offered rate whose attainment reached ``target`` (0.0 if none did)."""
    return max((rate for rate, attainment in points if attainment >= target), default=0.0)
