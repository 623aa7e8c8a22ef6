"""When each benchmark request is sent. Pure Python.

Inter-arrival gaps follow a gamma distribution with shape = burstiness and mean = 1 / rate (the
`vllm bench serve` convention): burstiness 1 is a Poisson process (exponential gaps, coefficient of
variation 1), smaller is burstier (CV = 1/sqrt(burstiness)), larger is more regular. An infinite rate
sends everything at once; a concurrency cap (applied by the sender) then sets the pace.
"""
from __future__ import annotations

import math
import random

from fractal.errors import FractalError


def arrival_times(num: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times in seconds from the start, non-decreasing; the first request goes at 0."""
    if num < 0:
        raise FractalError(f"num={num} is invalid: must be >= 0")
    if not rate > 0:
        raise FractalError(f"request rate={rate} is invalid: must be > 0 (inf sends all at once)")
    if not burstiness > 0 or math.isinf(burstiness):
        raise FractalError(f"burstiness={burstiness} is invalid: must be a finite number > 0 (1 = Poisson)")
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    times, t = [], 0.0
    for i in range(num):
        if i:
            t += rng.gammavariate(burstiness, scale)
        times.append(t)
    return times
