"""Aggregates with 95% confidence intervals (pure functions)."""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def mean_ci(values: list[float]) -> dict:
    """Mean with a normal-approximation 95% interval (sample standard deviation)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": [None, None], "n": 0}
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "ci95": [mean, mean], "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = Z95 * sd / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def proportion_ci(successes: int, n: int, scale: float = 1.0) -> dict:
    """Share with a Wilson 95% interval, which stays inside [0, 1] and is not empty at 0 or n."""
    if n == 0:
        return {"mean": None, "ci95": [None, None], "n": 0}
    p = successes / n
    denominator = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return {"mean": p * scale, "ci95": [low * scale, high * scale], "n": n}
