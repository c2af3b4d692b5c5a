"""Per-request stage accounting: what a request spent in each stage, however many calls.

Inside a request, every call of a stage (keyed by name and enclosing stage) adds
its interval to a :class:`StageTally`; when the request ends the recorder records
each tally ONCE: its time is the union of the call intervals (concurrent calls
through ``asyncio.gather`` or threads are not double counted), beside the number
of calls and whether one failed. A budget is judged on that per-request time.

The tally also holds the stage's latest span, not yet ended (:class:`HeldSpan`):
the next consecutive short, successful call of the same stage joins it instead of
making a span of its own (span compression), and at the end of the request it
carries the request's budget verdict for the stage.

Usage (what :mod:`otel_inference.stages` does)::

    tally = account.tally("feature_hydration", None, cold=False, context=ctx)
    tally.add(start_ns, end_ns, error_type=None)
    seconds = tally.time_ns() / 1e9     # at request end
"""

from __future__ import annotations

from typing import Any

_MAX_INTERVALS = 4096


def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping intervals covering the same time."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        if merged and lo <= merged[-1][1]:
            if hi > merged[-1][1]:
                merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return merged


def union_ns(intervals: list[tuple[int, int]], start_ns: int, end_ns: int) -> int:
    """Length of the union of ``intervals``, clipped to ``[start_ns, end_ns]``."""
    covered = 0
    for lo, hi in merge_intervals(intervals):
        lo, hi = max(lo, start_ns), min(hi, end_ns)
        if hi > lo:
            covered += hi - lo
    return covered


class HeldSpan:
    """A stage span whose call has finished but that is not ended yet.

    ``calls`` > 1 once later calls joined it (a compressed span). It is ended when
    another span takes its place in the tally, or when the request ends."""

    __slots__ = (
        "calls",
        "compressible",
        "context",
        "end_ns",
        "end_wall_ns",
        "seq",
        "span",
        "start_ns",
    )

    def __init__(
        self,
        span: Any,
        start_ns: int,
        end_ns: int,
        end_wall_ns: int,
        compressible: bool,
        context: object,
        seq: int,
    ) -> None:
        self.span = span
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.end_wall_ns = end_wall_ns
        self.calls = 1
        # Later calls may join only while every call in it was short and successful,
        # under the same parent context, with no other stage span opened since.
        self.compressible = compressible
        self.context = context
        self.seq = seq

    def join(self, end_ns: int) -> None:
        self.calls += 1
        if end_ns > self.end_ns:
            self.end_wall_ns += end_ns - self.end_ns
            self.end_ns = end_ns


class StageTally:
    """One stage (name + enclosing stage) of one request: its calls so far."""

    __slots__ = ("calls", "cold", "context", "error_type", "held", "intervals", "name", "parent")

    def __init__(self, name: str, parent: str | None, cold: bool, context: Any) -> None:
        self.name = name
        self.parent = parent
        self.cold = cold
        # The first call's context: the exemplar of the request's record points there.
        self.context = context
        self.calls = 0
        self.error_type: str | None = None
        self.intervals: list[tuple[int, int]] = []
        self.held: HeldSpan | None = None

    def add(self, start_ns: int, end_ns: int, error_type: str | None) -> None:
        self.calls += 1
        self.intervals.append((start_ns, end_ns))
        if len(self.intervals) > _MAX_INTERVALS:
            self.intervals = merge_intervals(self.intervals)  # bounded memory
        if error_type is not None and self.error_type is None:
            self.error_type = error_type

    def time_ns(self, start_ns: int | None = None, end_ns: int | None = None) -> int:
        """The union of the calls' intervals (optionally clipped to a window)."""
        if len(self.intervals) == 1 and start_ns is None:
            lo, hi = self.intervals[0]
            return hi - lo
        lo = min(i[0] for i in self.intervals) if start_ns is None else start_ns
        hi = max(i[1] for i in self.intervals) if end_ns is None else end_ns
        return union_ns(self.intervals, lo, hi)
