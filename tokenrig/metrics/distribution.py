"""Exact percentiles of a set of values and the distribution-free confidence interval of a percentile.

Percentiles are numpy's linear interpolation between order statistics over every value (no histogram
approximation); the interval is the pair of order statistics at ranks np -/+ 1.96 sqrt(np(1 - p)).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tokenrig.metrics.run_summary import Distribution

PERCENTILES = (50, 90, 95, 99, 99.9)
Z_95 = 1.959964


def percentile_interval(values: np.ndarray, percentile: float) -> tuple[float, float] | None:
    """Distribution-free 95 % confidence interval of a percentile from sorted order statistics."""
    n = values.size
    p = percentile / 100
    spread = Z_95 * math.sqrt(n * p * (1 - p))
    low, high = math.floor(n * p - spread), math.ceil(n * p + spread)
    if low < 1 or high > n:
        return None  # too few samples for a two-sided interval at this percentile
    ordered = np.sort(values)
    return float(ordered[low - 1]), float(ordered[high - 1])


def distribution(values) -> Distribution | None:
    """Exact percentiles, mean, min, max, count, and p99's 95 % interval (None: too few samples for one)."""
    data = np.asarray(list(values), dtype=float)
    if data.size == 0:
        return None
    stats: dict[str, Any] = {f"p{p:g}": float(np.percentile(data, p)) for p in PERCENTILES}
    stats.update(mean=float(data.mean()), min=float(data.min()), max=float(data.max()), count=int(data.size))
    stats["p99_ci95"] = percentile_interval(data, 99)
    return Distribution.model_validate(stats)
