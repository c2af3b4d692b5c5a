"""Exact statistics over span durations: nearest-rank percentiles, interval unions.

Usage::

    from otel_inference.report._stats import nearest_rank, union_length

    nearest_rank([5, 1, 3, 2, 4], 0.95)          # 5: the ceil(0.95 * 5) = 5th smallest
    union_length([(0, 10), (5, 20), (30, 31)])   # 21
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from otel_inference.accounting import merge_intervals

PERCENTILE_METHOD = (
    "nearest-rank: the p-th percentile of n values is the ceil(p*n)-th smallest (no interpolation)"
)


def nearest_rank(values: Sequence[int] | Sequence[float], q: float) -> int | float:
    """The ``ceil(q * n)``-th smallest of ``values`` (1-based; at least the 1st).

    Always an observed value, so a p95 under a budget means 95% of the
    observations were under it. ``values`` must not be empty.
    """
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(round(q * len(ordered), 9)))
    return ordered[min(rank, len(ordered)) - 1]


def union_length(intervals: Iterable[tuple[int, int]]) -> int:
    """Total length covered by ``intervals`` (overlaps counted once)."""
    return sum(end - start for start, end in merge_intervals(intervals))


def clip(interval: tuple[int, int], bounds: tuple[int, int]) -> tuple[int, int]:
    """``interval`` cut to ``bounds`` (an empty interval when they do not meet)."""
    start, end = max(interval[0], bounds[0]), min(interval[1], bounds[1])
    return (start, max(start, end))
