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
    seconds = tally.time_ns() / 1e9     # at request end, once
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from otel_inference._compiled import SPEEDUPS

MAX_UNSETTLED_INTERVALS = 4096
_KEEP_INTERVALS = 64
_SETTLE_LOCK = threading.Lock()
_new_union = object.__new__


def _merge_intervals(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint intervals covering the same points as ``intervals``."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _union_ns(intervals: list[tuple[int, int]], start_ns: int, end_ns: int) -> int:
    """Length of the union of ``intervals``, clipped to ``[start_ns, end_ns]``."""
    covered = 0
    for lo, hi in _merge_intervals(intervals):
        lo, hi = max(lo, start_ns), min(hi, end_ns)
        if hi > lo:
            covered += hi - lo
    return covered


def _settle_intervals(
    intervals: list[tuple[int, int]], floor: int, keep: int
) -> tuple[int, int | None, list[tuple[int, int]]]:
    """Merge ``intervals`` (clipped to start at ``floor`` when it is >= 0) and split
    them: ``(length of all but the last keep, end of the last of those or None,
    the last keep)``."""
    if floor >= 0:
        intervals = [(max(lo, floor), hi) for lo, hi in intervals if hi > floor]
    merged = _merge_intervals(intervals)
    split = max(len(merged) - keep, 0)
    settled, kept = merged[:split], merged[split:]
    return sum(hi - lo for lo, hi in settled), settled[-1][1] if settled else None, kept


# The compiled twins (_speedups.c) when built: the same results, ~50x faster on the
# thousands of intervals a request's repeated calls leave.
if SPEEDUPS is not None:
    merge_intervals = SPEEDUPS.merge_intervals
    union_ns = SPEEDUPS.union_ns
    settle_intervals = SPEEDUPS.settle_intervals
else:
    merge_intervals = _merge_intervals
    union_ns = _union_ns
    settle_intervals = _settle_intervals
_UNBOUNDED = (-(2**63), 2**63 - 1)


class _Settled:
    """What an :class:`IntervalUnion` settled so far (made at its first settle)."""

    __slots__ = ("calls", "end", "kept", "ns")

    def __init__(self) -> None:
        self.ns = 0  # the settled intervals' union
        self.end = -1  # where settled time ends: later intervals are clipped to it
        self.calls = 0  # intervals settled, kept ones excluded
        self.kept = 0  # merged intervals left at the head of the list by the last settle


class IntervalUnion:
    """The length of a union of intervals and how many were added, in bounded memory.

    ``add`` is a lock-free ``list.append`` (atomic under the GIL), so threads of one
    request may add at once. Past ``MAX_UNSETTLED_INTERVALS`` the older intervals are
    settled into a total, under a lock, by the thread that crossed the limit; appends
    racing with it are kept. Intervals that reach back into settled time are clipped
    to start after it (exact for calls that end in order, give or take overlaps).

    Two fields, so that a stage's first call in a request (which makes one) is cheap:
    ``intervals``, and ``settled`` (``None`` until the first settle)."""

    __slots__ = ("intervals", "settled")

    def __init__(self) -> None:
        self.intervals: list[tuple[int, int]] = []
        self.settled: _Settled | None = None

    def add(self, start_ns: int, end_ns: int) -> None:
        intervals = self.intervals
        intervals.append((start_ns, end_ns))
        if len(intervals) > MAX_UNSETTLED_INTERVALS:
            self.settle()

    def settle(self) -> None:
        with _SETTLE_LOCK:
            intervals = self.intervals
            taken = len(intervals)
            if taken <= MAX_UNSETTLED_INTERVALS:
                return  # another thread settled them
            settled = self.settled
            if settled is None:
                settled = _Settled()
            settled_ns, settled_end, kept = settle_intervals(
                intervals[:taken], settled.end, _KEEP_INTERVALS
            )
            if settled_end is not None:
                settled.ns += settled_ns
                settled.end = settled_end
            intervals[:taken] = kept  # one atomic slice assignment: later appends stay
            settled.calls += taken - settled.kept
            settled.kept = len(kept)
            self.settled = settled

    @property
    def settled_ns(self) -> int:
        """The settled intervals' union (0 before the first settle)."""
        settled = self.settled
        return 0 if settled is None else settled.ns

    @property
    def count(self) -> int:
        """How many intervals were added (settling merges them, the count stays)."""
        settled = self.settled
        if settled is None:
            return len(self.intervals)
        return settled.calls + len(self.intervals) - settled.kept

    def _clipped(self, intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
        settled = self.settled
        if settled is None or settled.end < 0:
            return intervals
        floor = settled.end
        return [(max(lo, floor), hi) for lo, hi in intervals if hi > floor]

    def total_ns(self, start_ns: int | None = None, end_ns: int | None = None) -> int:
        """The union's length; the unsettled part clipped to ``[start_ns, end_ns]``."""
        settled_ns = self.settled_ns
        intervals = self._clipped(self.intervals)
        if not intervals:
            return settled_ns
        if start_ns is None and end_ns is None and len(intervals) == 1:
            lo, hi = intervals[0]
            return settled_ns + hi - lo
        lo = _UNBOUNDED[0] if start_ns is None else start_ns
        hi = _UNBOUNDED[1] if end_ns is None else end_ns
        return settled_ns + union_ns(intervals, lo, hi)


class _HeldSpan:
    """A stage span whose call has finished but that is not ended yet.

    ``calls`` > 1 once later calls joined it (a compressed span). It is ended when
    another span takes its place in the tally, or when the request ends."""

    __slots__ = (
        "busy_ns",
        "calls",
        "compressible",
        "context",
        "end_ns",
        "end_wall_ns",
        "limit_ns",
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
        limit_ns: int = 0,
    ) -> None:
        self.span = span
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.end_wall_ns = end_wall_ns
        self.calls = 1
        self.busy_ns = end_ns - start_ns  # the calls' summed time
        # Later calls may join only while every call in it was short and successful,
        # under the same parent context, with no other stage span opened since.
        self.compressible = compressible
        self.context = context
        self.seq = seq
        self.limit_ns = limit_ns  # the longest call that may join it

    def join(self, start_ns: int, end_ns: int) -> None:
        self.calls += 1
        self.busy_ns += end_ns - start_ns
        if end_ns > self.end_ns:
            self.end_wall_ns += end_ns - self.end_ns
            self.end_ns = end_ns


# The compiled twin (_speedups.c) when built: joining a compressed span is then a
# few additions instead of a method call and six attribute updates.
HeldSpan = _HeldSpan if SPEEDUPS is None else SPEEDUPS.HeldSpan


class StageTally:
    """One stage (name + enclosing stage) of one request: its calls so far."""

    __slots__ = ("cold", "context", "error_type", "held", "name", "parent", "union")

    def __init__(self, name: str, parent: str | None, cold: bool, context: Any = None) -> None:
        self.name = name
        self.parent = parent
        self.cold = cold
        # The first call's context: the exemplar of the request's record points there.
        self.context = context
        self.error_type: str | None = None
        # IntervalUnion() without its __init__ call: made once per stage and request.
        self.union = union = _new_union(IntervalUnion)
        union.intervals = []
        union.settled = None
        self.held: HeldSpan | None = None

    @property
    def calls(self) -> int:
        return self.union.count

    def add(self, start_ns: int, end_ns: int, error_type: str | None) -> None:
        self.union.add(start_ns, end_ns)
        if error_type is not None and self.error_type is None:
            self.error_type = error_type

    def time_ns(self) -> int:
        """The union of the calls' intervals: concurrent calls are not double counted."""
        return self.union.total_ns()
