"""Small statistics: percentiles of samples, medians over runs, ratios to the floor."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["median", "percentile", "ratio"]


def percentile(samples: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile (0–100) of ``samples``, linearly interpolated; None if empty."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is not within 0..100")
    if not samples:
        return None
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None (None if there are none)."""
    present = [value for value in values if value is not None]
    return percentile(present, 50) if present else None


def ratio(value: float | None, floor: float | None) -> float | None:
    """``value / floor``, or None when either is missing or the floor is not positive."""
    if value is None or floor is None or floor <= 0:
        return None
    return value / floor
