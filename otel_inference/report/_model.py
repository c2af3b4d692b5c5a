"""The report's data model: normalised spans in, per-stage rows and a verdict out.

Every input (an OTLP JSON Lines file, the Jaeger query API) is turned into
:class:`SpanRecord` objects; :func:`otel_inference.report.build_report` turns
those into a :class:`Report`, which every renderer (table, JSON, HTML) reads.

Usage::

    from otel_inference.report import build_report, load_spans_file

    report = build_report(load_spans_file("build/demo/spans.jsonl"), cost_per_hour=2.5)
    for row in report.rows:
        print(row.stage, row.p95)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from otel_inference.report.generation import GenerationSummary

SpanKey = tuple[str, str]
"""``(trace id, span id)``, lowercase hex as the source wrote them."""


class ReportError(Exception):
    """Bad input (a missing or empty file, spans without our attributes, an
    unreachable Jaeger or Prometheus, a malformed option): the message says which."""


@dataclass(frozen=True)
class SpanEvent:
    """A span event (``gc.pause``...): wall-clock nanoseconds and its attributes."""

    name: str
    time_ns: int
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SpanRecord:
    """One finished span, whatever the source.

    Times are wall-clock nanoseconds since the epoch (Jaeger's microseconds are
    scaled); ``kind`` is lowercase (``server``, ``internal``, ``client``...).
    """

    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: Mapping[str, Any] = field(default_factory=dict)
    links: tuple[SpanKey, ...] = ()
    service: str | None = None
    events: tuple[SpanEvent, ...] = ()

    @property
    def key(self) -> SpanKey:
        return (self.trace_id, self.span_id)

    @property
    def parent_key(self) -> SpanKey | None:
        return None if self.parent_id is None else (self.trace_id, self.parent_id)

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)


@dataclass
class StageRow:
    """One row of the report. Durations are seconds (``None`` when unknown).

    ``kind`` is ``stage`` (a top-level stage), ``nested`` (a stage inside
    ``parent``), ``event_loop`` (time the event loop was held: taken out of the
    stages and ``unattributed``), ``unattributed`` or ``request`` (end to end).
    ``tail_share``: among requests at or above the end-to-end p95, the mean
    fraction of their time spent in this stage (top-level stages and
    ``unattributed`` only). ``cost_per_request``: dollars, batch-shared work
    divided among its members. ``status``: ``ok`` or ``over`` (p95 against the
    budget), ``None`` without a budget.
    """

    stage: str
    kind: str
    count: int
    p50: float | None
    p95: float | None
    p99: float | None
    parent: str | None = None
    mean: float | None = None
    tail_share: float | None = None
    budget: float | None = None
    status: str | None = None
    cost_per_request: float | None = None
    budget_source: str | None = None  # explicit | telemetry | environment
    cpu_share: float | None = None

    @property
    def label(self) -> str:
        return self.stage if self.parent is None else f"{self.stage} (in {self.parent})"


@dataclass
class LoopCulprit:
    """What held the event loop: ``kind`` ``busy``/``blocked`` (a callback: ``culprit``
    names its function) or ``starved`` (``culprit`` names the threads that took the
    CPU); ``share``: its part of all the blocked time attributed to requests."""

    kind: str
    culprit: str
    seconds: float
    share: float


@dataclass
class Verdict:
    """Where the tail's time goes and what to change first.

    ``category`` is one of ``event_loop``, ``configuration`` (queue-bound), ``runtime``,
    ``cache``, ``model``, ``host``, ``downstream``, ``instrumentation``, ``prefill``
    (prefill-bound), ``decode`` (decode-bound), ``custom`` or ``none``.
    """

    stage: str | None
    category: str
    share: float | None
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class Report:
    """The whole report: rows in serving-path order, then ``unattributed`` and
    ``request``; figures that need traces are ``None`` for Prometheus input."""

    source: str
    requests: int
    rows: list[StageRow]
    verdict: Verdict
    percentile_method: str
    tail_threshold: float | None = None
    tail_requests: int = 0
    cost_per_hour: float | None = None
    cost_per_request: float | None = None
    cache_hit_ratio: float | None = None
    cache_lookups: int = 0
    notes: list[str] = field(default_factory=list)
    padding: Padding | None = None
    timeline: Timeline | None = None
    slowest: list[RequestWaterfall] = field(default_factory=list)
    event_loop_culprits: list[LoopCulprit] = field(default_factory=list)
    # TTFT / TPOT / tokens per second when requests generated (report.generation)
    generation: GenerationSummary | None = None

    def row(self, stage: str, parent: str | None = None) -> StageRow:
        """The row of ``stage`` (nested rows: give ``parent``); ``KeyError`` if absent."""
        for row in self.rows:
            if row.stage == stage and row.parent == parent:
                return row
        raise KeyError(stage if parent is None else f"{parent}/{stage}")


@dataclass
class Padding:
    """Padding waste: real vs padded token positions of the ``tokenize`` spans
    (``inference.tokens.real`` / ``.padded``), and the ``model_forward`` time that
    the padded positions imply, assuming a forward's time grows with the positions
    it computes. ``forward_seconds``: total time of the ``model_forward`` spans
    beside tokenize spans (same parent span: the batch, or the request);
    ``padding_seconds``: the share of it spent on padding; ``forward_share``:
    ``padding_seconds / forward_seconds``; per request and cost: over all
    requests. ``advice``: a sentence when the waste is large, else ``None``."""

    real_tokens: int
    padded_tokens: int
    waste: float | None
    tokenize_calls: int = 0
    forward_seconds: float | None = None
    padding_seconds: float | None = None
    forward_share: float | None = None
    seconds_per_request: float | None = None
    cost_per_request: float | None = None
    advice: str | None = None


@dataclass
class Timeline:
    """Per-stage p95 over time: requests binned by their start, ``bin_seconds``
    wide from ``start_ns``; ``p95[stage][i]`` is the nearest-rank p95 of the
    stage's per-request times in the requests of bin ``i`` (``None``: none there);
    ``requests[i]``: requests in bin ``i``."""

    start_ns: int
    bin_seconds: float
    requests: list[int]
    p95: dict[str, list[float | None]]


@dataclass
class WaterfallBar:
    """One stage span of a request on its time axis (seconds from the request's
    start). ``depth`` 0 is top level, 1 nested in a stage, ... ``batch``: the
    batch span's id and size when the request shared this span with others."""

    stage: str
    start: float
    duration: float
    depth: int
    parent: str | None = None
    batch_id: str | None = None
    batch_size: int | None = None
    batcher: str | None = None
    calls: int | None = None  # a compressed span: the calls it stands for
    busy: float | None = None  # ... and their time (s), less than its extent


@dataclass
class RequestWaterfall:
    """One of the slowest requests: its stages, and the intervals the process
    held it (``gc.pause`` events: start offset and duration in seconds)."""

    trace_id: str
    span_id: str
    start_ns: int
    duration: float
    bars: list[WaterfallBar]
    held: list[tuple[str, float, float]] = field(default_factory=list)
