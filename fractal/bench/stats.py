"""Summary statistics of a benchmark run. Pure Python.

Percentiles interpolate linearly between order statistics (numpy's default, which `vllm bench serve`
uses), so p50 of [1, 2, 3, 4] is 2.5. `std` is the population standard deviation (numpy's default).
Goodput counts the requests that met every given SLO (TTFT, TPOT, E2E latency, in ms) per second.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; 0.0 for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q={q} must be in [0, 100]")
    data = sorted(values)
    if not data:
        return 0.0
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def std(values: Sequence[float]) -> float:
    if not values:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def summarize(name: str, values_s: Sequence[float]) -> dict[str, float]:
    """{mean,median,std,p90,p99}_{name}_ms from values in seconds (vLLM's key names)."""
    ms = [v * 1000.0 for v in values_s]
    out = {f"mean_{name}_ms": mean(ms), f"median_{name}_ms": percentile(ms, 50), f"std_{name}_ms": std(ms)}
    for q in PERCENTILES[1:]:
        out[f"p{q}_{name}_ms"] = percentile(ms, q)
    return out


@dataclass(frozen=True)
class SLO:
    """Service-level objectives in milliseconds; None leaves that metric unconstrained."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2el_ms))

    def met(self, ttft_s: float, tpot_s: float | None, e2el_s: float) -> bool:
        """A request meets the SLO when each given bound holds (TPOT of a 1-token output counts as 0)."""
        if self.ttft_ms is not None and ttft_s * 1000.0 > self.ttft_ms:
            return False
        if self.tpot_ms is not None and (tpot_s or 0.0) * 1000.0 > self.tpot_ms:
            return False
        if self.e2el_ms is not None and e2el_s * 1000.0 > self.e2el_ms:
            return False
        return True
