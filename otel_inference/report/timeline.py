"""Figures over time and per request, for the pictures of the HTML report.

* :func:`stage_timeline`: per-stage p95 over time. Requests are binned by their
  start into at most :data:`MAX_BINS` bins of a round width (1 ms ... 1 day);
  each bin holds the nearest-rank p95 of what each of its requests spent in
  every top-level stage (the values of the report's rows) and of the requests
  end to end. A
  burst shows as a step.
* :func:`slowest_requests`: the slowest requests, each as a waterfall: every
  stage span on the request's time axis, nested stages one level deeper (a
  batch's ``tokenize`` and ``model_forward`` for every member of the batch, not
  only the member whose trace holds the batch span), the batch each shared span
  belongs to (id, size, batcher), and the intervals the process held the
  request (``gc.pause`` span events: they are stamped at the pause's end and
  carry its duration).

Usage::

    from otel_inference.report import build_report

    report = build_report(spans)
    report.timeline.p95["queue_wait"]      # one p95 (s) per bin, None where empty
    report.slowest[0].bars[0].stage
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from otel_inference import semconv
from otel_inference.report._model import (
    RequestWaterfall,
    SpanKey,
    SpanRecord,
    Timeline,
    WaterfallBar,
)
from otel_inference.report._stats import nearest_rank

if TYPE_CHECKING:  # analysis imports this module
    from otel_inference.report.analysis import Observation, _Index

MAX_BINS = 40
_WIDTHS = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400,
)  # fmt: skip
"""Bin widths in seconds: the smallest that keeps the bins at most MAX_BINS."""

HELD_EVENTS: Mapping[str, tuple[str, str]] = {
    "gc.pause": (semconv.INFERENCE_GC_PAUSE_DURATION, "end"),
    "event_loop.blocked": (semconv.INFERENCE_EVENT_LOOP_BLOCKED, "start"),
}
"""Span events that mark time the process held a request: event name -> (the
attribute holding the interval's duration in seconds, whether the event's time is
the interval's ``start`` or its ``end``)."""

SLOWEST = 5


def bin_width(span_seconds: float) -> float:
    """The smallest round width that covers ``span_seconds`` in at most MAX_BINS bins."""
    for width in _WIDTHS:
        if span_seconds / width < MAX_BINS:
            return float(width)
    return float(_WIDTHS[-1])


def stage_timeline(
    requests: Mapping[SpanKey, SpanRecord], obs: Iterable[Observation]
) -> Timeline | None:
    """Per-stage p95 per time bin (top-level stages, and ``request`` end to end)."""
    if not requests:
        return None
    start = min(r.start_ns for r in requests.values())
    width = bin_width((max(r.start_ns for r in requests.values()) - start) / 1e9)
    width_ns = round(width * 1e9)
    bins = 1 + (max(r.start_ns for r in requests.values()) - start) // width_ns

    def bin_of(request: SpanRecord) -> int:
        return (request.start_ns - start) // width_ns

    from otel_inference.report.analysis import spent_ns  # analysis imports this module

    values: dict[str, list[list[int]]] = defaultdict(lambda: [[] for _ in range(bins)])
    counts = [0] * bins
    for request in requests.values():
        counts[bin_of(request)] += 1
        values[semconv.REQUEST][bin_of(request)].append(request.duration_ns)
    # One value per request and stage, as the rows count: what the request spent in it.
    spans: dict[tuple[SpanKey, str], list[SpanRecord]] = defaultdict(list)
    for o in obs:
        if o.parent is None:
            spans[(o.request, o.stage)].append(o.span)
    for (key, stage), stage_spans in spans.items():
        request = requests[key]
        values[stage][bin_of(request)].append(spent_ns(stage_spans, request))
    return Timeline(
        start_ns=start,
        bin_seconds=width,
        requests=counts,
        p95={
            stage: [nearest_rank(v, 0.95) / 1e9 if v else None for v in per_bin]
            for stage, per_bin in values.items()
        },
    )


def _batch_of(span: SpanRecord) -> tuple[int, str | None] | None:
    """(size, batcher name) of a span shared by a batch (linked to its members)."""
    from otel_inference.report.analysis import batch_size  # analysis imports this module

    size = batch_size(span)
    if size is None:
        return None
    name = span.attributes.get(semconv.INFERENCE_BATCHER_NAME)
    return size, name if isinstance(name, str) else None


def slowest_requests(
    index: _Index, obs: Sequence[Observation], count: int = SLOWEST
) -> list[RequestWaterfall]:
    """The ``count`` slowest requests (ties: the earlier first) as waterfalls."""
    children: dict[SpanKey, list[SpanRecord]] = defaultdict(list)
    for span in index.spans.values():
        parent = index.parent(span)
        if parent is not None:
            children[parent.key].append(span)
    chosen = sorted(index.requests.values(), key=lambda r: (-r.duration_ns, r.start_ns))[:count]
    top: dict[SpanKey, list[Observation]] = defaultdict(list)
    wanted = {r.key for r in chosen}
    for o in obs:
        if o.request in wanted and o.parent is None:
            top[o.request].append(o)
    result = []
    for request in chosen:
        bars: list[WaterfallBar] = []
        for o in sorted(top[request.key], key=lambda o: (o.span.start_ns, o.stage)):
            _add_bar(bars, o.span, request, children, depth=0, parent=None)
        result.append(
            RequestWaterfall(
                trace_id=request.trace_id,
                span_id=request.span_id,
                start_ns=request.start_ns,
                duration=request.duration_ns / 1e9,
                bars=bars,
                held=_held(request, children),
            )
        )
    return result


def _add_bar(
    bars: list[WaterfallBar],
    span: SpanRecord,
    request: SpanRecord,
    children: Mapping[SpanKey, list[SpanRecord]],
    *,
    depth: int,
    parent: str | None,
) -> None:
    stage = span.attributes.get(semconv.INFERENCE_STAGE)
    batch = _batch_of(span)
    bars.append(
        WaterfallBar(
            stage=str(stage),
            start=(span.start_ns - request.start_ns) / 1e9,
            duration=span.duration_ns / 1e9,
            depth=depth,
            parent=parent,
            batch_id=span.span_id if batch else None,
            batch_size=batch[0] if batch else None,
            batcher=batch[1] if batch else None,
        )
    )
    calls = span.attributes.get(semconv.STAGE_CALLS)
    busy = span.attributes.get(semconv.INFERENCE_STAGE_CALLS_DURATION)
    if isinstance(calls, int) and calls > 1 and isinstance(busy, (int, float)):
        bars[-1].calls, bars[-1].busy = calls, float(busy)
    for child in _stage_descendants(span, children):
        _add_bar(bars, child, request, children, depth=depth + 1, parent=str(stage))


def _stage_descendants(
    span: SpanRecord, children: Mapping[SpanKey, list[SpanRecord]]
) -> list[SpanRecord]:
    """The nearest stage spans below ``span`` (through spans that are not stages)."""
    found, stack = [], list(children.get(span.key, ()))
    while stack:
        child = stack.pop()
        if semconv.INFERENCE_STAGE in child.attributes:
            found.append(child)
        else:
            stack.extend(children.get(child.key, ()))
    return sorted(found, key=lambda s: (s.start_ns, s.span_id))


def _held(
    request: SpanRecord, children: Mapping[SpanKey, list[SpanRecord]]
) -> list[tuple[str, float, float]]:
    """``(event name, start offset s, duration s)`` of the held intervals recorded
    on the request span or any span inside it (our ``request()`` span under a web
    framework's, the stages a held loop held), each interval once."""
    held = []
    stack = [request]
    while stack:
        span = stack.pop()
        for event in span.events:
            key, stamped = HELD_EVENTS.get(event.name, (None, "end"))
            duration = None if key is None else event.attributes.get(key)
            if isinstance(duration, (int, float)) and not isinstance(duration, bool):
                at = (event.time_ns - request.start_ns) / 1e9
                start = at if stamped == "start" else at - float(duration)
                held.append((event.name, start, float(duration)))
        # Stage spans too: a held event loop is marked on the stages it held.
        stack.extend(children.get(span.key, ()))
    # The same interval can be on a framework's SERVER span and our request() span in it.
    return sorted({(n, round(b, 6), round(d, 6)) for n, b, d in held}, key=lambda h: h[1])
